"""Fine-tuning on a folder of images (one sub-folder per class), as
`keras-sequencer finetune` runs it.

A run folder remembers its run. `run.json` records the settings before anything
else is written; `resume=True` continues from that record alone. After every
epoch the run commits in one step: the new checkpoint (weights and optimizer
state) and, when validation accuracy improved, a best-model candidate are
written first, then `backup/state.json` is replaced atomically to name them.
A run killed at any moment therefore resumes from its last committed epoch,
with `history.csv` (rewritten from the state) holding each epoch once.

What a run writes (sizes for sequencer2d_s, 27.6M parameters):
- `best.keras`: the model with the best validation accuracy, inference only
  (no optimizer state): 110 MB. It names its classes and its input size
  (`model.metadata`).
- `backup/`: the last committed epoch's weights and AdamW moments (328 MB)
  and `state.json`; what `--resume` continues from. Delete it once a run is
  finished and will not be continued.
- `run.json`, `classes.json`, `history.csv`, `curves.png`, `confusion_matrix.png`.
"""

import contextlib
import csv
import json
import math
import os
import sys
import time

import keras
import numpy as np

from keras_sequencer import registry
from keras_sequencer.data import DataError, load_image, scan_image_folder, stratified_split
from keras_sequencer.files import is_model_file, save_atomically
from keras_sequencer.layers import cpu_has_bfloat16, has_gpu
from keras_sequencer.models import create_model, functional_model, minimum_model_input_size, model_metadata
from keras_sequencer.models.base import ModelFileError, classifier_head, load_model_file, minimum_input_size
from keras_sequencer.plots import plot_confusion_matrix, plot_history_csv
from keras_sequencer.training import augmentation, classification_loss, create_optimizer

RUN_RECORD = "run.json"
BEST_MODEL = "best.keras"
LOG = "history.csv"
BACKUP = "backup"
STATE = "state.json"
CLASSES = "classes.json"

# Every setting of a run, its default, and the command-line option that sets it.
SETTINGS = {
    "variant": ("sequencer2d_s", "--variant"),
    "weights": ("imagenet", "--weights"),
    "image_size": (224, "--image-size"),
    "crop_pct": (0.875, "--crop-pct"),
    "batch_size": (32, "--batch-size"),
    "epochs": (10, "--epochs"),
    "learning_rate": (1e-4, "--lr"),
    "weight_decay": (0.05, "--weight-decay"),
    "warmup_epochs": (1, "--warmup-epochs"),
    "label_smoothing": (0.1, "--label-smoothing"),
    "drop_path_rate": (0.1, "--drop-path-rate"),
    "validation_fraction": (0.2, "--validation-split"),
    "augment": (True, "--no-augment"),
    "freeze_backbone": (False, "--freeze-backbone"),
    "mixed_precision": (False, "--mixed-precision"),
    "seed": (0, "--seed"),
}
# Settings a resumed run may change: a longer schedule (the cosine decay is
# stretched to the new end from the current step on).
RESUMABLE = ("epochs",)


class FinetuneError(DataError):
    """A problem with the data, the options or the run folder, reported as one line."""


# ---------------------------------------------------------------- run record


def _write_json(path, value):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_run_record(output_dir):
    """The settings a run in `output_dir` was started with (run.json)."""
    path = os.path.join(output_dir, RUN_RECORD)
    if not os.path.isfile(path):
        raise FinetuneError(f"nothing to resume in {output_dir} (no {RUN_RECORD})")
    try:
        with open(path) as f:
            record = json.load(f)
        record["settings"], record["data_dir"], record["class_names"]  # noqa: B018
    except (OSError, ValueError, KeyError, TypeError):
        raise FinetuneError(f"{path} is not a run record of keras-sequencer finetune") from None
    return record


def _normalise(key, value):
    if key == "weights":
        if value in (None, "none"):
            return "none"
        if value != "imagenet":
            return os.path.abspath(value)
    if key == "image_size" and value is not None:
        value = [int(value), int(value)] if isinstance(value, (int, np.integer)) else [int(v) for v in value]
    return value


def _shown(key, value):
    if key == "image_size" and value is not None:
        return f"{value[0]}" if value[0] == value[1] else f"{value[0]}x{value[1]}"
    return str(value)


def resolve_settings(output_dir, given, resume):
    """(settings, record): the run's settings from the defaults and the given
    options (a new run), or from run.json (resume=True); a given option that
    contradicts the record is an error naming both values."""
    given = {k: _normalise(k, v) for k, v in given.items() if v is not None}
    unknown = sorted(set(given) - set(SETTINGS))
    if unknown:
        raise FinetuneError(f"unknown settings: {', '.join(unknown)}")
    has_run = os.path.exists(os.path.join(output_dir, RUN_RECORD)) or os.path.isdir(
        os.path.join(output_dir, BACKUP)
    )
    if not resume:
        if has_run:
            raise FinetuneError(
                f"{output_dir} holds an earlier run: pass --resume to continue it, or choose another --output"
            )
        settings = {k: _normalise(k, default) for k, (default, _) in SETTINGS.items()}
        settings.update(given)
        return settings, None
    record = read_run_record(output_dir)
    settings = dict(record["settings"])
    for key, value in given.items():
        if key in RESUMABLE:
            settings[key] = value
        elif settings.get(key) != value:
            flag = SETTINGS[key][1]
            raise FinetuneError(
                f"{flag} {_shown(key, value)} contradicts the run in {output_dir}, which used "
                f"{_shown(key, settings.get(key))} (on resume only {', '.join(SETTINGS[k][1] for k in RESUMABLE)} "
                "may change)"
            )
    return settings, record


# ---------------------------------------------------------------- data


def image_batches(paths, labels, num_classes, image_size, crop_pct, batch_size, training, seed, augment=None):
    """Batches of (images, one-hot labels) read with the package's image reader
    (EXIF orientation, 16-bit scaling: what predict and evaluate see) and timm's
    eval transform, optionally augmented; a keras.utils.PyDataset, so it feeds
    every backend without TensorFlow."""
    class _Batches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=min(4, os.cpu_count() or 1), use_multiprocessing=False)
            self.paths, self.labels = np.asarray(paths), np.asarray(labels)
            self.epoch = 0
            self.order = self._order()
            self.unreadable = set()

        def _order(self):
            if not training:
                return np.arange(len(self.paths))
            return np.random.default_rng([seed, self.epoch]).permutation(len(self.paths))

        def __len__(self):
            return math.ceil(len(self.paths) / batch_size)

        def __getitem__(self, index):
            images, targets = [], []
            for i in self.order[index * batch_size : (index + 1) * batch_size]:
                try:
                    images.append(load_image(str(self.paths[i]), image_size, crop_pct))
                except DataError:  # passed the scan, failed a full decode: skip it
                    self.unreadable.add(str(self.paths[i]))
                    continue
                targets.append(self.labels[i])
            x = np.stack(images).astype("float32")
            if augment is not None:
                x = keras.ops.convert_to_numpy(augment(x, training=True)).astype("float32")
            return x, np.eye(num_classes, dtype="float32")[np.asarray(targets)]

        def on_epoch_end(self):
            self.epoch += 1
            self.order = self._order()

    return _Batches()


def distribution_scope(distribute):
    """The context in which to build and compile: data parallel over every local
    device (and every host, where the environment describes a cluster)."""
    if not distribute:
        return contextlib.nullcontext()
    backend = keras.backend.backend()
    if backend == "jax":
        if os.environ.get("KERAS_DISTRIBUTION_JOB_ADDRESSES") or os.environ.get("JAX_COORDINATOR_ADDRESS"):
            keras.distribution.initialize()  # multi-host: one process per host
        keras.distribution.set_distribution(keras.distribution.DataParallel())
        return contextlib.nullcontext()
    if backend == "tensorflow":
        import tensorflow as tf

        if os.environ.get("TF_CONFIG"):
            return tf.distribute.MultiWorkerMirroredStrategy().scope()
        return tf.distribute.MirroredStrategy().scope()
    raise FinetuneError(
        "--distribute runs on the JAX (keras.distribution.DataParallel) or TensorFlow "
        "(MirroredStrategy) backend; set KERAS_BACKEND=jax or tensorflow"
    )


# ---------------------------------------------------------------- model


def build_model(settings, class_names, start=None):
    """The variant's backbone (ImageNet or given weights), or the `.keras` model
    `start`, with a softmax head for `class_names`; the model carries its
    metadata (class names, input size, eval transform)."""
    image_size = tuple(settings["image_size"])
    metadata = {
        "class_names": list(class_names),
        "image_size": list(image_size),
        "crop_pct": settings["crop_pct"],
        "interpolation": "bicubic",
    }
    num_classes = len(class_names)
    if start is not None and settings["mixed_precision"]:
        start = _in_global_policy(start)
    if start is not None:
        # A saved Sequencer model (an earlier fine-tune, say): keep its head when it
        # already names these classes, else give it a new one.
        same_head = start.output_shape[-1] == num_classes and (
            getattr(start, "metadata", {}).get("class_names") in (None, list(class_names))
        )
        if same_head:
            outputs = start.outputs
        else:
            if registry.POOL not in [layer.name for layer in start.layers]:
                raise FinetuneError(f"{settings['weights']} has no classification head to replace")
            outputs = classifier_head(start.get_layer(registry.POOL).input, num_classes)
        model = functional_model(start.inputs, outputs, start.name, metadata=metadata)
    else:
        weights = settings["weights"]
        backbone = create_model(
            settings["variant"],
            weights=None if weights == "none" else weights,
            include_top=False,
            input_shape=(image_size[0], image_size[1], 3),
            drop_path_rate=settings["drop_path_rate"],
        )
        model = functional_model(
            backbone.inputs, classifier_head(backbone.output, num_classes), f"{settings['variant']}_finetuned",
            metadata=metadata,
        )
    if settings["freeze_backbone"]:
        for layer in model.layers:
            layer.trainable = layer.name in (registry.HEAD, registry.PREDICTIONS)
    return model


def _in_global_policy(model):
    """`model` with its float32 layers rebuilt under the global dtype policy (a
    `.keras` file restores the policy each layer was saved with), weights copied."""
    policy = keras.config.dtype_policy().name

    def retype(node):
        if isinstance(node, dict):
            if node.get("class_name") == "DTypePolicy" and node.get("config", {}).get("name") == "float32":
                node["config"]["name"] = policy
            for value in node.values():
                retype(value)
        elif isinstance(node, list):
            for value in node:
                retype(value)

    config = keras.saving.serialize_keras_object(model)
    retype(config)
    rebuilt = keras.saving.deserialize_keras_object(config)
    rebuilt.set_weights(model.get_weights())
    return rebuilt


# ---------------------------------------------------------------- epochs


def _read_state(backup_dir):
    path = os.path.join(backup_dir, STATE)
    if not os.path.isfile(path):
        return {"epochs_done": 0, "history": [], "checkpoint": None, "best": None}
    with open(path) as f:
        return json.load(f)


def _write_history(output_dir, history):
    keys = sorted({k for row in history for k in row} - {"epoch"})
    tmp = os.path.join(output_dir, f".{LOG}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, ["epoch", *keys])
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, os.path.join(output_dir, LOG))


def recover_run(output_dir):
    """Finishes an interrupted commit (moves a committed best model into place),
    removes what no committed state names, and rewrites history.csv from the
    state. Returns the state."""
    backup_dir = os.path.join(output_dir, BACKUP)
    state = _read_state(backup_dir)
    best = state.get("best") or {}
    candidate = best.get("candidate")
    if candidate and os.path.isfile(os.path.join(backup_dir, candidate)):
        os.replace(os.path.join(backup_dir, candidate), os.path.join(output_dir, BEST_MODEL))
    if os.path.isdir(backup_dir):
        for name in os.listdir(backup_dir):
            if name not in (STATE, state.get("checkpoint")):
                _remove(os.path.join(backup_dir, name))
    for name in os.listdir(output_dir):
        if name.startswith(".") and ".tmp" in name:
            _remove(os.path.join(output_dir, name))
    if state["history"] or os.path.exists(os.path.join(output_dir, LOG)):
        _write_history(output_dir, state["history"])
    return state


def _remove(path):
    try:
        os.remove(path)
    except OSError:
        pass


def run_commit(output_dir, inference_model, state):
    """A keras.callbacks.Callback that commits each finished epoch (see the module
    docstring) and restores the last committed one when training starts."""

    backup_dir = os.path.join(output_dir, BACKUP)

    class _Commit(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            if state["checkpoint"]:
                if self.model.optimizer is not None and not self.model.optimizer.built:
                    self.model.optimizer.build(self.model.trainable_variables)
                self.model.load_weights(os.path.join(backup_dir, state["checkpoint"]))

        def on_epoch_end(self, epoch, logs=None):
            row = {"epoch": epoch, **{k: float(v) for k, v in (logs or {}).items()}}
            best = state.get("best")
            value = row.get("val_accuracy", -1.0)
            improved = best is None or value > best["val_accuracy"]
            os.makedirs(backup_dir, exist_ok=True)
            if improved:
                candidate = f"best-epoch-{epoch:04d}.keras"
                save_atomically(inference_model.save, os.path.join(backup_dir, candidate))
                best = {"epoch": epoch, "val_accuracy": value, "candidate": candidate}
            checkpoint = f"epoch-{epoch:04d}.weights.h5"
            save_atomically(self.model.save_weights, os.path.join(backup_dir, checkpoint))
            new_state = {
                "epochs_done": epoch + 1,
                "history": [*state["history"], row],
                "checkpoint": checkpoint,
                "best": best,
            }
            _write_json(os.path.join(backup_dir, STATE), new_state)  # the commit
            state.clear()
            state.update(new_state)
            recover_run(output_dir)

    return _Commit()


# ---------------------------------------------------------------- the run


def finetune(
    data_dir=None,
    output_dir="sequencer_finetune",
    variant=None,
    weights=None,
    epochs=None,
    batch_size=None,
    image_size=None,
    crop_pct=None,
    learning_rate=None,
    weight_decay=None,
    warmup_epochs=None,
    label_smoothing=None,
    drop_path_rate=None,
    validation_fraction=None,
    augment=None,
    freeze_backbone=None,
    mixed_precision=None,
    seed=None,
    resume=False,
    distribute=False,
    verbose="auto",
    extra_callbacks=(),
):
    """Fine-tunes a Sequencer on `data_dir` (one sub-folder of images per class)
    and writes the run to `output_dir` (see the module docstring).

    Settings left at None take their default (`SETTINGS`) in a new run, and the
    recorded value when `resume=True`; `data_dir` may then be omitted too.
    `weights` is "imagenet", "none" (random), a weights file, or a `.keras`
    model, whose input size and class names are then used. Returns a dict of
    the results."""
    given = dict(
        variant=variant, weights=weights, epochs=epochs, batch_size=batch_size, image_size=image_size,
        crop_pct=crop_pct, learning_rate=learning_rate, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
        label_smoothing=label_smoothing, drop_path_rate=drop_path_rate, validation_fraction=validation_fraction,
        augment=augment, freeze_backbone=freeze_backbone, mixed_precision=mixed_precision, seed=seed,
    )
    settings, record = resolve_settings(output_dir, given, resume)
    if record is not None:
        if data_dir is not None and os.path.abspath(data_dir) != record["data_dir"]:
            raise FinetuneError(
                f"data folder {os.path.abspath(data_dir)} contradicts the run in {output_dir}, "
                f"which used {record['data_dir']}"
            )
        data_dir = record["data_dir"]
    if data_dir is None:
        raise FinetuneError("a data folder is needed (one sub-folder of images per class)")
    if distribute and keras.backend.backend() not in ("jax", "tensorflow"):
        distribution_scope(distribute)  # raises its one-line error before anything is written
    start = _check_settings(settings)

    paths, labels, class_names, unreadable = scan_image_folder(data_dir)
    if record is not None and record["class_names"] != class_names:
        raise FinetuneError(
            f"the class folders of {data_dir} changed since the run in {output_dir} began "
            f"({', '.join(class_names)} now, {', '.join(record['class_names'])} then)"
        )
    validation = stratified_split(labels, settings["validation_fraction"], settings["seed"])
    show = verbose != 0
    if show:
        _print_summary(data_dir, class_names, labels, validation, unreadable, settings)

    _write_run_record(output_dir, record, settings, data_dir, class_names)
    state = recover_run(output_dir)
    if show and state["epochs_done"]:
        best = state["best"] or {}
        print(f"resuming {output_dir} after epoch {state['epochs_done']} of {settings['epochs']}"
              + (f" (best validation accuracy {best['val_accuracy']:.3f})" if best else ""))

    with _global_settings_restored():
        keras.utils.set_random_seed(settings["seed"])
        if settings["mixed_precision"]:
            policy, note = mixed_precision_policy()
            keras.config.set_dtype_policy(policy)
            if show and note:
                print(f"note: {note}")
        model, train, val = _prepare(settings, class_names, paths, labels, validation, distribute, start)
        inference = _inference_twin(model)
        if state["epochs_done"] < settings["epochs"]:
            model.fit(
                train,
                validation_data=val,
                epochs=settings["epochs"],
                initial_epoch=state["epochs_done"],
                shuffle=False,  # the batches shuffle themselves, reproducibly per epoch
                callbacks=[run_commit(output_dir, inference, state), *extra_callbacks],
                verbose=verbose,
            )
    return _report(output_dir, model, val, class_names, unreadable, validation, state)


def _write_run_record(output_dir, record, settings, data_dir, class_names):
    """run.json (and classes.json) before anything else is written: a new run's
    record, or a resumed one's with its changed epochs."""
    if record is None:
        os.makedirs(output_dir, exist_ok=True)
        record = {
            "settings": settings,
            "data_dir": os.path.abspath(data_dir),
            "class_names": class_names,
            "keras_backend": keras.backend.backend(),
            "keras_version": keras.__version__,
            "keras_sequencer_version": _package_version(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        _write_json(os.path.join(output_dir, RUN_RECORD), record)
        _write_json(os.path.join(output_dir, CLASSES), class_names)
    elif record["settings"] != settings:
        record["settings"] = settings
        _write_json(os.path.join(output_dir, RUN_RECORD), record)


@contextlib.contextmanager
def _global_settings_restored():
    """Keras' global dtype policy and distribution, as they were before."""
    previous_policy = keras.config.dtype_policy()
    previous_distribution = keras.distribution.distribution()
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous_policy)
        keras.distribution.set_distribution(previous_distribution)


def _check_settings(settings):
    """Validates the settings before anything is written; returns the `.keras`
    starting model, if any, whose input size fills in `image_size`."""
    weights = settings["weights"]
    if settings["epochs"] < 1 or settings["batch_size"] < 1:
        raise FinetuneError("--epochs and --batch-size must be positive")
    if not 0.0 < settings["validation_fraction"] < 1.0:
        raise FinetuneError("--validation-split must be between 0 and 1")
    if not 0.0 < settings["crop_pct"] <= 1.0:
        raise FinetuneError("--crop-pct must be in (0, 1]")
    if weights not in ("none", "imagenet") and not os.path.isfile(weights):
        raise FinetuneError(f"no such weights file: {weights}")
    start = None
    if is_model_file(weights):
        try:
            start = load_model_file(weights)
        except ModelFileError as error:
            raise FinetuneError(str(error)) from None
        info = model_metadata(start)
        if settings["image_size"] is None or not info["dynamic_size"]:
            if settings["image_size"] not in (None, list(info["image_size"])):
                raise FinetuneError(
                    f"--image-size {_shown('image_size', settings['image_size'])} does not fit {weights}, "
                    f"which takes {info['image_size'][0]}x{info['image_size'][1]} images"
                )
            settings["image_size"] = list(info["image_size"])
        minimum = minimum_model_input_size(start)
        if min(settings["image_size"]) < minimum:
            raise FinetuneError(
                f"image size {_shown('image_size', settings['image_size'])} is too small for {weights}: "
                f"it needs at least {minimum}x{minimum}"
            )
        return start
    if settings["variant"] not in registry.MODEL_CONFIGS:
        raise FinetuneError(f"unknown variant {settings['variant']!r}")
    if settings["image_size"] is None:
        size = registry.MODEL_CONFIGS[settings["variant"]]["default_size"]
        settings["image_size"] = [size, size]
    min_size = minimum_input_size(registry.MODEL_CONFIGS[settings["variant"]]["arch"]["patch_sizes"])
    if min(settings["image_size"]) < min_size:
        raise FinetuneError(
            f"image size {_shown('image_size', settings['image_size'])} is too small for {settings['variant']}: "
            f"it needs at least {min_size}x{min_size} (its patch sizes multiply to {min_size})"
        )
    return None


def mixed_precision_policy():
    """(policy, note) for --mixed-precision: float16 where a GPU computes it,
    else bfloat16; the note says where bfloat16 on this CPU trains slower than
    float32 (BENCHMARKS.md, "Issue 13, twelfth round"), None where it does not."""
    if has_gpu():
        return "mixed_float16", None
    slower = "trains slower than float32 here; leave out --mixed-precision for speed"
    if cpu_has_bfloat16() is False:
        return "mixed_bfloat16", f"this CPU has no bfloat16 instructions (AVX512-BF16, AMX): bfloat16 {slower}"
    if keras.backend.backend() == "jax":
        return "mixed_bfloat16", f"on JAX, bfloat16 on a CPU (XLA's bfloat16 products) {slower}"
    return "mixed_bfloat16", None


def _print_summary(data_dir, class_names, labels, validation, unreadable, settings):
    counts = np.bincount(labels, minlength=len(class_names))
    held = np.bincount(labels[validation], minlength=len(class_names))
    print(f"{data_dir}: {len(labels)} images in {len(class_names)} classes; "
          f"{int((~validation).sum())} for training, {int(validation.sum())} for validation")
    width = max(len(n) for n in class_names)
    for name, count, val in zip(class_names, counts, held):
        print(f"  {name:<{width}}  {count:6d} ({count - val} training, {val} validation)")
    if unreadable:
        shown = ", ".join(os.path.relpath(p, data_dir) for p in unreadable[:5])
        more = f" and {len(unreadable) - 5} more" if len(unreadable) > 5 else ""
        print(f"  skipped {len(unreadable)} unreadable files ({shown}{more})")
    size = settings["image_size"]
    print(f"training at {size[0]}x{size[1]}, batch {settings['batch_size']}, {settings['epochs']} epochs")
    sys.stdout.flush()


def _prepare(settings, class_names, paths, labels, validation, distribute, start):
    image_size = tuple(settings["image_size"])
    batch_size = settings["batch_size"]
    steps_per_epoch = math.ceil((~validation).sum() / batch_size)
    with distribution_scope(distribute):
        model = build_model(settings, class_names, start)
        model.compile(
            optimizer=create_optimizer(
                model,
                settings["learning_rate"],
                weight_decay=settings["weight_decay"],
                total_steps=settings["epochs"] * steps_per_epoch,
                warmup_steps=settings["warmup_epochs"] * steps_per_epoch,
                global_clipnorm=1.0,
            ),
            loss=classification_loss(settings["label_smoothing"]),
            metrics=["accuracy"],
        )
    augment = None
    if settings["augment"]:
        augment = augmentation(image_size, rand_augment_magnitude=0, random_erasing=0, seed=settings["seed"])
    paths = np.asarray(paths)
    common = dict(num_classes=len(class_names), image_size=image_size, crop_pct=settings["crop_pct"],
                  batch_size=batch_size, seed=settings["seed"])
    train = image_batches(paths[~validation], labels[~validation], training=True, augment=augment, **common)
    val = image_batches(paths[validation], labels[validation], training=False, **common)
    return model, train, val


def _inference_twin(model):
    """The same layers as `model` (shared variables) without its optimizer: what
    best.keras holds."""
    return functional_model(model.inputs, model.outputs, model.name, metadata=getattr(model, "metadata", None))


def _report(output_dir, model, val, class_names, unreadable, validation, state):
    best_path = os.path.join(output_dir, BEST_MODEL)
    best_model = keras.models.load_model(best_path) if os.path.isfile(best_path) else model
    true, predicted = [], []
    for index in range(len(val)):
        images, one_hot = val[index]
        true.append(np.argmax(one_hot, axis=-1))
        predicted.append(np.argmax(keras.ops.convert_to_numpy(best_model.predict_on_batch(images)), axis=-1))
    true, predicted = np.concatenate(true), np.concatenate(predicted)
    if os.path.exists(os.path.join(output_dir, LOG)):
        plot_history_csv(os.path.join(output_dir, LOG), os.path.join(output_dir, "curves.png"))
    plot_confusion_matrix(true, predicted, class_names, os.path.join(output_dir, "confusion_matrix.png"))
    return {
        "accuracy": float((true == predicted).mean()),
        "classes": class_names,
        "train_images": int((~validation).sum()),
        "validation_images": int(validation.sum()),
        "skipped": len(unreadable),
        "epochs_done": state["epochs_done"],
        "optimizer_steps": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        "best_model": best_path,
        "best_epoch": (state.get("best") or {}).get("epoch"),
    }


def _package_version():
    try:
        from importlib.metadata import version

        return version("keras-sequencer")
    except Exception:  # not installed as a distribution (a source checkout)
        return "unknown"

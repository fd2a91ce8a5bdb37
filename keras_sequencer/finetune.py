"""Fine-tuning on a folder of images (one sub-folder per class), as
`keras-sequencer finetune` runs it: tf.data input, Keras callbacks for the best
model, the CSV log and resumable backups, and plots at the end."""

import json
import os
import sys

import numpy as np

from keras_sequencer.data import DataError, scan_image_folder, stratified_split

BEST_MODEL = "best.keras"
LOG = "history.csv"
BACKUP = "backup"
CLASSES = "classes.json"


class FinetuneError(DataError):
    """A problem with the data or the options, reported as one line."""


def image_dataset(paths, labels, num_classes, image_size, batch_size, training, seed, augment=None):
    """A tf.data pipeline (it feeds every Keras backend): decode, resize, optional
    augmentation, one-hot labels, batches, prefetch. Files that fail to decode
    are dropped rather than stopping the run. The training set repeats (fit with
    steps_per_epoch): with a dropped file its length is unknown, and Keras' loop
    would take an extra step to find the end of each epoch."""
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((list(paths), np.asarray(labels)))
    if training:
        dataset = dataset.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)

    def load(path, label):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        image = tf.image.resize(tf.cast(image, tf.float32), image_size, method="bicubic", antialias=True)
        image = tf.clip_by_value(image, 0.0, 255.0)
        return image, tf.one_hot(label, num_classes)

    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
    if training:
        dataset = dataset.repeat()
    dataset = dataset.batch(batch_size, drop_remainder=False)
    if augment is not None:
        dataset = dataset.map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


def distribution_scope(distribute):
    """The context in which to build and compile: data parallel over every local
    device (and every host, where the environment describes a cluster)."""
    import contextlib

    import keras

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


def build_model(variant, weights, num_classes, image_size, drop_path_rate, freeze_backbone):
    """The variant's backbone (ImageNet or given weights) with a new softmax head."""
    import keras

    from keras_sequencer.models import create_model, functional_model

    if weights is not None and str(weights).endswith(".keras"):
        # A saved Sequencer model (a checkpoint of an earlier fine-tune, say):
        # keep it whole, or give it a new head when the classes differ.
        model = keras.models.load_model(weights)
        fixed = [s for s in model.input_shape[1:3] if s is not None]
        if fixed and tuple(model.input_shape[1:3]) != tuple(image_size):
            raise FinetuneError(f"{weights} takes {model.input_shape[1]}x{model.input_shape[2]} images; "
                                f"pass --image-size {model.input_shape[1]}")
        if model.output_shape[-1] != num_classes:
            if "head" not in [layer.name for layer in model.layers]:
                raise FinetuneError(f"{weights} has no classification head to replace")
            model = functional_model(model.inputs, _new_head(model.get_layer("head").input, num_classes), model.name)
    else:
        backbone = create_model(
            variant,
            weights=weights,
            include_top=False,
            pooling="avg",
            input_shape=(image_size[0], image_size[1], 3),
            drop_path_rate=drop_path_rate,
        )
        model = functional_model(backbone.inputs, _new_head(backbone.outputs[0], num_classes), f"{variant}_finetuned")
    if freeze_backbone:
        for layer in model.layers:
            layer.trainable = layer.name in ("head", "predictions")
    return model


def _new_head(features, num_classes):
    """The same head layers as Sequencer2D's (Dense "head", float32 softmax "predictions")."""
    import keras

    logits = keras.layers.Dense(num_classes, name="head")(features)
    return keras.layers.Activation("softmax", dtype="float32", name="predictions")(logits)


def finetune(
    data_dir,
    output_dir,
    variant="sequencer2d_s",
    weights="imagenet",
    epochs=10,
    batch_size=32,
    image_size=224,
    learning_rate=1e-4,
    weight_decay=0.05,
    warmup_epochs=1,
    label_smoothing=0.1,
    drop_path_rate=0.1,
    validation_fraction=0.2,
    augment=True,
    freeze_backbone=False,
    mixed_precision=False,
    resume=False,
    distribute=False,
    seed=0,
    verbose="auto",
    extra_callbacks=(),
):
    """Fine-tunes `variant` on `data_dir` and writes to `output_dir`: best.keras
    (best validation accuracy), history.csv, curves.png, confusion_matrix.png,
    classes.json and backup/ (what `resume=True` continues from, optimizer state
    included). Returns a dict of the results."""
    import keras

    from keras_sequencer.layers import has_gpu
    from keras_sequencer.models import MODEL_CONFIGS, minimum_input_size
    from keras_sequencer.plots import plot_confusion_matrix, plot_history_csv
    from keras_sequencer.training import augmentation, classification_loss, create_optimizer

    if variant not in MODEL_CONFIGS:
        raise FinetuneError(f"unknown variant {variant!r}")
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    min_size = minimum_input_size(MODEL_CONFIGS[variant]["arch"]["patch_sizes"])
    if min(image_size) < min_size and not str(weights).endswith(".keras"):
        raise FinetuneError(
            f"image size {image_size[0]}x{image_size[1]} is too small for {variant}: "
            f"it needs at least {min_size}x{min_size} (its patch sizes multiply to {min_size})"
        )
    if epochs < 1 or batch_size < 1:
        raise FinetuneError("--epochs and --batch-size must be positive")
    if weights not in (None, "imagenet") and not os.path.isfile(weights):
        raise FinetuneError(f"no such weights file: {weights}")
    backup_dir = os.path.join(output_dir, BACKUP)
    if os.path.isdir(backup_dir) and os.listdir(backup_dir) and not resume:
        raise FinetuneError(
            f"{output_dir} holds an earlier run: pass --resume to continue it, or choose another --output"
        )
    if resume and not (os.path.isdir(backup_dir) and os.listdir(backup_dir)):
        raise FinetuneError(f"nothing to resume in {output_dir} (no {BACKUP}/ checkpoint)")

    paths, labels, class_names, unreadable = scan_image_folder(data_dir)
    if unreadable:
        shown = ", ".join(os.path.relpath(p, data_dir) for p in unreadable[:5])
        more = f" and {len(unreadable) - 5} more" if len(unreadable) > 5 else ""
        print(f"warning: skipped {len(unreadable)} unreadable files ({shown}{more})", file=sys.stderr)
    if resume:
        with open(os.path.join(output_dir, CLASSES)) as f:
            saved = json.load(f)
        if saved != class_names:
            raise FinetuneError(f"the class folders changed since the run in {output_dir} began")
    validation = stratified_split(labels, validation_fraction, seed)
    num_classes = len(class_names)

    keras.utils.set_random_seed(seed)
    if mixed_precision and str(weights).endswith(".keras"):
        print("warning: --mixed-precision applies to models built from --variant; "
              "a .keras model keeps the precision it was saved with", file=sys.stderr)
        mixed_precision = False
    if mixed_precision:
        # float16 where a GPU computes it; CPUs compute bfloat16 (AVX512-BF16, AMX).
        keras.mixed_precision.set_global_policy("mixed_float16" if has_gpu() else "mixed_bfloat16")
    try:
        steps_per_epoch = int(np.ceil((~validation).sum() / batch_size))
        with distribution_scope(distribute):
            model = build_model(variant, weights, num_classes, image_size, drop_path_rate, freeze_backbone)
            total = epochs * steps_per_epoch
            model.compile(
                optimizer=create_optimizer(
                    model,
                    learning_rate,
                    weight_decay=weight_decay,
                    total_steps=total,
                    warmup_steps=warmup_epochs * steps_per_epoch,
                    global_clipnorm=1.0,
                ),
                loss=classification_loss(label_smoothing),
                metrics=["accuracy"],
            )
        augment_layers = augmentation(image_size, rand_augment_magnitude=0, random_erasing=0, seed=seed) if augment else None
        train = image_dataset(
            np.asarray(paths)[~validation], labels[~validation], num_classes, image_size, batch_size,
            training=True, seed=seed, augment=augment_layers,
        )
        val = image_dataset(
            np.asarray(paths)[validation], labels[validation], num_classes, image_size, batch_size,
            training=False, seed=seed,
        )
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, CLASSES), "w") as f:
            json.dump(class_names, f)
        best_path = os.path.join(output_dir, BEST_MODEL)
        best = keras.callbacks.ModelCheckpoint(
            best_path,
            monitor="val_accuracy",
            mode="max",
            save_best_only=True,
            # A resumed run replaces best.keras only with a better model.
            initial_value_threshold=_best_logged(os.path.join(output_dir, LOG)) if resume else None,
        )
        model.fit(
            train,
            validation_data=val,
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            callbacks=[
                keras.callbacks.BackupAndRestore(backup_dir, delete_checkpoint=False),
                best,
                keras.callbacks.CSVLogger(os.path.join(output_dir, LOG), append=resume),
                *extra_callbacks,
            ],
            verbose=verbose,
        )
    finally:
        if mixed_precision:
            keras.mixed_precision.set_global_policy("float32")

    best_model = keras.models.load_model(best_path) if os.path.isfile(best_path) else model
    true, predicted = [], []
    for images, one_hot in val.as_numpy_iterator():
        true.append(np.argmax(one_hot, axis=-1))
        predicted.append(np.argmax(best_model.predict_on_batch(images), axis=-1))
    true, predicted = np.concatenate(true), np.concatenate(predicted)
    plot_history_csv(os.path.join(output_dir, LOG), os.path.join(output_dir, "curves.png"))
    plot_confusion_matrix(true, predicted, class_names, os.path.join(output_dir, "confusion_matrix.png"))
    return {
        "accuracy": float((true == predicted).mean()),
        "classes": class_names,
        "train_images": int((~validation).sum()),
        "validation_images": int(validation.sum()),
        "skipped": len(unreadable),
        "optimizer_steps": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        "best_model": best_path,
    }


def _best_logged(log_path):
    """The best validation accuracy logged so far (so a resumed run keeps the best model)."""
    import csv

    try:
        with open(log_path, newline="") as f:
            values = [float(row["val_accuracy"]) for row in csv.DictReader(f) if row.get("val_accuracy")]
    except (OSError, KeyError, ValueError):
        return None
    return max(values, default=None)

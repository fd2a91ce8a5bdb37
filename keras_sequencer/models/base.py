"""What every Sequencer model shares: the model class, its metadata, the
argument checks of the `keras.applications` signature, and the one head builder."""

import contextlib
import os

import keras

from keras_sequencer import keras_compat, registry
from keras_sequencer.imagenet import DEFAULT_CROP_PCT, normalization_layer
from keras_sequencer.layers import LAYER_NORM_EPSILON, PatchConv2D, cpu_has_amx

# None: jax_compiler_options decides by the CPU; tests set it.
JAX_WITHOUT_YNNPACK = None
# The XLA options of a compiled step without YNNPACK's fusions.
WITHOUT_YNNPACK = {"xla_cpu_experimental_ynn_fusion_type": ""}


def jax_compiler_options():
    """XLA options for a model's compiled JAX inference steps (evaluate,
    predict). XLA's CPU default hands products to YNNPACK, which on the AMX CPU
    measured ran this model's inference slower than XLA's own products
    (float32 batch 16: 0.80x timm with it, 1.04x without) but its training
    step faster (so fit keeps the default; BENCHMARKS.md, ninth and tenth
    rounds). On AMX CPUs only: on AMD CPUs it made no reliable difference. The
    option set in XLA_FLAGS wins."""
    chosen_by_user = any(name in os.environ.get("XLA_FLAGS", "") for name in WITHOUT_YNNPACK)
    if keras.backend.backend() != "jax" or chosen_by_user:
        return {}
    import jax

    without = JAX_WITHOUT_YNNPACK if JAX_WITHOUT_YNNPACK is not None else cpu_has_amx()
    if not without or jax.default_backend() != "cpu":
        return {}
    return dict(WITHOUT_YNNPACK)


@keras.saving.register_keras_serializable(package="keras_sequencer")
class FreeingFunctional(keras.Model):
    """A functional model that drops each layer's output once its last consumer
    has run. Keras' graph runner keeps every intermediate until the pass ends;
    eager backends (torch) then held every block's output (BENCHMARKS.md,
    memory at high resolution). Same layers, weights and config as a
    `keras.Model(inputs, outputs)`; a public subclass, so saved files load
    whatever happens to the internal it uses (see keras_compat).

    `metadata` (saved in the config, so it travels inside a `.keras` file)
    is what commands need to use the model: `class_names`, the
    `image_size` it was trained at, and its eval transform (`crop_pct`,
    `interpolation`). See `model_metadata`."""

    def __init__(self, *args, metadata=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.metadata = dict(metadata or {})

    def get_config(self):
        config = super().get_config()
        if self.metadata:
            config["metadata"] = dict(self.metadata)
        return config

    # JAX: Keras' compiled inference steps, with this model's XLA options.
    def make_test_function(self, force=False):
        with keras_compat.jax_steps_compiled_with(jax_compiler_options()):
            return super().make_test_function(force)

    def make_predict_function(self, force=False):
        with keras_compat.jax_steps_compiled_with(jax_compiler_options()):
            return super().make_predict_function(force)

    def predict_step(self, *args, **kwargs):
        # torch: `predict` and `predict_on_batch` run under inference mode (as
        # timm is timed), not only Keras' no_grad: less bookkeeping per op
        # (BENCHMARKS.md, "Issue 13, seventh round"). Their outputs leave as
        # numpy. A compiled predict keeps Keras' own step. The arguments pass
        # through: JAX's step also takes the model's state.
        if keras.backend.backend() == "torch" and not self.jit_compile:
            import torch

            if not torch.is_grad_enabled():
                with torch.inference_mode():
                    return super().predict_step(*args, **kwargs)
        return super().predict_step(*args, **kwargs)

    def _run_through_graph(self, inputs, operation_fn=lambda op: op, call_fn=None):
        outputs = keras_compat.run_graph_freeing(self, inputs, operation_fn, call_fn)
        if outputs is None:
            return super()._run_through_graph(inputs, operation_fn, call_fn)
        return outputs


class ModelFileError(ValueError):
    """A saved model that is missing or cannot be loaded: one line."""


def load_model_file(path):
    """`keras.models.load_model(path)` with one-line errors."""
    if not os.path.isfile(path):
        raise ModelFileError(f"no such model file: {path}")
    try:
        return keras.models.load_model(path)
    except Exception as error:  # Keras raises many types for foreign or damaged files
        raise ModelFileError(f"cannot load {path} as a Keras model: {str(error).splitlines()[0][:200]}") from None


def functional_model(inputs, outputs, name, metadata=None):
    """keras.Model(inputs, outputs, name), freeing intermediates where possible,
    carrying `metadata` (see FreeingFunctional). A one-element `inputs` list
    (`model.inputs`) becomes the tensor itself, so the model takes a bare array
    without Keras' input-structure warning."""
    if isinstance(inputs, (list, tuple)) and len(inputs) == 1:
        inputs = inputs[0]
    return FreeingFunctional(inputs=inputs, outputs=outputs, name=name, metadata=metadata)


def model_metadata(model):
    """What a model says about its use, with defaults filled in: `class_names`
    (None where the model does not name its classes), `image_size` ((h, w):
    the fixed input size, else the size it was trained at, else 224),
    `crop_pct` and `interpolation` of its eval transform, and
    `include_preprocessing` (whether it takes RGB in [0, 255])."""
    saved = dict(getattr(model, "metadata", None) or {})
    fixed = tuple(model.input_shape[1:3]) if len(model.input_shape) == 4 else (None, None)
    if None not in fixed:
        image_size = tuple(int(s) for s in fixed)
    elif saved.get("image_size"):
        image_size = tuple(int(s) for s in saved["image_size"])
    else:
        image_size = (224, 224)
    names = [layer.name for layer in model.layers]
    return {
        "class_names": list(saved["class_names"]) if saved.get("class_names") else None,
        "image_size": image_size,
        "crop_pct": float(saved.get("crop_pct", DEFAULT_CROP_PCT)),
        "interpolation": saved.get("interpolation", "bicubic"),
        "include_preprocessing": registry.PREPROCESSING in names,
        "dynamic_size": None in fixed,
    }


def minimum_input_size(patch_sizes):
    """The smallest input side a stack of patch embeddings (stride = kernel) accepts."""
    size = 1
    for patch in patch_sizes:
        size *= patch
    return size


def minimum_model_input_size(model):
    """The smallest input side `model` accepts: its patch embeddings' strides multiplied."""
    size = 1
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            size *= max(layer.strides)
    return size


def patch_embedding(x, dim, patch, name):
    """A stage's patch embedding: a convolution whose windows tile the map.
    Stride = kernel and "valid" padding drop a remainder like PyTorch's conv;
    lecun_normal is timm's init for these convs."""
    return PatchConv2D(
        dim, patch, strides=patch, padding="valid", kernel_initializer="lecun_normal", name=name
    )(x)


def drop_path_rates(layers_per_stage, drop_path_rate):
    """Linear stochastic-depth schedule over all blocks: rate * k / (N - 1)."""
    total = sum(layers_per_stage)
    if total <= 1:
        return [0.0] * total
    return [drop_path_rate * k / (total - 1) for k in range(total)]


def validate_weights_argument(weights):
    if weights in (None, "imagenet"):
        return
    if isinstance(weights, (str, os.PathLike)) and os.path.exists(weights):
        return
    raise ValueError(
        "The `weights` argument should be either `None` (random initialization), "
        "`imagenet` (pre-training on ImageNet), or the path to the weights file "
        f"to be loaded. Received: weights={weights!r}"
        + (" (no such file)" if isinstance(weights, (str, os.PathLike)) else "")
    )


def validate_head_arguments(include_top, pooling, weights, weights_variant, classes, name):
    """The `keras.applications` rules for the head and ImageNet weights; returns
    `include_top` resolved (None means True)."""
    include_top = True if include_top is None else bool(include_top)
    if pooling not in (None, "avg", "max"):
        raise ValueError(
            "`pooling` must be one of None, 'avg' or 'max'. "
            f"Received: pooling={pooling!r}"
        )
    validate_weights_argument(weights)
    if weights == "imagenet":
        if weights_variant is None:
            raise ValueError(
                f"No ImageNet weights are published for {name!r}. Use weights=None "
                "or a path to a weights file."
            )
        if include_top and classes != 1000:
            raise ValueError(
                'If using `weights="imagenet"` with `include_top=True`, '
                f"`classes` should be 1000. Received classes={classes}"
            )
    return include_top


def resolve_input_shape(input_shape, input_tensor, default_size, min_size, weights, include_preprocessing):
    """The (height, width, channels) the model takes, checked against what it needs."""
    if input_shape is None and input_tensor is not None:
        try:
            input_shape = tuple(keras.ops.shape(input_tensor)[1:])
        except Exception:  # non-Keras tensors without a static shape
            input_shape = None
    if input_shape is None:
        input_shape = (default_size, default_size, 3)
    input_shape = tuple(input_shape)
    if len(input_shape) != 3:
        raise ValueError(
            "`input_shape` must be a tuple of three integers (height, width, "
            f"channels). Received: input_shape={input_shape}"
        )
    if weights == "imagenet" and input_shape[-1] != 3:
        raise ValueError(
            "The input must have 3 channels when loading ImageNet weights. "
            f"Received: input_shape={input_shape}"
        )
    for size in input_shape[:2]:
        if size is not None and size < min_size:
            raise ValueError(
                f"Input size must be at least {min_size}x{min_size}. "
                f"Received: input_shape={input_shape}"
            )
    if include_preprocessing and input_shape[-1] != 3:
        raise ValueError(
            "`include_preprocessing=True` applies RGB ImageNet normalisation and "
            f"needs 3 input channels. Received: input_shape={input_shape}"
        )
    return input_shape


def model_input(input_shape, input_tensor):
    """(the tensor the layers start from, the model's inputs) for the
    `input_tensor`/`input_shape` arguments."""
    if input_tensor is None:
        image = keras.Input(shape=input_shape, name=registry.INPUT)
        return image, image
    if not keras.backend.is_keras_tensor(input_tensor):
        image = keras.Input(tensor=input_tensor, shape=input_shape)
        return image, image
    return input_tensor, keras.utils.get_source_inputs(input_tensor)


def building(fill):
    """The context a builder builds its layers in: when weights will fill every
    variable next (`fill`), initializers are not drawn."""
    return keras_compat.initializers_skipped() if fill is not None else contextlib.nullcontext()


def image_input(input_shape, input_tensor, include_preprocessing):
    """(the tensor the stages start from, the model's inputs): RGB in [0, 255]
    normalised as timm does when `include_preprocessing`."""
    x, inputs = model_input(input_shape, input_tensor)
    if include_preprocessing:
        x = normalization_layer(name=registry.PREPROCESSING)(x)
    return x, inputs


def top(x, include_top, pooling, classes, drop_rate, classifier_activation):
    """The final norm, then the head (include_top) or the `pooling` option."""
    x = keras.layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, name=registry.NORM)(x)
    if include_top:
        return classifier_head(x, classes, drop_rate, classifier_activation)
    return pooled(x, pooling)


def classifier_head(x, classes, drop_rate=0.0, classifier_activation="softmax", name_prefix=""):
    """The one classification head: average over the map, dropout, a Dense
    layer, the activation in float32 (mixed precision keeps a stable softmax).
    Fine-tuning builds its new head with this too."""
    x = keras.layers.GlobalAveragePooling2D(name=name_prefix + registry.POOL)(x)
    if drop_rate > 0:
        x = keras.layers.Dropout(drop_rate, name=name_prefix + registry.HEAD_DROPOUT)(x)
    x = keras.layers.Dense(classes, name=name_prefix + registry.HEAD)(x)
    return keras.layers.Activation(
        classifier_activation, dtype="float32", name=name_prefix + registry.PREDICTIONS
    )(x)


def pooled(x, pooling):
    """The `pooling` option of an include_top=False model."""
    if pooling == "avg":
        return keras.layers.GlobalAveragePooling2D(name=registry.POOL)(x)
    if pooling == "max":
        return keras.layers.GlobalMaxPooling2D(name="max_pool")(x)
    return x


def fast_predict(model, x, batch_size=32):
    """`model`'s outputs for the batch `x`, as numpy, by whichever call is quickest
    from a fresh process on this backend (BENCHMARKS.md, "Cold start against
    timm"): TensorFlow runs the model eagerly, in chunks of `batch_size`
    (`predict` first traces a graph); JAX and torch use `predict` (JAX compiles
    it once, where eager JAX compiles each recurrent loop on every call;
    torch's predict runs under inference mode). Same outputs as `model.predict`."""
    import numpy as np

    if keras.backend.backend() != "tensorflow":
        outputs = model.predict(x, verbose=0, batch_size=min(len(x), batch_size))
        return keras.tree.map_structure(np.asarray, outputs)  # a list for features_only models
    chunks = [
        keras.tree.map_structure(
            keras.ops.convert_to_numpy, model(x[start : start + batch_size], training=False)
        )
        for start in range(0, len(x), batch_size)
    ]
    return keras.tree.map_structure(lambda *parts: np.concatenate(parts, axis=0), *chunks)

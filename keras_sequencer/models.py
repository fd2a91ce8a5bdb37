"""Sequencer2D builders in the keras.applications style, and the variant registry."""

import collections
import contextlib
import numbers
import os

import keras

from keras_sequencer.imagenet import DEFAULT_CROP_PCT, normalization_layer
from keras_sequencer.layers import RNN_TYPES, UNIONS, Sequencer2DBlock, select_route

try:
    from keras.src.models.functional import Functional
except ImportError:  # internals moved: plain functional models
    Functional = None


if Functional is not None:

    @keras.saving.register_keras_serializable(package="keras_sequencer")
    class FreeingFunctional(Functional):
        """A functional model that drops each layer's output once its last consumer
        has run. Keras' graph runner keeps every intermediate until the pass ends;
        eager backends (torch) then held every block's output: 1.8x timm's peak
        memory at 896 px. Same layers, weights and config as keras.Model.

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

        def _run_through_graph(self, inputs, operation_fn=lambda op: op, call_fn=None):
            nodes_by_depth = getattr(self, "_nodes_by_depth", None)
            get_operation = getattr(self, "_get_operation_for_node", None)
            if nodes_by_depth is None or get_operation is None:
                return super()._run_through_graph(inputs, operation_fn, call_fn)
            nodes = [
                node
                for depth in sorted(nodes_by_depth, reverse=True)
                for node in nodes_by_depth[depth]
                if node.operation and not node.is_input
            ]
            uses = collections.Counter(id(x) for node in nodes for x in node.input_tensors)
            kept = {id(x) for x in self.outputs}
            tensor_dict = {id(x): y for x, y in zip(self.inputs, keras.tree.flatten(inputs))}
            for node in nodes:
                if any(id(x) not in tensor_dict for x in node.input_tensors):
                    continue  # not computable, as Keras skips it
                args, kwargs = node.arguments.fill_in(tensor_dict)
                op = operation_fn(node.operation if call_fn is not None else get_operation(node))
                outputs = call_fn(op, *args, **kwargs) if call_fn is not None else op(*args, **kwargs)
                del args, kwargs
                for x, y in zip(node.outputs, keras.tree.flatten(outputs)):
                    tensor_dict[id(x)] = y
                for x in node.input_tensors:
                    uses[id(x)] -= 1
                    if uses[id(x)] == 0 and id(x) not in kept:
                        tensor_dict.pop(id(x), None)
            if any(id(x) not in tensor_dict for x in self.outputs):
                return super()._run_through_graph(inputs, operation_fn, call_fn)  # Keras' error
            return keras.tree.pack_sequence_as(self._outputs_struct, [tensor_dict[id(x)] for x in self.outputs])


def functional_model(inputs, outputs, name, metadata=None):
    """keras.Model(inputs, outputs, name), freeing intermediates where possible,
    carrying `metadata` (see FreeingFunctional). A one-element `inputs` list
    (`model.inputs`) becomes the tensor itself, so the model takes a bare array
    without Keras' input-structure warning."""
    if isinstance(inputs, (list, tuple)) and len(inputs) == 1:
        inputs = inputs[0]
    if Functional is None:
        model = keras.Model(inputs=inputs, outputs=outputs, name=name)
        model.metadata = dict(metadata or {})
        return model
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
        "include_preprocessing": "preprocessing" in names,
        "dynamic_size": None in fixed,
    }


_S = dict(
    layers=(4, 3, 8, 3),
    patch_sizes=(7, 2, 1, 1),
    embed_dims=(192, 384, 384, 384),
    hidden_sizes=(48, 96, 96, 96),
    mlp_ratios=(3.0, 3.0, 3.0, 3.0),
    rnn_type="lstm",
    bidirectional=True,
    union="cat",
    with_fc=True,
)
_M = dict(_S, layers=(4, 3, 14, 3))
_L = dict(_S, layers=(8, 8, 16, 4))
_H2X = (96, 192, 192, 192)

# name -> architecture, default input size, and the pretrained weights it can load
# ("weights_variant"; the 392px variants reuse the 224px ImageNet weights, as the
# authors' code does).
MODEL_CONFIGS = {
    "sequencer2d_s": dict(arch=_S, default_size=224, weights_variant="sequencer2d_s"),
    "sequencer2d_m": dict(arch=_M, default_size=224, weights_variant="sequencer2d_m"),
    "sequencer2d_l": dict(arch=_L, default_size=224, weights_variant="sequencer2d_l"),
    "sequencer2d_s_392": dict(arch=_S, default_size=392, weights_variant="sequencer2d_s"),
    "sequencer2d_m_392": dict(arch=_M, default_size=392, weights_variant="sequencer2d_m"),
    "sequencer2d_l_392": dict(arch=_L, default_size=392, weights_variant="sequencer2d_l"),
    "sequencer2d_s_unidirectional": dict(arch=dict(_S, bidirectional=False)),
    "sequencer2d_s_add": dict(arch=dict(_S, union="add")),
    "sequencer2d_s_h2x": dict(arch=dict(_S, hidden_sizes=_H2X)),
    "sequencer2d_s_without_fc": dict(arch=dict(_S, with_fc=False)),
    "sequencer2d_vertical": dict(
        arch=dict(_S, hidden_sizes=_H2X, union="vertical", with_fc=False)
    ),
    "sequencer2d_s_horizontal": dict(
        arch=dict(_S, hidden_sizes=_H2X, union="horizontal", with_fc=False)
    ),
    "gru_sequencer2d_s": dict(arch=dict(_S, rnn_type="gru")),
    "rnn_sequencer2d_s": dict(arch=dict(_S, rnn_type="rnn")),
    "sequencer2d_l_d4_3x": dict(
        arch=dict(
            _L, embed_dims=(256, 512, 512, 512), hidden_sizes=(64, 128, 128, 128)
        )
    ),
}
for _name, _cfg in MODEL_CONFIGS.items():
    _cfg.setdefault("default_size", 224)
    _cfg.setdefault("weights_variant", None)


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


def list_models():
    """Names of every Sequencer variant the authors define."""
    return sorted(MODEL_CONFIGS)


def drop_path_rates(layers_per_stage, drop_path_rate):
    """Linear stochastic-depth schedule over all blocks: rate * k / (N - 1)."""
    total = sum(layers_per_stage)
    if total <= 1:
        return [0.0] * total
    return [drop_path_rate * k / (total - 1) for k in range(total)]


def _validate_weights_argument(weights):
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


def _resolve_input_shape(input_shape, input_tensor, default_size, min_size, weights):
    if input_shape is None and input_tensor is not None:
        try:
            input_shape = tuple(keras.ops.shape(input_tensor)[1:])
        except Exception:  # non-Keras tensors without a static shape
            input_shape = None
    if input_shape is None:
        return (default_size, default_size, 3)
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
    return input_shape


def feature_indices(num_stages, out_indices=None):
    """The stages a `features_only` model returns, in order, as timm resolves
    `out_indices`: None -> timm's default for Sequencer2d, (0, 1, 2); an int n
    -> the last n stages; a sequence -> those stages, negative ones counted
    from the end. Maps come back in stage order whatever the order given (timm
    does the same); a stage named twice is an error (timm drops the repeat)."""
    if out_indices is None:
        out_indices = tuple(range(min(3, num_stages)))
    if isinstance(out_indices, bool) or not isinstance(
        out_indices, (numbers.Integral, list, tuple)
    ):
        raise ValueError(
            "`out_indices` must be an int (the last n stages) or a list/tuple of "
            f"stage indices. Received: out_indices={out_indices!r}"
        )
    if isinstance(out_indices, numbers.Integral):
        out_indices = int(out_indices)
        if not 0 < out_indices <= num_stages:
            raise ValueError(
                f"`out_indices={out_indices}` asks for the last {out_indices} stages; "
                f"the model has {num_stages} (1 to {num_stages})."
            )
        return list(range(num_stages - out_indices, num_stages))
    if not out_indices:
        raise ValueError("`out_indices` must name at least one stage. Received: ()")
    take = []
    for index in out_indices:
        if isinstance(index, bool) or not isinstance(index, numbers.Integral):
            raise ValueError(
                f"`out_indices` must hold integers. Received: out_indices={out_indices!r}"
            )
        if not -num_stages <= index < num_stages:
            raise ValueError(
                f"Stage index {index} in out_indices={tuple(out_indices)} is out of "
                f"range: the model has {num_stages} stages (0 to {num_stages - 1}, "
                "or negative from the end)."
            )
        take.append(int(index) % num_stages)
    if len(set(take)) != len(take):
        raise ValueError(
            f"`out_indices` names a stage twice: out_indices={tuple(out_indices)} "
            f"(stages {take})."
        )
    return sorted(take)


def Sequencer2D(
    layers,
    patch_sizes,
    embed_dims,
    hidden_sizes,
    mlp_ratios,
    rnn_type="lstm",
    bidirectional=True,
    union="cat",
    with_fc=True,
    drop_rate=0.0,
    drop_path_rate=0.0,
    include_top=None,
    include_preprocessing=True,
    weights=None,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=1000,
    classifier_activation="softmax",
    name="sequencer2d",
    default_size=224,
    weights_variant=None,
    rnn_route="auto",
    features_only=False,
    out_indices=None,
):
    """Builds a Sequencer2D model from the reference configuration.

    The first five arguments are the reference's architecture lists (blocks,
    patch size, width, LSTM hidden size and MLP ratio per stage). The rest
    follow `keras.applications` (see `Sequencer2DS`). `weights_variant`
    names the registry entry whose ImageNet weights `weights="imagenet"` loads.
    `rnn_route` picks how every BiLSTM2D runs ("auto", "keras" or "fused"; see
    `layers.select_route`); one layer's `route` can be set after building.
    `features_only` and `out_indices` make a multi-scale feature extractor, as
    timm's `features_only=True` does (see `Sequencer2DS`).
    """
    arch_lists = (layers, patch_sizes, embed_dims, hidden_sizes, mlp_ratios)
    if len({len(a) for a in arch_lists}) != 1:
        raise ValueError(
            "layers, patch_sizes, embed_dims, hidden_sizes and mlp_ratios must "
            f"have the same length. Received lengths {[len(a) for a in arch_lists]}"
        )
    if rnn_type not in RNN_TYPES:
        raise ValueError(f"Unrecognized rnn_type: {rnn_type!r}. Expected one of {RNN_TYPES}.")
    if union not in UNIONS:
        raise ValueError("Unrecognized union: " + str(union))
    select_route(rnn_route, rnn_type)
    take = None
    if features_only:
        if include_top:
            raise ValueError(
                "`features_only=True` returns the stages' feature maps and has no "
                "classification head: leave `include_top` unset (or False). "
                f"Received: include_top={include_top!r}"
            )
        if pooling is not None:
            raise ValueError(
                "`features_only=True` returns unpooled 4D feature maps; `pooling` "
                f"does not apply. Received: pooling={pooling!r}"
            )
        take = feature_indices(len(layers), out_indices)
        include_top = False
    elif out_indices is not None:
        raise ValueError(
            "`out_indices` selects the feature maps of a `features_only=True` "
            f"model. Received: out_indices={out_indices!r} with features_only=False"
        )
    include_top = True if include_top is None else bool(include_top)
    if pooling not in (None, "avg", "max"):
        raise ValueError(
            "`pooling` must be one of None, 'avg' or 'max'. "
            f"Received: pooling={pooling!r}"
        )
    _validate_weights_argument(weights)
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
    min_size = minimum_input_size(patch_sizes)
    input_shape = _resolve_input_shape(
        input_shape, input_tensor, default_size, min_size, weights
    )
    if include_preprocessing and input_shape[-1] != 3:
        raise ValueError(
            "`include_preprocessing=True` applies RGB ImageNet normalisation and "
            f"needs 3 input channels. Received: input_shape={input_shape}"
        )

    # Fetch and read weights before the (slow) build, so that a network error or
    # a bad file is reported at once.
    from keras_sequencer import weights as weights_lib

    fill_weights = None if weights is None else weights_lib.weights_loader(weights, weights_variant)

    with contextlib.ExitStack() as stack:
        if getattr(fill_weights, "assigns_every_variable", False):
            # Random values that the weights file overwrites next are not drawn.
            stack.enter_context(weights_lib.initializers_skipped())
        if input_tensor is None:
            img_input = keras.Input(shape=input_shape, name="input_layer")
        elif not keras.backend.is_keras_tensor(input_tensor):
            img_input = keras.Input(tensor=input_tensor, shape=input_shape)
        else:
            img_input = input_tensor

        x = img_input
        if include_preprocessing:
            x = normalization_layer(name="preprocessing")(x)  # RGB [0, 255] in, as timm normalises

        rates = drop_path_rates(layers, drop_path_rate)
        block_index = 0
        stage_outputs, feature_info = [], []
        reduction = 1
        # A features_only model stops after its last chosen stage, as timm's does.
        # Checkpoints and ImageNet weights fill the whole include_top=False model
        # (below), so it is built; a Keras .weights.h5 loads by layer name into
        # the features model itself.
        fill_backbone = take is not None and fill_weights is not None and not (
            weights != "imagenet" and weights_lib.is_keras_weights_file(weights)
        )
        last_stage = len(layers) - 1 if take is None or fill_backbone else max(take)
        for stage, depth in enumerate(layers[: last_stage + 1]):
            # Stride = kernel and "valid" padding drop a remainder like PyTorch's conv.
            conv_name = "stem" if stage == 0 else f"stages_{stage}_downsample"
            x = keras.layers.Conv2D(
                embed_dims[stage],
                patch_sizes[stage],
                strides=patch_sizes[stage],
                padding="valid",
                kernel_initializer="lecun_normal",  # timm's init for these convs
                name=conv_name,
            )(x)
            for block in range(depth):
                x = Sequencer2DBlock(
                    hidden_sizes[stage],
                    mlp_ratio=mlp_ratios[stage],
                    rnn_type=rnn_type,
                    bidirectional=bidirectional,
                    union=union,
                    with_fc=with_fc,
                    drop_rate=drop_rate,
                    drop_path_rate=rates[block_index],
                    rnn_route=rnn_route,
                    name=f"stages_{stage}_blocks_{block}",
                )(x)
                block_index += 1
            # timm's feature for stage s: the output of `stages.{s}` (its last
            # block), before the final norm.
            reduction *= patch_sizes[stage]
            stage_outputs.append(x)
            feature_info.append(
                dict(
                    num_chs=int(embed_dims[stage]),
                    reduction=int(reduction),
                    module=f"stages.{stage}",
                    index=stage,
                    layer=f"stages_{stage}_blocks_{depth - 1}" if depth else conv_name,
                )
            )
        inputs = (
            keras.utils.get_source_inputs(input_tensor)
            if input_tensor is not None
            else img_input
        )
        metadata = {"image_size": [default_size, default_size]}
        if take is None or fill_backbone:
            x = keras.layers.LayerNormalization(epsilon=1e-6, name="norm")(x)

        if take is not None:
            metadata["feature_info"] = [feature_info[i] for i in take]
            model = filled = functional_model(
                inputs, [stage_outputs[i] for i in take], name, metadata=metadata
            )
            if fill_backbone:
                # The include_top=False model: the features model shares its
                # layers, so the rules of include_top=False loads cover both.
                filled = functional_model(inputs, x, name)
        else:
            if include_top:
                x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
                if drop_rate > 0:
                    x = keras.layers.Dropout(drop_rate, name="head_dropout")(x)
                x = keras.layers.Dense(classes, name="head")(x)
                # float32 output so mixed precision keeps a stable softmax.
                x = keras.layers.Activation(
                    classifier_activation, dtype="float32", name="predictions"
                )(x)
            elif pooling == "avg":
                x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
            elif pooling == "max":
                x = keras.layers.GlobalMaxPooling2D(name="max_pool")(x)
            model = filled = functional_model(inputs, x, name, metadata=metadata)

    if fill_weights is not None:
        fill_weights(filled)
    return model


def _builder(variant, model_name):
    arch = MODEL_CONFIGS[variant]["arch"]
    default_size = MODEL_CONFIGS[variant]["default_size"]

    def builder(
        include_top=None,
        include_preprocessing=True,
        weights="imagenet",
        input_tensor=None,
        input_shape=None,
        pooling=None,
        classes=1000,
        classifier_activation="softmax",
        name=model_name,
        drop_rate=0.0,
        drop_path_rate=0.0,
        rnn_route="auto",
        features_only=False,
        out_indices=None,
    ):
        return Sequencer2D(
            **arch,
            features_only=features_only,
            out_indices=out_indices,
            drop_rate=drop_rate,
            drop_path_rate=drop_path_rate,
            rnn_route=rnn_route,
            include_top=include_top,
            include_preprocessing=include_preprocessing,
            weights=weights,
            input_tensor=input_tensor,
            input_shape=input_shape,
            pooling=pooling,
            classes=classes,
            classifier_activation=classifier_activation,
            name=name,
            default_size=default_size,
            weights_variant=MODEL_CONFIGS[variant]["weights_variant"],
        )

    builder.__name__ = model_name.replace("sequencer2d", "Sequencer2D")
    builder.__doc__ = BUILDER_DOC.format(variant=variant, size=default_size)
    return builder


BUILDER_DOC = """Instantiates the {variant} architecture (Tatsunami & Taki, NeurIPS 2022).

    Args:
        include_top: whether to include the classification head (default True;
            False with `features_only`, where True is an error).
        include_preprocessing: if True (default) the model takes RGB values in
            [0, 255] and applies timm's ImageNet normalisation inside. If False it
            takes already-normalised input, as timm does.
        weights: None (random), "imagenet", or a path to a weights file.
        input_tensor: optional Keras tensor to use as the model input.
        input_shape: optional (height, width, 3); defaults to ({size}, {size}, 3).
            Any size works, including (None, None, 3).
        pooling: with include_top=False, None (4D feature map), "avg" or "max".
            Not with `features_only`.
        classes: number of classes when include_top=True.
        classifier_activation: activation of the top layer ("softmax" or None).
        name: the model name.
        drop_rate: dropout in the MLPs and before the head.
        drop_path_rate: stochastic depth rate of the last block (linear schedule).
        rnn_route: how the BiLSTM2D layers run: "auto" (default), "keras" (Keras'
            own loops; cuDNN on GPU) or "fused" (PyTorch's fused kernels, torch
            backend only). Same weights and results either way.

    Returns:
        A `keras.Model`.
    """

Sequencer2DS = _builder("sequencer2d_s", "sequencer2d_s")
Sequencer2DM = _builder("sequencer2d_m", "sequencer2d_m")
Sequencer2DL = _builder("sequencer2d_l", "sequencer2d_l")
Sequencer2DS.__name__, Sequencer2DM.__name__, Sequencer2DL.__name__ = (
    "Sequencer2DS",
    "Sequencer2DM",
    "Sequencer2DL",
)


def create_model(name, **kwargs):
    """Builds a registered variant by name (see `list_models()`).

    kwargs pass to `Sequencer2D`. `weights` defaults to None here, as timm's
    `create_model` defaults to `pretrained=False`.
    """
    if name not in MODEL_CONFIGS:
        raise ValueError(
            f"Unknown model {name!r}. Available models: {', '.join(list_models())}"
        )
    config = MODEL_CONFIGS[name]
    arch = dict(config["arch"])
    arch.update(
        default_size=config["default_size"],
        weights_variant=config["weights_variant"],
        name=name,
        weights=None,
    )
    arch.update(kwargs)
    return Sequencer2D(**arch)


def fast_predict(model, x, batch_size=32):
    """`model`'s outputs for the batch `x`, as numpy, by whichever call is quickest
    from a fresh process on this backend (a cold start's first prediction;
    BENCHMARKS.md, "Cold start against timm"): TensorFlow runs the model
    eagerly, in chunks of `batch_size` (`predict` first traces a graph: 4.6 s
    of CPU against 0.8 s eagerly for sequencer2d_s); JAX and torch use `predict`
    (JAX compiles it once, where eager JAX compiles each recurrent loop on every
    call: 6 s against 22 s; torch's predict runs under no_grad). Same outputs
    as `model.predict`."""
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

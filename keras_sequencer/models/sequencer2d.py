"""The Sequencer2D builder (the paper's S/M/L and the authors' ablations) in
the `keras.applications` style, and `features_only` feature extractors."""

import numbers

import keras

from keras_sequencer import registry
from keras_sequencer import weights as weights_lib
from keras_sequencer.layers import RNN_TYPES, UNIONS, Sequencer2DBlock, select_route
from keras_sequencer.models.base import (
    building,
    drop_path_rates,
    functional_model,
    image_input,
    minimum_input_size,
    patch_embedding,
    resolve_input_shape,
    top,
    validate_head_arguments,
)


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
    _validate_architecture(layers, patch_sizes, embed_dims, hidden_sizes, mlp_ratios, rnn_type, union, rnn_route)
    take, include_top = _validate_features(features_only, out_indices, include_top, pooling, len(layers))
    include_top = validate_head_arguments(include_top, pooling, weights, weights_variant, classes, name)
    input_shape = resolve_input_shape(
        input_shape, input_tensor, default_size, minimum_input_size(patch_sizes), weights, include_preprocessing
    )
    # Fetched and read before the (slow) build, so that a network error or a
    # bad file is reported at once.
    fill = weights_lib.weights_loader(weights, weights_variant)

    with building(fill):
        x, inputs = image_input(input_shape, input_tensor, include_preprocessing)
        # A features_only model stops after its last chosen stage, as timm's does.
        last_stage = len(layers) - 1 if take is None else max(take)
        stage_outputs, feature_info = _stages(
            x, layers[: last_stage + 1], patch_sizes, embed_dims, hidden_sizes, mlp_ratios,
            drop_path_rates(layers, drop_path_rate),
            dict(rnn_type=rnn_type, bidirectional=bidirectional, union=union, with_fc=with_fc,
                 drop_rate=drop_rate, rnn_route=rnn_route),
        )
        metadata = {"image_size": [default_size, default_size]}
        if take is not None:
            metadata["feature_info"] = [feature_info[i] for i in take]
            model = functional_model(inputs, [stage_outputs[i] for i in take], name, metadata=metadata)
        else:
            x = top(stage_outputs[-1], include_top, pooling, classes, drop_rate, classifier_activation)
            model = functional_model(inputs, x, name, metadata=metadata)
    if fill is not None:
        fill(model)
    return model


def _validate_architecture(layers, patch_sizes, embed_dims, hidden_sizes, mlp_ratios, rnn_type, union, rnn_route):
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


def _validate_features(features_only, out_indices, include_top, pooling, num_stages):
    """(the stages a features_only model returns or None, include_top)."""
    if not features_only:
        if out_indices is not None:
            raise ValueError(
                "`out_indices` selects the feature maps of a `features_only=True` "
                f"model. Received: out_indices={out_indices!r} with features_only=False"
            )
        return None, include_top
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
    return feature_indices(num_stages, out_indices), False


def _stages(x, layers, patch_sizes, embed_dims, hidden_sizes, mlp_ratios, rates, block_options):
    """Runs `x` through the stages; returns each stage's output and timm's
    `feature_info` for it (the output of `stages.{s}`, before the final norm)."""
    stage_outputs, feature_info = [], []
    block_index, reduction = 0, 1
    for stage, depth in enumerate(layers):
        conv_name = registry.STEM if stage == 0 else registry.downsample_name(stage)
        x = patch_embedding(x, embed_dims[stage], patch_sizes[stage], conv_name)
        for block in range(depth):
            x = Sequencer2DBlock(
                hidden_sizes[stage],
                mlp_ratio=mlp_ratios[stage],
                drop_path_rate=rates[block_index],
                name=registry.block_name(stage, block),
                **block_options,
            )(x)
            block_index += 1
        reduction *= patch_sizes[stage]
        stage_outputs.append(x)
        feature_info.append(
            dict(
                num_chs=int(embed_dims[stage]),
                reduction=int(reduction),
                module=f"stages.{stage}",
                index=stage,
                layer=registry.block_name(stage, depth - 1) if depth else conv_name,
            )
        )
    return stage_outputs, feature_info


def _builder(variant, model_name):
    config = registry.model_config(variant)
    arch, default_size = config["arch"], config["default_size"]

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
            weights_variant=config["weights_variant"],
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
            own loops; cuDNN on GPU) or "fused" (the backend's fused sequence
            kernels: torch, and TensorFlow and JAX for LSTM). Same weights and results
            either way; see `layers.select_route`.

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

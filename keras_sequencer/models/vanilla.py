"""The vanilla Sequencer (the authors' models/vanilla_sequencer.py): the
Sequencer2D block with BiLSTM2D replaced by one bidirectional LSTM over the
token sequence flattened row-major, and an optional absolute position
embedding. No ImageNet weights are published for it."""


import keras
from keras import layers, ops

from keras_sequencer import keras_compat, registry
from keras_sequencer import weights as weights_lib
from keras_sequencer.layers import (
    LAYER_NORM_EPSILON,
    BiasFusedDense,
    DropPath,
    cudnn_disabled,
    directions_of,
    gelu_exact,
    jax_fused_lstm,
    make_recurrent_layer,
    select_route,
    tensorflow_fused_lstm,
    torch_fused_rnn,
)
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


def _identity(x, training=None):
    return x


def _serializable(cls):
    return keras.saving.register_keras_serializable(package="keras_sequencer")(cls)


@_serializable
class VanillaSequencerBlock(layers.Layer):
    """Pre-norm residual block: x + DropPath(BiLSTM(LN(x))), x + DropPath(Mlp(LN(x))).

    The BiLSTM reads the (B, H, W, C) map as B sequences of H*W tokens in
    row-major order. There is no fusing Dense: 2 * hidden_size must equal C.
    `rnn_route` picks how the BiLSTM runs, as for BiLSTM2D (see
    `layers.select_route`): one Keras `Bidirectional(LSTM)` (cuDNN on a GPU)
    or the backend's fused kernel over the same variables, which on CPU is
    several times faster than Keras' loop over the long token sequence.
    """

    def __init__(self, hidden_size, mlp_ratio=3.0, drop_rate=0.0, drop_path_rate=0.0, rnn_route="auto",
                 **kwargs):
        super().__init__(**kwargs)
        self.rnn_route = rnn_route
        self.hidden_size = int(hidden_size)
        self.mlp_ratio = float(mlp_ratio)
        self.drop_rate = float(drop_rate)
        self.drop_path_rate = float(drop_path_rate)
        policy = self.dtype_policy
        self.norm1 = layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, name="norm1", dtype=policy)
        rnn = make_recurrent_layer("lstm", self.hidden_size, name="rnn", dtype=policy)
        # Bidirectional copies its layer through serialization: see keras_compat.
        with keras_compat.outside_object_sharing_scope(), keras_compat.tensorflow_left_unimported():
            self.rnn_tokens = layers.Bidirectional(rnn, merge_mode="concat", name="rnn_tokens", dtype=policy)
        self.norm2 = layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, name="norm2", dtype=policy)
        self.drop_path = DropPath(drop_path_rate, name="drop_path", dtype=policy)
        self.mlp_dropout = layers.Dropout(drop_rate, name="mlp_dropout", dtype=policy)
        self.fc1 = None
        self.fc2 = None

    @property
    def rnn_route(self):
        return self._rnn_route

    @rnn_route.setter
    def rnn_route(self, route):
        # Validated on assignment, so a per-layer override fails at once.
        self.selected_route = select_route(route, "lstm")
        self._rnn_route = route
        # BlockLSTM has no XLA kernel.
        self.supports_jit = not (self.selected_route == "fused" and keras.backend.backend() == "tensorflow")

    def build(self, input_shape):
        dim = input_shape[-1]
        if dim is None:
            raise ValueError("VanillaSequencerBlock needs a known channel dimension.")
        if 2 * self.hidden_size != dim:
            # Same check and wording as the reference implementation's BiLSTM2D.
            raise ValueError(
                f"The output channel {2 * self.hidden_size} is different from the input channel {dim}."
            )
        policy = self.dtype_policy
        self.norm1.build(input_shape)
        self.rnn_tokens.build((None, None, dim))
        self.norm2.build(input_shape)
        # Built here too: an unbuilt sublayer makes JAX's predict() run eagerly once.
        self.drop_path.build(input_shape)
        self.mlp_dropout.build(input_shape)
        hidden = int(self.mlp_ratio * dim)
        mlp_bias = keras.initializers.RandomNormal(stddev=1e-6)  # timm's Mlp init, as Sequencer2D
        self.fc1 = BiasFusedDense(hidden, bias_initializer=mlp_bias, name="fc1", dtype=policy)
        self.fc1.build(input_shape)
        self.fc2 = BiasFusedDense(dim, bias_initializer=mlp_bias, name="fc2", dtype=policy)
        self.fc2.build(tuple(input_shape[:-1]) + (hidden,))

    def call(self, x, training=None):
        drop_path = self.drop_path if training and self.drop_path_rate > 0 else _identity
        dropout = self.mlp_dropout if training and self.drop_rate > 0 else _identity
        shape = ops.shape(x)
        batch, height, width, channels = shape[0], shape[1], shape[2], x.shape[-1]
        tokens = ops.reshape(self.norm1(x), (batch, height * width, channels))
        tokens = ops.reshape(self._run(tokens, training), (batch, height, width, channels))
        x = x + drop_path(tokens, training=training)
        y = gelu_exact(self.fc1(self.norm2(x)))
        y = dropout(y, training=training)
        y = dropout(self.fc2(y), training=training)
        return x + drop_path(y, training=training)

    def _run(self, sequences, training):
        # The same choices as BiLSTM2D._run, for one Bidirectional(LSTM).
        float32 = keras.backend.standardize_dtype(sequences.dtype) == "float32"
        if self.selected_route == "fused":
            if keras.backend.backend() == "torch":
                return torch_fused_rnn(self.rnn_tokens, "lstm", sequences)
            if keras.backend.backend() == "jax":
                return ops.squeeze(jax_fused_lstm(self.rnn_tokens, ops.expand_dims(sequences, 2), 1), 2)
            if float32:
                return tensorflow_fused_lstm(self.rnn_tokens, sequences, training)
            # Mixed precision on TensorFlow: Keras' loop, which takes any dtype.
        if keras.backend.backend() == "jax" and not float32:
            # JAX's cuDNN RNN fails to lower bfloat16 (see BiLSTM2D._run).
            with cudnn_disabled(directions_of(self.rnn_tokens)):
                return self.rnn_tokens(sequences)
        return self.rnn_tokens(sequences)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "rnn_route": self.rnn_route,
            "hidden_size": self.hidden_size,
            "mlp_ratio": self.mlp_ratio,
            "drop_rate": self.drop_rate,
            "drop_path_rate": self.drop_path_rate,
        }


def _cubic(x):
    """The bicubic kernel with a = -0.5 (Keys; PIL), which PyTorch's antialiased
    bicubic uses (its plain bicubic uses a = -0.75)."""
    x = ops.abs(x)
    near = (1.5 * x - 2.5) * x * x + 1.0
    far = ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0
    return ops.where(x < 1.0, near, ops.where(x < 2.0, far, ops.zeros_like(x)))


def _resampling_matrix(out_size, in_size):
    """(out_size, in_size) weights of `F.interpolate(mode="bicubic",
    align_corners=False, antialias=True)` along one axis. Antialiasing widens the
    kernel by the scale when shrinking; each row is normalised over the inputs
    that exist, so edges need no padding. `out_size` may be a symbolic size."""
    scale = float(in_size) / ops.cast(out_size, "float32")
    stretch = ops.where(scale >= 1.0, 1.0 / scale, 1.0)
    centers = (ops.arange(out_size, dtype="float32") + 0.5) * scale
    sources = ops.arange(in_size, dtype="float32") + 0.5
    weights = _cubic((sources[None, :] - centers[:, None]) * stretch)
    return weights / ops.sum(weights, axis=1, keepdims=True)


def resample_position_embedding(embedding, height, width):
    """A (1, gh, gw, C) embedding resampled to (1, height, width, C) in float32,
    as timm's `resample_abs_pos_embed` does for ViT (bicubic, antialiased)."""
    embedding = ops.cast(embedding, "float32")
    rows = _resampling_matrix(height, embedding.shape[1])
    columns = _resampling_matrix(width, embedding.shape[2])
    embedding = ops.einsum("wj,nijc->niwc", columns, embedding)  # PyTorch resizes width first
    return ops.einsum("hi,niwc->nhwc", rows, embedding)


@_serializable
class AbsolutePositionEmbedding(layers.Layer):
    """Adds a learned (1, grid_h, grid_w, C) embedding to a (B, H, W, C) map.

    At its own grid it is added as it is (the reference); at any other grid it
    is first resampled as timm resamples ViT position embeddings.
    """

    def __init__(self, grid_size, **kwargs):
        super().__init__(**kwargs)
        self.grid_size = tuple(int(s) for s in grid_size)
        self.embedding = None

    def build(self, input_shape):
        self.embedding = self.add_weight(
            shape=(1, *self.grid_size, input_shape[-1]),
            # timm's trunc_normal_(std=0.02) truncates at +-2 (100 std): a normal.
            initializer=keras.initializers.RandomNormal(stddev=0.02),
            name="embedding",
        )

    def call(self, x):
        if tuple(x.shape[1:3]) == self.grid_size:
            return x + ops.cast(self.embedding, x.dtype)
        shape = ops.shape(x)
        return x + ops.cast(resample_position_embedding(self.embedding, shape[1], shape[2]), x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "grid_size": self.grid_size}


def VanillaSequencer(
    layers,
    patch_sizes,
    embed_dims,
    hidden_sizes,
    mlp_ratios,
    ape=False,
    *,
    include_top=None,
    include_preprocessing=True,
    weights=None,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=1000,
    classifier_activation="softmax",
    name="vanilla_sequencer",
    default_size=224,
    weights_variant=None,
    drop_rate=0.0,
    drop_path_rate=0.0,
    rnn_route="auto",
):
    """Builds a vanilla Sequencer from the reference configuration.

    The first five arguments are the reference's architecture lists (blocks,
    patch size, width, LSTM hidden size and MLP ratio per stage; 2 * hidden
    must equal the width). `ape` adds an absolute position embedding after the
    stem, made for the `default_size / patch_sizes[0]` grid and resampled for
    other input sizes. `rnn_route` picks how every BiLSTM runs ("auto", "keras"
    or "fused"; see `layers.select_route`). The rest follow `keras.applications`
    (see `VSequencerS`).
    """
    _validate_architecture(layers, patch_sizes, embed_dims, hidden_sizes, mlp_ratios, ape)
    select_route(rnn_route, "lstm")
    include_top = validate_head_arguments(include_top, pooling, weights, weights_variant, classes, name)
    input_shape = resolve_input_shape(
        input_shape, input_tensor, default_size, minimum_input_size(patch_sizes), weights, include_preprocessing
    )
    # Fetched and read before the (slow) build, so that a bad file is reported at once.
    fill = weights_lib.weights_loader(weights, weights_variant)

    with building(fill):
        x, inputs = image_input(input_shape, input_tensor, include_preprocessing)
        x = patch_embedding(x, embed_dims[0], patch_sizes[0], registry.STEM)
        if ape:
            grid = default_size // patch_sizes[0]
            x = AbsolutePositionEmbedding((grid, grid), name=registry.POSITION_EMBEDDING)(x)
        x = _stages(x, layers, patch_sizes, embed_dims, hidden_sizes, mlp_ratios,
                    dict(drop_rate=drop_rate, rnn_route=rnn_route), drop_path_rates(layers, drop_path_rate))
        x = top(x, include_top, pooling, classes, drop_rate, classifier_activation)
        model = functional_model(inputs, x, name, metadata={"image_size": [default_size, default_size]})
    if fill is not None:
        fill(model)
    return model


def _validate_architecture(layers, patch_sizes, embed_dims, hidden_sizes, mlp_ratios, ape):
    arch_lists = (layers, patch_sizes, embed_dims, hidden_sizes, mlp_ratios)
    if len({len(a) for a in arch_lists}) != 1:
        raise ValueError(
            "layers, patch_sizes, embed_dims, hidden_sizes and mlp_ratios must "
            f"have the same length. Received lengths {[len(a) for a in arch_lists]}"
        )
    for stage, (dim, hidden) in enumerate(zip(embed_dims, hidden_sizes)):
        if 2 * hidden != dim:
            raise ValueError(
                "The vanilla Sequencer's BiLSTM has no fusing layer, so 2 * hidden_sizes "
                f"must equal embed_dims. Stage {stage}: hidden {hidden}, width {dim}."
            )
    if not isinstance(ape, bool):
        raise ValueError(f"`ape` must be True or False. Received: ape={ape!r}")


def _stages(x, layers, patch_sizes, embed_dims, hidden_sizes, mlp_ratios, block_options, rates):
    block_index = 0
    for stage, depth in enumerate(layers):
        if stage > 0:  # the reference's Downsample2D, a 1x1 conv where the patch is 1
            x = patch_embedding(x, embed_dims[stage], patch_sizes[stage], registry.downsample_name(stage))
        for block in range(depth):
            x = VanillaSequencerBlock(
                hidden_sizes[stage],
                mlp_ratio=mlp_ratios[stage],
                drop_path_rate=rates[block_index],
                name=registry.block_name(stage, block),
                **block_options,
            )(x)
            block_index += 1
    return x


def _builder(variant, function_name):
    config = registry.model_config(variant)

    def builder(
        include_top=None,
        include_preprocessing=True,
        weights=None,
        input_tensor=None,
        input_shape=None,
        pooling=None,
        classes=1000,
        classifier_activation="softmax",
        name=variant,
        drop_rate=0.0,
        drop_path_rate=0.0,
        rnn_route="auto",
    ):
        return VanillaSequencer(
            **config["arch"],
            include_top=include_top,
            include_preprocessing=include_preprocessing,
            weights=weights,
            input_tensor=input_tensor,
            input_shape=input_shape,
            pooling=pooling,
            classes=classes,
            classifier_activation=classifier_activation,
            name=name,
            default_size=config["default_size"],
            weights_variant=config["weights_variant"],
            drop_rate=drop_rate,
            drop_path_rate=drop_path_rate,
            rnn_route=rnn_route,
        )

    builder.__name__ = function_name
    builder.__doc__ = BUILDER_DOC.format(variant=variant, size=config["default_size"])
    return builder


BUILDER_DOC = """Instantiates the {variant} architecture (the vanilla Sequencer of
    Tatsunami & Taki, NeurIPS 2022). No ImageNet weights are published for it.

    Args:
        include_top: whether to include the classification head (default True).
        include_preprocessing: if True (default) the model takes RGB values in
            [0, 255] and applies timm's ImageNet normalisation inside. If False it
            takes already-normalised input.
        weights: None (random) or a path to a weights file (the authors'
            PyTorch checkpoint, .safetensors, or a Keras .weights.h5).
        input_tensor: optional Keras tensor to use as the model input.
        input_shape: optional (height, width, 3); defaults to ({size}, {size}, 3).
            Any size works, including (None, None, 3).
        pooling: with include_top=False, None (4D feature map), "avg" or "max".
        classes: number of classes when include_top=True.
        classifier_activation: activation of the top layer ("softmax" or None).
        name: the model name.
        drop_rate: dropout in the MLPs and before the head.
        drop_path_rate: stochastic depth rate of the last block (linear schedule).
        rnn_route: how the BiLSTMs run: "auto" (default), "keras" (Keras'
            Bidirectional(LSTM); cuDNN on GPU) or "fused" (the backend's fused
            kernel: torch, TensorFlow). Same weights and results either way.

    Returns:
        A `keras.Model`.
    """

VSequencerS = _builder("v_sequencer_s", "VSequencerS")
VSequencerSH = _builder("v_sequencer_s_h", "VSequencerSH")
VSequencerSPE = _builder("v_sequencer_s_pe", "VSequencerSPE")

"""Effective receptive fields (the paper's ERF figure; the authors' generate_erf.py).

For each chosen layer output (channels-last, B x H x W x C), the feature vector at
(H // 2 - 1, W // 2 - 1) is summed over channels and the batch, and back-propagated
to the input images; the ReLU of that input gradient is summed over the batch
(accumulating over all batches) and the channels, then log10(1 + x) is taken: one
input-sized map per layer. The figure min-max scales it (`plots.plot_erf`).
"""

import os

import numpy as np


def _feature_layers(model):
    """Names of the layers whose output is a 4-D feature map, in model order."""
    names = []
    for layer in model.layers:
        try:
            shape = layer.output.shape
        except (AttributeError, ValueError):  # unbuilt or shared layers
            continue
        if len(shape) == 4 and layer.name != "preprocessing" and not layer.name.startswith("input"):
            names.append(layer.name)
    return names


def default_erf_layers(model):
    """The last block of every stage ("stages_{s}_blocks_{last}"): the stage outputs."""
    last = {}
    for name in _feature_layers(model):
        parts = name.split("_")
        if len(parts) == 4 and parts[0] == "stages" and parts[2] == "blocks":
            last[int(parts[1])] = name
    return [last[s] for s in sorted(last)]


def _check_layers(model, layers):
    if layers is None:
        layers = default_erf_layers(model)
        if not layers:
            raise ValueError(f"{model.name} has no 'stages_{{s}}_blocks_{{b}}' layers: pass `layers`")
    if isinstance(layers, str):
        layers = [layers]
    layers = list(layers)
    if not layers:
        raise ValueError("`layers` is empty: name at least one layer, e.g. 'stages_3_blocks_2'")
    known = {layer.name for layer in model.layers}
    valid = _feature_layers(model)
    examples = ", ".join(valid[:3] + ["..."] + valid[-2:]) if len(valid) > 5 else ", ".join(valid)
    for name in layers:
        if name not in known:
            raise ValueError(f"{model.name} has no layer {name!r}; feature-map layers: {examples}")
        shape = tuple(model.get_layer(name).output.shape)
        if len(shape) != 4:
            raise ValueError(
                f"layer {name!r} outputs shape {shape}, not a 4-D (batch, height, width, channels) "
                f"feature map; use one of: {examples}"
            )
    if len(set(layers)) != len(layers):
        raise ValueError(f"`layers` names a layer twice: {layers}")
    return layers


def _centre(size):
    # The authors' (H // 2 - 1); a 1-pixel map's -1 is its only pixel, as in PyTorch.
    return max(int(size) // 2 - 1, 0)


def _tensorflow_maps(submodel, batch_size):
    import tensorflow as tf

    def centre(out, axis):
        return tf.maximum(tf.shape(out)[axis] // 2 - 1, 0)

    @tf.function(reduce_retracing=True)
    def maps(x):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            outputs = submodel(x, training=False)
            outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
            scalars = [tf.reduce_sum(out[:, centre(out, 1), centre(out, 2), :]) for out in outputs]
        return [tf.reduce_sum(tf.nn.relu(tape.gradient(s, x)), axis=(0, 3)) for s in scalars]

    def run(x):
        return [m.numpy() for m in maps(tf.convert_to_tensor(x))]

    return run


def _jax_maps(submodel, batch_size):
    import jax
    import jax.numpy as jnp

    def centres(x, trainable, non_trainable):
        outputs, _ = submodel.stateless_call(trainable, non_trainable, x, training=False)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        return jnp.stack(
            [jnp.sum(out[:, _centre(out.shape[1]), _centre(out.shape[2]), :]) for out in outputs]
        )

    @jax.jit
    def maps(trainable, non_trainable, x, real):
        scalars, backward = jax.vjp(lambda x: centres(x, trainable, non_trainable), x)
        # One backward per layer, vectorised: one compiled backward pass.
        (grads,) = jax.vmap(backward)(jnp.eye(scalars.shape[0], dtype=scalars.dtype))
        return jnp.einsum("lbhwc,b->lhw", jax.nn.relu(grads), real)

    trainable = [v.value for v in submodel.trainable_variables]
    non_trainable = [v.value for v in submodel.non_trainable_variables]

    def run(x):
        # A short last batch is padded (samples are independent in inference, and
        # padded rows are weighted out), so one compiled function serves them all.
        count = len(x)
        padded = x
        if count < batch_size:
            padded = np.concatenate([x, np.zeros((batch_size - count,) + x.shape[1:], x.dtype)])
        real = (np.arange(len(padded)) < count).astype(x.dtype)
        return list(np.asarray(maps(trainable, non_trainable, jnp.asarray(padded), jnp.asarray(real))))

    return run


def _torch_maps(submodel, batch_size):
    import keras
    import torch

    @torch.enable_grad()  # also under a caller's no_grad()
    def run(x):
        x = keras.ops.convert_to_tensor(x).detach().requires_grad_(True)
        outputs = submodel(x, training=False)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        result = []
        for index, out in enumerate(outputs):
            scalar = out[:, _centre(out.shape[1]), _centre(out.shape[2]), :].sum()
            (grad,) = torch.autograd.grad(scalar, x, retain_graph=index < len(outputs) - 1)
            result.append(torch.relu(grad).sum(dim=(0, 3)).detach().cpu().numpy())
        return result

    return run


def effective_receptive_field(model, images, layers=None, batch_size=16):
    """Effective receptive fields of `model`'s feature maps, as the authors computed them.

    Args:
        model: a Sequencer2D model (or any functional Keras model with named
            channels-last feature-map layers).
        images: what the model takes, N x H x W x 3 (one H x W x 3 image is a
            batch of one): with `include_preprocessing=True` (the default), RGB
            values in [0, 255], e.g. from `keras_sequencer.load_image`.
        layers: layer names whose outputs to probe: "stem",
            "stages_{s}_blocks_{b}", "stages_{s}_downsample" or "norm". Default:
            the last block of every stage.
        batch_size: images per forward/backward pass; the maps are summed over
            all batches, so it changes memory use, not the result.

    Returns:
        {layer name: float64 array of shape (input height, input width)}:
        log10(1 + sum over images and channels of ReLU(d centre / d input)),
        where "centre" is the layer's feature vector at (H // 2 - 1, W // 2 - 1)
        summed over channels. Unscaled: `plots.plot_erf` min-max scales it.

    Gradients are taken with respect to the normalised images, as the
    authors' (their model takes normalised tensors): a model with
    `include_preprocessing=True` is probed after its normalisation layer, so
    both kinds of model give the same maps for the same photographs.

    The model runs in inference mode (training=False). The authors ran the RNNs
    in train mode (cuDNN's backward needs it) and the rest in eval mode; the
    LSTMs have no dropout, so that is the same computation. (On torch, the fused
    route itself passes train mode to the kernel whenever gradients are on.)
    Gradients: TensorFlow's GradientTape, JAX's vjp over `stateless_call`
    (compiled once per input size; a short last batch is padded), torch's autograd.
    """
    import keras

    layers = _check_layers(model, layers)
    images = np.asarray(images, dtype="float32")
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"`images` must be a non-empty N x H x W x C batch; got shape {images.shape}")
    if int(batch_size) < 1:
        raise ValueError(f"`batch_size` must be at least 1; got {batch_size}")
    outputs = [model.get_layer(name).output for name in layers]
    if "preprocessing" in {layer.name for layer in model.layers}:
        # The authors differentiate with respect to the normalised images (their
        # model takes them): the gradient starts after our normalisation layer.
        preprocessing = model.get_layer("preprocessing")
        images = np.concatenate([
            keras.ops.convert_to_numpy(preprocessing(images[start : start + 256]))
            for start in range(0, len(images), 256)
        ])
        submodel = keras.Model(preprocessing.output, outputs)
    else:
        submodel = keras.Model(model.inputs, outputs)
    backend = keras.backend.backend()
    maps_of = {"tensorflow": _tensorflow_maps, "jax": _jax_maps, "torch": _torch_maps}.get(backend)
    if maps_of is None:
        raise ValueError(f"effective_receptive_field needs gradients: backend {backend!r} has none here")
    run = maps_of(submodel, min(int(batch_size), len(images)))
    totals = [np.zeros(images.shape[1:3], dtype="float64") for _ in layers]
    for start in range(0, len(images), int(batch_size)):
        for total, contribution in zip(totals, run(images[start : start + int(batch_size)])):
            total += contribution
    return {name: np.log10(1.0 + total) for name, total in zip(layers, totals)}


def save_erf_heatmaps(erf, output_dir, prefix=""):
    """Writes, per layer of `erf` (from `effective_receptive_field`), the raw map
    as `{prefix}{layer}.npy` and its min-max scaled heatmap as `{prefix}{layer}.png`.
    Returns the written paths."""
    from keras_sequencer.plots import plot_erf

    os.makedirs(output_dir, exist_ok=True)
    paths = []
    for name, values in erf.items():
        stem = os.path.join(output_dir, f"{prefix}{name}")
        np.save(stem + ".npy", values)
        plot_erf(values, stem + ".png", title=name)
        paths += [stem + ".npy", stem + ".png"]
    return paths

"""Training helpers for the paper's recipe, built from Keras' own pieces."""

import types

import keras
from keras import ops

def learning_rate_schedule(learning_rate, total_steps, warmup_steps=0, warmup_from=1e-6, final_fraction=0.0):
    """Linear warmup from `warmup_from` to `learning_rate`, then cosine decay."""
    warmup_steps = int(min(warmup_steps, max(total_steps - 1, 0)))
    if warmup_steps == 0:
        return keras.optimizers.schedules.CosineDecay(
            learning_rate, decay_steps=max(total_steps, 1), alpha=final_fraction
        )
    return keras.optimizers.schedules.CosineDecay(
        warmup_from,
        decay_steps=max(total_steps - warmup_steps, 1),
        alpha=final_fraction,
        warmup_target=learning_rate,
        warmup_steps=warmup_steps,
    )


SPLIT_BIAS_RNN_TYPES = ("lstm", "rnn")


@keras.saving.register_keras_serializable(package="keras_sequencer")
class PyTorchAdamW(keras.optimizers.AdamW):
    """AdamW that steps as PyTorch's `torch.optim.AdamW` (timm's "adamw") does.

    Differences from `keras.optimizers.AdamW`, each measured to move the logits
    of sequencer2d_s apart from timm's within one step:

    - epsilon is added after the bias correction, as PyTorch does:
      `p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`. Keras adds it
      before (`... / (sqrt(v) + eps)`), an effective epsilon 31.6x larger at step
      1. The default epsilon is PyTorch's 1e-8 (Keras': 1e-7).
    - Split biases: PyTorch's LSTM and RNN keep two biases, `bias_ih` and
      `bias_hh`, where Keras keeps their sum. Both get the gradient of the sum
      and each takes its own Adam step, so the sum moves twice as far. The
      variables passed to `split_biases(var_list=...)` (or named by path in
      `split_bias_paths`) take twice the Adam step of their gradient. Decoupled
      weight decay, being linear, is the same for the sum as for its halves and
      is applied once. The GRU needs none of this: Keras' GRU(reset_after=True)
      keeps both biases.
    - `global_clipnorm` clips as `torch.nn.utils.clip_grad_norm_`: the norm
      counts a split bias' gradient twice (PyTorch sees it on both halves) and
      the scale is `clipnorm / (norm + 1e-6)`, at most 1.

    Weight-decay exclusions made with `exclude_from_weight_decay(var_list=...)`
    are kept in the config by variable path (Keras' own AdamW forgets them when
    a compiled model is saved and loaded), as are the split biases.

    For Keras' stock AdamW instead, compile with
    `keras.optimizers.AdamW(learning_rate, weight_decay=...)` after
    `optimizer.exclude_from_weight_decay(var_list=[...])`.
    """

    def __init__(
        self,
        learning_rate=0.001,
        weight_decay=0.01,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-8,
        amsgrad=False,
        split_bias_paths=None,
        no_weight_decay_paths=None,
        no_weight_decay_names=None,
        **kwargs,
    ):
        super().__init__(
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=epsilon,
            amsgrad=amsgrad,
            **kwargs,
        )
        self.split_bias_paths = sorted(set(split_bias_paths or ()))
        self.no_weight_decay_paths = sorted(set(no_weight_decay_paths or ()))
        self.no_weight_decay_names = sorted(set(no_weight_decay_names or ()))
        # Python-side bookkeeping in one holder: Keras tracks optimizer
        # attributes, and a list of model variables there would become state.
        self._marks = types.SimpleNamespace(
            split_ids=frozenset(), no_decay_ids=frozenset(), split_keys=frozenset(), clip_variables=None,
            decay_due=False,
        )

    def split_biases(self, var_list):
        """Marks variables that PyTorch keeps as two halves (bias_ih + bias_hh):
        they take twice the Adam step. Call before the optimizer is built."""
        if self.built:
            raise ValueError("`split_biases()` can only be called before the optimizer is built.")
        var_list = list(var_list)
        self._marks.split_ids = self._marks.split_ids | {id(v) for v in var_list}
        self.split_bias_paths = sorted(set(self.split_bias_paths) | {v.path for v in var_list})

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        # As Keras' (each call replaces the last), but remembered in the config.
        var_list = list(var_list or ())
        super().exclude_from_weight_decay(var_list=var_list, var_names=var_names)
        self._marks.no_decay_ids = frozenset(id(v) for v in var_list)
        self.no_weight_decay_paths = sorted({v.path for v in var_list})
        self.no_weight_decay_names = sorted(set(var_names or ()))

    def build(self, var_list):
        if self.built:
            return
        # Variables marked in this session by identity, those of a loaded
        # config by path.
        marks = self._marks
        no_decay_paths, split_paths = set(self.no_weight_decay_paths), set(self.split_bias_paths)
        no_decay = [v for v in var_list if id(v) in marks.no_decay_ids or v.path in no_decay_paths]
        if no_decay or self.no_weight_decay_names:
            super().exclude_from_weight_decay(var_list=no_decay, var_names=self.no_weight_decay_names)
        split = [v for v in var_list if id(v) in marks.split_ids or v.path in split_paths]
        super().build(var_list)
        marks.split_keys = frozenset(self._var_key(v) for v in split)

    def _is_split_bias(self, variable):
        return self._var_key(variable) in self._marks.split_keys

    def update_step(self, gradient, variable, learning_rate):
        if _tensorflow_applies_adam(self, gradient, variable):
            return self._tensorflow_adam_step(gradient, variable, learning_rate)
        return self._step_in_keras_ops(gradient, variable, learning_rate)

    def _step_in_keras_ops(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        gradient = ops.cast(gradient, dtype)
        step = ops.cast(self.iterations + 1, dtype)
        beta_1 = ops.cast(self.beta_1, dtype)
        beta_2 = ops.cast(self.beta_2, dtype)
        bias_correction_1 = 1 - ops.power(beta_1, step)
        bias_correction_2 = 1 - ops.power(beta_2, step)
        index = self._get_variable_index(variable)
        m = self._momentums[index]
        v = self._velocities[index]
        self.assign_add(m, ops.multiply(ops.subtract(gradient, m), 1 - beta_1))
        self.assign_add(v, ops.multiply(ops.subtract(ops.square(gradient), v), 1 - beta_2))
        if self.amsgrad:
            v_hat = self._velocity_hats[index]
            self.assign(v_hat, ops.maximum(v_hat, v))
            v = v_hat
        denominator = ops.add(ops.divide(ops.sqrt(v), ops.sqrt(bias_correction_2)), self.epsilon)
        step_size = lr / bias_correction_1
        if self._is_split_bias(variable):
            step_size = step_size * 2.0  # bias_ih and bias_hh each take this step
        self.assign_sub(variable, ops.divide(ops.multiply(m, step_size), denominator))

    def _tensorflow_adam_step(self, gradient, variable, learning_rate):
        # TensorFlow's own Adam kernel: one op per variable where the steps
        # above are about ten passes over it (BENCHMARKS.md, eleventh round).
        # Its epsilon is added before the bias correction, as Keras' is;
        # scaled by sqrt(1 - beta_2^t) it is PyTorch's.
        import tensorflow as tf

        step = tf.cast(self.iterations + 1, "float32")
        beta_1, beta_2 = tf.cast(self.beta_1, "float32"), tf.cast(self.beta_2, "float32")
        beta_1_power, beta_2_power = tf.pow(beta_1, step), tf.pow(beta_2, step)
        lr = tf.cast(learning_rate, "float32")
        if self._is_split_bias(variable):
            lr = lr * 2.0  # bias_ih and bias_hh each take this step
        index = self._get_variable_index(variable)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle,
            m=self._momentums[index].handle,
            v=self._velocities[index].handle,
            beta1_power=beta_1_power,
            beta2_power=beta_2_power,
            lr=lr,
            beta1=beta_1,
            beta2=beta_2,
            epsilon=self.epsilon * tf.sqrt(1.0 - beta_2_power),
            grad=tf.cast(gradient, "float32"),
        )

    def _apply_weight_decay(self, variables):
        # On torch the decay is folded into the fused step below (one pass over
        # the variables instead of two); Keras calls this right before it.
        if keras.backend.backend() == "torch" and self.weight_decay:
            self._marks.decay_due = True
            return
        return super()._apply_weight_decay(variables)

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        # On torch the whole step (decoupled decay, moments, update) is one
        # `torch._fused_adamw_` call per group, the kernel of
        # `torch.optim.AdamW(fused=True)`, where an `update_step` override would
        # run Keras ops one variable at a time.
        if keras.backend.backend() != "torch":
            return super()._backend_update_step(grads, trainable_variables, learning_rate)
        import torch

        decay_due, self._marks.decay_due = self._marks.decay_due, False
        with torch.no_grad():
            groups = {}
            for grad, variable in zip(grads, trainable_variables):
                index = self._get_variable_index(variable)
                key = (self._is_split_bias(variable), decay_due and self._use_weight_decay(variable))
                group = groups.setdefault(key, ([], [], [], [], []))
                group[0].append(variable.value)
                group[1].append(grad.to(variable.value.dtype))
                group[2].append(self._momentums[index].value)
                group[3].append(self._velocities[index].value)
                if self.amsgrad:
                    group[4].append(self._velocity_hats[index].value)
            # `iterations` is a tensor, not a variable, under gradient accumulation.
            step = float(ops.convert_to_numpy(self.iterations)) + 1.0
            lr = float(learning_rate.value if hasattr(learning_rate, "value") else learning_rate)
            for (split, decayed), (params, grads_, ms, vs, v_hats) in groups.items():
                # A split bias takes twice the Adam step and its decay once:
                # (2 lr) * (wd / 2) is lr * wd exactly.
                scale = 2.0 if split else 1.0
                steps = [torch.full((), step, device=params[0].device)] * len(params)
                torch._fused_adamw_(
                    params, grads_, ms, vs, v_hats, steps,
                    lr=lr * scale,
                    beta1=self.beta_1,
                    beta2=self.beta_2,
                    weight_decay=self.weight_decay / scale if decayed else 0.0,
                    eps=self.epsilon,
                    amsgrad=self.amsgrad,
                    maximize=False,
                )

    # Clipping sees gradients without their variables; remember them.
    def _backend_apply_gradients(self, grads, trainable_variables):
        self._marks.clip_variables = list(trainable_variables)
        try:
            return super()._backend_apply_gradients(grads, trainable_variables)
        finally:
            self._marks.clip_variables = None

    def _clip_gradients(self, grads):
        variables = self._marks.clip_variables
        if not (self.global_clipnorm and self.global_clipnorm > 0) or variables is None or len(variables) != len(grads):
            return super()._clip_gradients(grads)
        squares = []
        for g, v in zip(grads, variables):
            if g is None:
                continue
            square = ops.sum(ops.square(ops.cast(g, "float32")))
            squares.append(2.0 * square if self._is_split_bias(v) else square)
        norm = ops.sqrt(ops.sum(ops.stack(squares)))
        scale = ops.minimum(self.global_clipnorm / (norm + 1e-6), 1.0)
        scale = scale + (norm - norm)  # NaN for a non-finite norm, as Keras does
        return [g if g is None else ops.multiply(g, ops.cast(scale, g.dtype)) for g in grads]

    def get_config(self):
        return {
            **super().get_config(),
            "split_bias_paths": list(self.split_bias_paths),
            "no_weight_decay_paths": list(self.no_weight_decay_paths),
            "no_weight_decay_names": list(self.no_weight_decay_names),
        }


def _tensorflow_applies_adam(optimizer, gradient, variable):
    """Whether PyTorchAdamW steps `variable` with TensorFlow's ApplyAdam
    kernel: TensorFlow, a dense gradient, a float32 variable, no AMSGrad, and
    no tf.distribute strategy (whose variables Keras' own step updates)."""
    if keras.backend.backend() != "tensorflow" or optimizer.amsgrad:
        return False
    import tensorflow as tf

    return (
        isinstance(gradient, tf.Tensor)
        and variable.dtype == "float32"
        and not tf.distribute.has_strategy()
    )


def _layers_within(root):
    """Every layer reachable from `root` through its attributes (each once)."""
    seen, stack, found = set(), [root], []
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        found.append(obj)
        children = list(obj.layers) if isinstance(obj, keras.Model) else []
        for value in vars(obj).values():
            if isinstance(value, keras.layers.Layer):
                children.append(value)
            elif isinstance(value, (list, tuple)):
                children += [item for item in value if isinstance(item, keras.layers.Layer)]
        stack += reversed(children)
    return found


def split_rnn_biases(model):
    """The biases PyTorch splits into bias_ih + bias_hh: those of the LSTM and
    SimpleRNN directions of every BiLSTM2D in `model` (not the GRU's, which Keras
    keeps split too)."""
    from keras_sequencer.layers import BiLSTM2D

    biases = []
    for layer in _layers_within(model):
        if isinstance(layer, BiLSTM2D) and layer.rnn_type in SPLIT_BIAS_RNN_TYPES:
            biases += [rnn.cell.bias for rnn in layer.recurrent_layers() if rnn.cell.bias is not None]
    return biases


def create_optimizer(
    model,
    learning_rate=1e-3,
    weight_decay=0.05,
    total_steps=1000,
    warmup_steps=0,
    warmup_from=1e-6,
    global_clipnorm=None,
):
    """The recipe's optimizer: `PyTorchAdamW` (steps as timm's
    `create_optimizer_v2(model, "adamw", ...)`), with warmup + cosine decay.

    Weight decay skips what timm's `param_groups_weight_decay` skips: every
    tensor of rank <= 1 (biases, LayerNorm scales and offsets, the LSTM/RNN
    biases) and every bias, here also the GRU's (2, 3H) bias (PyTorch's
    bias_ih and bias_hh, each of rank 1). The LSTM/RNN biases of each BiLSTM2D
    (`split_rnn_biases`), PyTorch's bias_ih + bias_hh summed, take PyTorch's
    doubled step; `global_clipnorm` counts their gradients twice, as PyTorch's
    `clip_grad_norm_` does.

    For Keras' stock AdamW instead (epsilon before the bias correction, one step
    per Keras bias):

        optimizer = keras.optimizers.AdamW(learning_rate_schedule(...), weight_decay=0.05)
        optimizer.exclude_from_weight_decay(var_list=[
            v for v in model.trainable_variables if len(v.shape) <= 1 or v.name == "bias"])
    """
    optimizer = PyTorchAdamW(
        learning_rate=learning_rate_schedule(learning_rate, total_steps, warmup_steps, warmup_from),
        weight_decay=weight_decay,
        global_clipnorm=global_clipnorm,
    )
    no_decay = [v for v in model.trainable_variables if len(v.shape) <= 1 or v.name == "bias"]
    optimizer.exclude_from_weight_decay(var_list=no_decay)
    optimizer.split_biases(split_rnn_biases(model))
    return optimizer


def classification_loss(label_smoothing=0.1):
    """Cross-entropy on one-hot (or mixed) targets from a softmax output."""
    return keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)


def augmentation(
    image_size=None,
    rand_augment_magnitude=9,
    random_erasing=0.25,
    flip=True,
    seed=None,
):
    """Per-sample augmentation of the recipe from Keras core layers (RGB in [0, 255]).

    timm's "rand-m9-mstd0.5-inc1" maps to RandAugment(factor=m/10); random
    erasing runs with probability `random_erasing`. timm's RandomResizedCrop has
    no Keras core layer; RandomZoom + RandomTranslation stand in for it.
    """
    layers = []
    if image_size is not None:
        layers += [
            keras.layers.RandomZoom((-0.3, 0.1), seed=seed),
            keras.layers.RandomTranslation(0.1, 0.1, seed=seed),
        ]
    if flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if rand_augment_magnitude:
        layers.append(
            keras.layers.RandAugment(
                value_range=(0, 255), num_ops=2, factor=rand_augment_magnitude / 10.0, seed=seed
            )
        )
    if random_erasing:
        layers.append(
            keras.layers.RandomErasing(factor=random_erasing, value_range=(0, 255), seed=seed)
        )
    # Pipeline (not Sequential) so the layers also run inside tf.data on JAX/torch.
    return keras.layers.Pipeline(layers, name="augmentation")


def batch_mixing(mixup_alpha=0.8, cutmix_factor=1.0, seed=None):
    """MixUp and CutMix on (images, one-hot labels) batches, one of the two per
    batch as timm's Mixup(switch_prob=0.5) does. Returns a function for tf.data."""
    import tensorflow as tf

    mixup = keras.layers.MixUp(alpha=mixup_alpha, seed=seed) if mixup_alpha else None
    cutmix = keras.layers.CutMix(factor=cutmix_factor, seed=seed) if cutmix_factor else None

    def mix(images, labels):
        data = {"images": images, "labels": labels}
        if mixup is not None and cutmix is not None:
            out = tf.cond(
                tf.random.uniform(()) < 0.5, lambda: mixup(data), lambda: cutmix(data)
            )
        else:
            out = (mixup or cutmix)(data)
        return out["images"], out["labels"]

    return mix

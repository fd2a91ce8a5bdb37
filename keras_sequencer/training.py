"""Training helpers for the paper's recipe, built from Keras' own pieces."""

import keras

# The authors' ImageNet recipe (README of github.com/okojoalg/sequencer).
IMAGENET_RECIPE = dict(
    learning_rate=2e-3,  # at batch 2048
    weight_decay=0.05,
    epochs=300,
    warmup_epochs=20,
    warmup_from=1e-6,
    label_smoothing=0.1,
    drop_path_rate=0.1,
    mixup_alpha=0.8,
    cutmix_factor=1.0,
    random_erasing=0.25,
    rand_augment_magnitude=9,
)


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


def create_optimizer(
    model,
    learning_rate=1e-3,
    weight_decay=0.05,
    total_steps=1000,
    warmup_steps=0,
    warmup_from=1e-6,
    global_clipnorm=None,
):
    """AdamW whose weight decay skips norms and biases (every tensor of rank <= 1,
    and the GRU's (2, 3H) bias), as timm does, with warmup + cosine decay."""
    optimizer = keras.optimizers.AdamW(
        learning_rate=learning_rate_schedule(learning_rate, total_steps, warmup_steps, warmup_from),
        weight_decay=weight_decay,
        global_clipnorm=global_clipnorm,
    )
    no_decay = [v for v in model.trainable_variables if len(v.shape) <= 1 or v.name == "bias"]
    optimizer.exclude_from_weight_decay(var_list=no_decay)
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

"""Offline demo: train a compact Sequencer2D on scikit-learn's handwritten digits.

The digits (1,797 real 8x8 scans) ship inside scikit-learn: nothing is downloaded.
They are split three ways, stratified by class: a training split, a validation
split watched during training (the curves), and a test split that training never
sees (the reported accuracy).
"""

import os

import numpy as np

# Compact configuration for 8x8 inputs: 8x8 tokens, then 4x4.
DIGITS_CONFIG = dict(
    layers=(2, 2),
    patch_sizes=(1, 2),
    embed_dims=(32, 64),
    hidden_sizes=(8, 16),
    mlp_ratios=(3.0, 3.0),
)

# The demo's model reads the scans bilinearly upsampled to 16x16 and embeds 2x2
# patches: the same 8x8 then 4x4 token grids (and cost) as DIGITS_CONFIG on 8x8,
# but smoother inputs, which generalise better (about +1.5 points of accuracy).
DEMO_IMAGE_SIZE = 16
DEMO_CONFIG = dict(DIGITS_CONFIG, patch_sizes=(2, 2))

# Fractions of every class held out for validation and for the final test.
VALIDATION_FRACTION = 0.1
TEST_FRACTION = 0.2


def _digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("The demo needs scikit-learn: pip install scikit-learn") from error
    digits = load_digits()
    images = (digits.images / 16.0 * 255.0).astype("float32")[..., None].repeat(3, axis=-1)
    return images, digits.target.astype("int64")


def load_digits_rgb(test_fraction=0.2, seed=0):
    """(x_train, y_train, x_test, y_test): 8x8 RGB images in [0, 255], integer
    labels, a stratified held-out split."""
    images, labels = _digits()
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        test[members[: int(round(test_fraction * len(members)))]] = True
    return images[~test], labels[~test], images[test], labels[test]


def split_three_ways(labels, validation_fraction=VALIDATION_FRACTION, test_fraction=TEST_FRACTION, seed=0):
    """(train, validation, test): disjoint boolean masks covering every sample,
    each class split in the same proportions (stratified)."""
    from keras_sequencer.data import stratified_split

    labels = np.asarray(labels)
    test = stratified_split(labels, test_fraction, seed)
    rest = np.flatnonzero(~test)
    # The validation fraction is of the whole set, so of the rest it is larger.
    in_rest = stratified_split(labels[rest], validation_fraction / (1.0 - test_fraction), seed + 1)
    validation = np.zeros(len(labels), dtype=bool)
    validation[rest[in_rest]] = True
    return ~(test | validation), validation, test


def upsample(images, size=DEMO_IMAGE_SIZE):
    """Bilinear resize of (N, H, W, C) images to size x size (half-pixel centres,
    as tf.image.resize), in numpy: the same pixels on every backend."""

    def weights(n_in, n_out):
        source = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        low = np.floor(source).astype(int)
        high = np.minimum(low + 1, n_in - 1)
        matrix = np.zeros((n_out, n_in))
        np.add.at(matrix, (np.arange(n_out), low), 1.0 - (source - low))
        np.add.at(matrix, (np.arange(n_out), high), source - low)
        return matrix

    images = np.asarray(images, dtype="float64")
    rows, cols = weights(images.shape[1], size), weights(images.shape[2], size)
    return np.einsum("hi,nijc,wj->nhwc", rows, images, cols).astype("float32")


def load_digits_splits(seed=0, image_size=DEMO_IMAGE_SIZE):
    """{"train"|"validation"|"test": (images, labels)}: RGB images in [0, 255]
    upsampled to image_size, integer labels, split by `split_three_ways`."""
    images, labels = _digits()
    if image_size != images.shape[1]:
        images = upsample(images, image_size)
    masks = split_three_ways(labels, seed=seed)
    return {name: (images[mask], labels[mask]) for name, mask in zip(("train", "validation", "test"), masks)}


def run_demo(output_dir="sequencer_demo", epochs=15, batch_size=64, seed=0, verbose="auto"):
    """Trains (watching the validation split), saves, reloads and checks the
    model, and returns its accuracy on the test split, which training never saw."""
    import keras

    from keras_sequencer.models import Sequencer2D
    from keras_sequencer.plots import plot_confusion_matrix, plot_history
    from keras_sequencer.training import classification_loss, create_optimizer

    keras.utils.set_random_seed(seed)
    splits = load_digits_splits(seed=seed)
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = splits["train"], splits["validation"], splits["test"]
    print(
        f"digits {DEMO_IMAGE_SIZE}x{DEMO_IMAGE_SIZE} (8x8 scans upsampled): {len(y_train)} training, "
        f"{len(y_val)} validation (watched during training), {len(y_test)} test images (held out)"
    )
    model = Sequencer2D(
        **DEMO_CONFIG,
        input_shape=(DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE, 3),
        classes=10,
        drop_path_rate=0.05,
        name="sequencer2d_digits",
        default_size=DEMO_IMAGE_SIZE,  # the size its metadata says it was trained at
    )
    steps = epochs * int(np.ceil(len(x_train) / batch_size))
    model.compile(
        optimizer=create_optimizer(model, 2e-3, weight_decay=0.05, total_steps=steps, warmup_steps=steps // 10),
        loss=classification_loss(label_smoothing=0.1),
        metrics=["accuracy"],
    )
    os.makedirs(output_dir, exist_ok=True)
    one_hot = lambda y: keras.utils.to_categorical(y, 10)  # noqa: E731
    history = model.fit(
        x_train,
        one_hot(y_train),
        batch_size=batch_size,
        epochs=epochs,
        validation_data=(x_val, one_hot(y_val)),
        callbacks=[keras.callbacks.CSVLogger(os.path.join(output_dir, "history.csv"))],
        verbose=verbose,
    )
    probabilities = model.predict(x_test, verbose=0)
    predicted = probabilities.argmax(axis=-1)
    accuracy = float((predicted == y_test).mean())

    model_path = os.path.join(output_dir, "model.keras")
    model.save(model_path)
    plot_history(history.history, os.path.join(output_dir, "curves.png"))
    plot_confusion_matrix(y_test, predicted, [str(i) for i in range(10)],
                          os.path.join(output_dir, "confusion_matrix.png"))
    reloaded = keras.models.load_model(model_path)
    difference = float(np.max(np.abs(np.asarray(reloaded.predict(x_test, verbose=0)) - probabilities)))
    if not difference <= 1e-5:
        raise RuntimeError(
            f"The model reloaded from {model_path} predicts differently (max difference {difference:.1e})."
        )
    print(f"reloaded model.keras: predictions match (max difference {difference:.1e})")
    return accuracy

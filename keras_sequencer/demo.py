"""Offline demo: train a compact Sequencer2D on scikit-learn's handwritten digits.

The digits (1,797 real 8x8 scans) ship inside scikit-learn: nothing is downloaded.
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


def load_digits_rgb(test_fraction=0.2, seed=0):
    """(x_train, y_train, x_test, y_test): RGB images in [0, 255], integer labels,
    a stratified held-out split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("The demo needs scikit-learn: pip install scikit-learn") from error
    digits = load_digits()
    images = (digits.images / 16.0 * 255.0).astype("float32")[..., None].repeat(3, axis=-1)
    labels = digits.target.astype("int64")
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        test[members[: int(round(test_fraction * len(members)))]] = True
    return images[~test], labels[~test], images[test], labels[test]


def run_demo(output_dir="sequencer_demo", epochs=15, batch_size=64, seed=0, verbose="auto"):
    """Trains, evaluates, saves and reloads; returns the held-out accuracy."""
    import keras

    from keras_sequencer.models import Sequencer2D
    from keras_sequencer.plots import plot_confusion_matrix, plot_history
    from keras_sequencer.training import classification_loss, create_optimizer

    keras.utils.set_random_seed(seed)
    x_train, y_train, x_test, y_test = load_digits_rgb(seed=seed)
    model = Sequencer2D(
        **DIGITS_CONFIG,
        input_shape=(8, 8, 3),
        classes=10,
        drop_path_rate=0.05,
        name="sequencer2d_digits",
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
        validation_data=(x_test, one_hot(y_test)),
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
    if not np.allclose(reloaded.predict(x_test, verbose=0), probabilities, atol=1e-5):
        raise RuntimeError(f"The model reloaded from {model_path} predicts differently.")
    return accuracy

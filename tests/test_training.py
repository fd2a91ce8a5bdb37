"""Training helpers: one short fit per backend, the optimizer, schedule and augmentation."""

import keras
import numpy as np
import pytest

pytest.importorskip("sklearn")

import keras_sequencer as ks  # noqa: E402
from keras_sequencer.tasks.demo import DIGITS_CONFIG, load_digits_rgb  # noqa: E402
from keras_sequencer.training import (  # noqa: E402
    augmentation,
    batch_mixing,
    classification_loss,
    create_optimizer,
    learning_rate_schedule,
)


def _digits_model():
    return ks.Sequencer2D(**DIGITS_CONFIG, input_shape=(8, 8, 3), classes=10, drop_path_rate=0.1)


def test_fit_lowers_the_loss_on_real_digits():
    keras.utils.set_random_seed(1)
    x, y, _, _ = load_digits_rgb()
    x, y = x[:256], keras.utils.to_categorical(y[:256], 10)
    model = _digits_model()
    model.compile(
        optimizer=create_optimizer(model, 2e-3, total_steps=24, warmup_steps=2),
        loss=classification_loss(0.1),
    )
    before = model.evaluate(x, y, verbose=0, batch_size=64)
    history = model.fit(x, y, epochs=6, batch_size=64, verbose=0)
    after = model.evaluate(x, y, verbose=0, batch_size=64)
    assert np.isfinite(history.history["loss"]).all()
    assert after < 0.9 * before, (before, after)


def test_weight_decay_skips_norms_and_biases():
    model = _digits_model()
    optimizer = create_optimizer(model, total_steps=10)
    optimizer.build(model.trainable_variables)
    decayed = {v.path for v in model.trainable_variables if optimizer._use_weight_decay(v)}
    assert decayed
    assert all(not (p.endswith("/bias") or p.endswith("/gamma") or p.endswith("/beta")) for p in decayed)
    assert any(p.endswith("recurrent_kernel") for p in decayed)
    assert any(p.endswith("fc1/kernel") for p in decayed)


def test_warmup_then_cosine():
    schedule = learning_rate_schedule(1e-3, total_steps=100, warmup_steps=10, warmup_from=1e-6)
    lr = lambda step: float(keras.ops.convert_to_numpy(schedule(step)))  # noqa: E731
    assert lr(0) == pytest.approx(1e-6)
    assert lr(10) == pytest.approx(1e-3, rel=1e-3)
    assert lr(55) == pytest.approx(0.5e-3, rel=0.05)
    assert lr(100) < 1e-5


def test_augmentation_and_mixing_in_tf_data():
    import tensorflow as tf

    images = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    labels = keras.utils.to_categorical(np.arange(8) % 4, 4)
    augment = augmentation(image_size=32, seed=1)
    mix = batch_mixing(seed=2)
    dataset = (
        tf.data.Dataset.from_tensor_slices((images, labels))
        .batch(8)
        .map(lambda x, y: (augment(x, training=True), y))
        .map(mix)
        .prefetch(tf.data.AUTOTUNE)
    )
    x, y = next(iter(dataset))
    x, y = np.asarray(x), np.asarray(y)
    assert x.shape == images.shape and np.isfinite(x).all()
    np.testing.assert_allclose(y.sum(axis=-1), 1.0, atol=1e-5)
    assert (y.max(axis=-1) < 1.0).any()  # labels really mixed

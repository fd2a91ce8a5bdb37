"""Sequencer2D as a KerasHub backbone: `keras_hub.models.ImageClassifier` trains,
predicts, saves to a preset directory and loads back from it.

A plain Keras functional model is an accepted backbone: `ImageClassifier` only
needs `backbone.input`, its output (a 4D feature map: `include_top=False`,
`pooling=None`) and `dtype_policy`; `save_to_preset` writes a model that is not a
`keras_hub.models.Backbone` with its own config and weights (`config.json`,
`model.weights.h5`), and `ImageClassifier.from_preset` rebuilds it from the
registered Keras classes. Skipped when keras-hub is not installed.

Runs on the torch backend only: the KerasHub glue (config serialization, weight
files) does not depend on the backend, and a first `fit` costs about 6 s on
torch against 28 s on TensorFlow and 55 s on JAX (2 CPU cores). The README's
KerasHub block runs the same steps under TensorFlow (tests/test_readme.py).
Passed on all three backends when written (KERAS_BACKEND=jax/tensorflow with
the skip removed).
"""

import keras
import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")

import keras_sequencer as ks  # noqa: E402
from keras_sequencer.models import FreeingFunctional  # noqa: E402

SIZE = 32

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "torch",
    reason="backend-independent KerasHub glue; runs under torch (fastest first fit)",
)


def tiny_backbone():
    return ks.Sequencer2D(
        layers=(1, 1),
        patch_sizes=(4, 2),
        embed_dims=(16, 24),
        hidden_sizes=(8, 12),
        mlp_ratios=(2, 2),
        include_top=False,
        input_shape=(SIZE, SIZE, 3),
        name="tiny_sequencer",
    )


def test_image_classifier_fit_predict_and_preset_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (4, SIZE, SIZE, 3)).astype("float32")
    labels = np.array([0, 1, 2, 1])
    classifier = keras_hub.models.ImageClassifier(backbone=tiny_backbone(), num_classes=3)
    before = [np.array(w) for w in classifier.backbone.get_weights()]
    history = classifier.fit(images, labels, batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    after = classifier.backbone.get_weights()
    assert any(not np.allclose(a, b) for a, b in zip(before, after)), "fit did not train the backbone"
    preds = classifier.predict(images, verbose=0)
    assert preds.shape == (4, 3)

    preset = tmp_path / "preset"
    classifier.save_to_preset(str(preset))
    assert {"config.json", "model.weights.h5", "task.json", "task.weights.h5"} <= {p.name for p in preset.iterdir()}
    restored = keras_hub.models.ImageClassifier.from_preset(str(preset))
    assert isinstance(restored, keras_hub.models.ImageClassifier)
    assert isinstance(restored.backbone, FreeingFunctional)
    assert restored.backbone.name == "tiny_sequencer"
    np.testing.assert_allclose(restored.predict(images, verbose=0), preds, rtol=1e-5, atol=1e-6)

"""Logit parity with timm (random weights, non-zero head) through our converter."""

import keras
import numpy as np
import pytest

pytest.importorskip("timm")

import keras_sequencer as ks  # noqa: E402
from conftest import run_model  # noqa: E402
from reference import (  # noqa: E402
    AUTHORS_VARIANTS,
    make_reference,
    normalize,
    reference_features,
    reference_logits,
    to_authors_layout,
)

TOLERANCE = 1e-4
# Every variant but S itself (tested at full size) and the 392px ones (same
# architectures as S/M/L, only a larger default input).
ABLATIONS = [
    name for name in AUTHORS_VARIANTS if name != "sequencer2d_s" and not name.endswith("_392")
]


@pytest.fixture(autouse=True)
def jax_scans_every_axis(monkeypatch):
    """JAX's fused route scans an axis as one scan for both directions from
    layers.JAX_FUSED_MIN_SEQUENCES sequences (else Keras' scans, which the
    "keras" route checks); these small batches have fewer, so every axis is
    made to qualify."""
    from keras_sequencer import layers as layers_module

    monkeypatch.setattr(layers_module, "JAX_FUSED_MIN_SEQUENCES", 0)


def _images(rng, batch, height, width):
    return rng.uniform(0, 255, size=(batch, height, width, 3)).astype("float32")


@pytest.fixture(scope="module")
def reference_s():
    return make_reference("sequencer2d_s")


@pytest.mark.parametrize("include_preprocessing", [False, True])
def test_sequencer2d_s_at_224(reference_s, rng, include_preprocessing):
    model = ks.Sequencer2DS(
        weights=None,
        include_preprocessing=include_preprocessing,
        classifier_activation=None,
    )
    ks.load_torch_state_dict(model, reference_s.state_dict())
    images = _images(rng, 2, 224, 224)
    expected = reference_logits(reference_s, normalize(images))
    inputs = images if include_preprocessing else normalize(images)
    diff = np.abs(run_model(model, inputs) - expected).max()
    assert diff <= TOLERANCE, diff
    assert np.abs(expected).max() > 0.1  # the head really contributes


def test_non_square_size_not_divisible_by_patch(reference_s, rng):
    # 7 does not divide 230 or 153: PyTorch's strided conv drops the remainder.
    model = ks.Sequencer2DS(
        weights=None,
        include_preprocessing=False,
        input_shape=(230, 153, 3),
        classifier_activation=None,
    )
    ks.load_torch_state_dict(model, reference_s.state_dict())
    x = normalize(_images(rng, 2, 230, 153))
    diff = np.abs(run_model(model, x) - reference_logits(reference_s, x)).max()
    assert diff <= TOLERANCE, diff


def test_feature_map_without_top(reference_s, rng):
    model = ks.Sequencer2DS(
        weights=None, include_top=False, include_preprocessing=False, input_shape=(112, 112, 3)
    )
    ks.load_torch_state_dict(model, reference_s.state_dict())  # head skipped
    x = normalize(_images(rng, 1, 112, 112))
    expected = reference_features(reference_s, x)
    got = run_model(model, x)
    assert got.shape == expected.shape == (1, 8, 8, 384)
    assert np.abs(got - expected).max() <= TOLERANCE


# Every route this backend has: on a CPU "auto" is "fused" on torch and, for
# LSTMs, on TensorFlow and JAX.
ROUTES = ["auto", "keras"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name", ABLATIONS)
def test_every_variant_at_small_size(name, route, rng):
    backend = keras.backend.backend()
    if route == "keras" and backend in ("tensorflow", "jax") and name.startswith(("gru_", "rnn_")):
        pytest.skip(f"{backend}'s fused route is LSTM only: 'auto' already ran Keras' loop")
    reference = make_reference(name, seed=1)
    model = ks.create_model(
        name,
        include_preprocessing=False,
        input_shape=(56, 42, 3),
        classifier_activation=None,
        rnn_route=route,
    )
    ks.load_torch_state_dict(model, reference.state_dict())
    x = normalize(_images(rng, 2, 56, 42))
    diff = np.abs(run_model(model, x) - reference_logits(reference, x)).max()
    assert diff <= TOLERANCE, diff


def test_authors_layout_wrapped_and_prefixed(rng):
    reference = make_reference("sequencer2d_s", seed=2)
    authors = to_authors_layout(reference.state_dict(), AUTHORS_VARIANTS["sequencer2d_s"]["layers"])
    assert "blocks.0.4.down.weight" in authors and "head.weight" in authors
    wrapped = {"model": {f"module.{k}": v for k, v in authors.items()}}
    model = ks.Sequencer2DS(
        weights=None, include_preprocessing=False, input_shape=(70, 70, 3), classifier_activation=None
    )
    ks.load_torch_state_dict(model, wrapped)
    x = normalize(_images(rng, 2, 70, 70))
    diff = np.abs(run_model(model, x) - reference_logits(reference, x)).max()
    assert diff <= TOLERANCE, diff

"""Shared test set-up.

torch/torchvision/timm are imported before anything loads TensorFlow: with
tensorflow 2.21 and torchvision 0.29 the other order crashes the process.
"""

import os
import sys

try:  # the reference implementation; a test dependency
    import torch  # noqa: F401
    import torchvision  # noqa: F401
    import timm  # noqa: F401
except ImportError:
    pass

import keras
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))


def pytest_report_header(config):
    return f"keras {keras.__version__}, backend: {keras.backend.backend()}"


def run_model(model, x):
    """Inference output as numpy. JAX runs compiled (eager JAX recompiles every
    recurrent loop on each call); TF and torch run eagerly, which is faster here."""
    if keras.backend.backend() == "jax":
        return np.asarray(model.predict(x, verbose=0, batch_size=len(x)))
    return keras.ops.convert_to_numpy(model(x, training=False))


# Slow tests of backend-independent behaviour (fresh interpreters, file handling,
# command-line wiring, downloads) run once, under TensorFlow: that is also the
# backend where the torch-before-TensorFlow import order matters.
run_once = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="backend-independent test; runs under TensorFlow",
)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _tensorflow_trains_with_block_lstm(request, monkeypatch):
    """In-process training on TensorFlow runs BlockLSTM unless a test is marked
    `tensorflow_trained_form` or sets layers.TENSORFLOW_TRAINS_UNROLLED itself.
    The trained form (layers.tensorflow_trained_lstm, the default for short
    sequences) compiles two XLA programs per sequence shape, 1-3 s each, which
    the suite's many tiny fits would pay dozens of times (the TensorFlow run
    grew by about 25 minutes). test_routes checks the form against Keras'
    route and BlockLSTM; the marked journeys and the command-line subprocesses
    train with it."""
    if keras.backend.backend() == "tensorflow" and request.node.get_closest_marker("tensorflow_trained_form") is None:
        from keras_sequencer import layers

        monkeypatch.setattr(layers, "TENSORFLOW_TRAINS_UNROLLED", False)

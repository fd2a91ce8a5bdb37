"""Trains the same small model on one device and data-parallel on two virtual CPU
devices, and prints both loss histories as JSON. Run by test_finetune.py in a fresh
process, since the device count is fixed when the backend starts."""

import json
import os
import sys

BACKEND = os.environ["KERAS_BACKEND"]
if BACKEND == "jax":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
else:
    import tensorflow as tf

    (cpu,) = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from keras_sequencer.tasks.demo import DIGITS_CONFIG, load_digits_rgb  # noqa: E402
from keras_sequencer.tasks.finetune import distribution_scope  # noqa: E402
from keras_sequencer.models import Sequencer2D  # noqa: E402


def train(distribute):
    keras.utils.set_random_seed(0)
    x, y, _, _ = load_digits_rgb()
    x, y = x[:128], keras.utils.to_categorical(y[:128], 10)
    with distribution_scope(distribute):
        model = Sequencer2D(**DIGITS_CONFIG, input_shape=(8, 8, 3), classes=10)
        model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss="categorical_crossentropy")
    history = model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    return [float(v) for v in history.history["loss"]]


if BACKEND == "jax":
    import jax

    devices = len(jax.devices())
else:
    devices = len(tf.config.list_logical_devices("CPU"))
single = train(False)
parallel = train(True)
print(json.dumps({"devices": devices, "single": single, "parallel": parallel}))

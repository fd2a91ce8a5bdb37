"""A user's whole journey, as a user takes it.

The command-line journey drives `keras-sequencer` in fresh processes: fine-tune
at a small image size, resume with only `--resume`, survive a SIGKILL in the
middle of an epoch, predict a folder, evaluate, export to TFLite and run the
file. No option is repeated: every command reads what the run and the model
already know. The Python journey (fit, save, load, predict, export) runs on
every backend.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

pytest.importorskip("sklearn")
from sklearn.datasets import load_digits  # noqa: E402

import keras_sequencer as ks  # noqa: E402
from conftest import run_model, run_once  # noqa: E402
from keras_sequencer.models import Sequencer2D  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32
CLASSES = ["zero", "one", "two"]
TINY = dict(layers=(1, 1), patch_sizes=(2, 2), embed_dims=(32, 48), hidden_sizes=(8, 12), mlp_ratios=(2.0, 2.0))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Three classes of real digit scans as 32x32 PNGs (30 each), in class folders."""
    from PIL import Image

    root = tmp_path_factory.mktemp("journey") / "digits"
    digits = load_digits()
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i, image in enumerate(digits.images[digits.target == label][:30]):
            scan = Image.fromarray((image / 16.0 * 255.0).astype("uint8")).resize((SIZE, SIZE), Image.BICUBIC)
            scan.save(root / name / f"{i:02d}.png")
    (root / "one" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def start_model(tmp_path_factory):
    """A compact Sequencer2D that takes any size: the user's starting point."""
    keras.utils.set_random_seed(0)
    model = Sequencer2D(**TINY, input_shape=(None, None, 3), classes=10, name="tiny")
    path = tmp_path_factory.mktemp("start") / "tiny.keras"
    model.save(path)
    return str(path)


def cli(*args, cwd, check=True, **kwargs):
    result = subprocess.run(
        [sys.executable, "-m", "keras_sequencer.cli", *args],
        cwd=cwd, capture_output=True, text=True, timeout=900,
        env=dict(os.environ, KERAS_BACKEND="tensorflow"), **kwargs,
    )
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result


def history_epochs(run):
    with open(run / "history.csv", newline="") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def assert_quiet(stderr):
    """No TensorFlow C++ log lines, no Keras warnings that are not about the data."""
    for marker in ("I0000", "W0000", "E0000", "absl::InitializeLog", "oneDNN", "UserWarning", "ran out of data",
                   "shuffle=True"):
        assert marker not in stderr, stderr[-3000:]


@run_once
def test_command_line_journey(photos, start_model, tmp_path):
    run = tmp_path / "run"
    first = cli("finetune", str(photos), "--weights", start_model, "--image-size", str(SIZE), "--epochs", "2",
                "--batch-size", "16", "--lr", "3e-3", "--warmup-epochs", "0", "--output", str(run), cwd=tmp_path)
    assert_quiet(first.stderr)
    out = first.stdout
    # The data summary comes before training starts.
    assert out.index("90 images in 3 classes") < out.index("Epoch 1/2")
    assert "skipped 1 unreadable files (one/notes.txt)" in out
    assert out.strip().splitlines()[-1].startswith("accuracy: ")
    record = json.loads((run / "run.json").read_text())
    assert record["settings"]["image_size"] == [SIZE, SIZE] and record["settings"]["batch_size"] == 16
    assert record["class_names"] == sorted(CLASSES) and record["keras_backend"] == "tensorflow"
    assert history_epochs(run) == [0, 1]

    # An option that contradicts the record fails before anything is written.
    before = {p.name: p.stat().st_mtime_ns for p in run.rglob("*")}
    refused = cli("finetune", "--output", str(run), "--resume", "--batch-size", "32", cwd=tmp_path, check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        f"error: --batch-size 32 contradicts the run in {run}, which used 16 (on resume only --epochs may change)"
    )
    assert {p.name: p.stat().st_mtime_ns for p in run.rglob("*")} == before

    # Resume with nothing but --resume (and a longer schedule), killed mid-epoch, resumed again.
    env = dict(os.environ, KERAS_BACKEND="tensorflow")
    command = [sys.executable, "-m", "keras_sequencer.cli", "finetune", "--output", str(run), "--resume",
               "--epochs", "5"]
    job = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = run / "backup" / "state.json"
    deadline = time.monotonic() + 600
    while json.loads(state.read_text())["epochs_done"] < 3 and job.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)  # into epoch 4
    job.send_signal(signal.SIGKILL)
    job.wait()
    done = json.loads(state.read_text())["epochs_done"]
    assert 3 <= done < 5
    assert history_epochs(run) == list(range(done))
    keras.models.load_model(run / "best.keras")  # still whole

    resumed = cli("finetune", "--output", str(run), "--resume", cwd=tmp_path)
    assert f"resuming {run} after epoch {done} of 5" in resumed.stdout
    assert history_epochs(run) == [0, 1, 2, 3, 4]
    assert sorted(os.listdir(run / "backup")) == ["epoch-0004.weights.h5", "state.json"]
    accuracy = float(resumed.stdout.strip().splitlines()[-1].split()[-1])

    # The fine-tuned model names its classes and knows its size: nothing repeated.
    best = keras.models.load_model(run / "best.keras")
    assert best.metadata["class_names"] == sorted(CLASSES) and best.metadata["image_size"] == [SIZE, SIZE]
    predicted = cli("predict", str(photos / "two"), "--weights", str(run / "best.keras"), "--json", "--top", "3",
                    cwd=tmp_path)
    assert_quiet(predicted.stderr)
    results = json.loads(predicted.stdout)
    assert [r["image"] for r in results] == [str(photos / "two" / f"{i:02d}.png") for i in range(30)]
    assert {p["label"] for p in results[0]["predictions"]} == set(CLASSES)
    images = np.stack([ks.load_image(r["image"], SIZE) for r in results])
    probabilities = keras.ops.convert_to_numpy(best(images))
    for result, row in zip(results, probabilities):
        assert result["predictions"][0]["label"] == sorted(CLASSES)[int(row.argmax())]
        assert abs(result["predictions"][0]["probability"] - float(row.max())) <= 1e-5

    evaluated = cli("evaluate", str(photos), "--weights", str(run / "best.keras"), cwd=tmp_path)
    assert "images: 90" in evaluated.stdout and "top-1: " in evaluated.stdout
    assert 0.0 <= accuracy <= 1.0

    # Export what the run made, run the file, compare with Keras.
    pytest.importorskip("ai_edge_litert")
    from ai_edge_litert.interpreter import Interpreter

    exported = cli("export", "--weights", str(run / "best.keras"), "--format", "tflite",
                   "--output", str(tmp_path / "digits.tflite"), cwd=tmp_path)
    assert "wrote" in exported.stdout
    interpreter = Interpreter(model_path=str(tmp_path / "digits.tflite"))
    interpreter.allocate_tensors()
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    assert tuple(inp["shape"]) == (1, SIZE, SIZE, 3)
    for image, expected in zip(images[:4], probabilities[:4]):
        interpreter.set_tensor(inp["index"], image[None])
        interpreter.invoke()
        assert np.abs(interpreter.get_tensor(out["index"])[0] - expected).max() <= 1e-4


@run_once
def test_resuming_a_run_that_failed_mid_commit(photos, start_model, tmp_path, monkeypatch):
    """A run that dies while committing an epoch resumes from the last whole one."""
    from keras_sequencer.tasks import finetune as finetune_module

    run = tmp_path / "run"
    options = dict(weights=start_model, image_size=SIZE, batch_size=16, learning_rate=3e-3, verbose=0)
    finetune_module.finetune(str(photos), str(run), epochs=1, **options)
    real = finetune_module._write_json

    def dies_at_the_commit(path, value):
        if path.endswith("state.json") and value["epochs_done"] == 2:
            raise OSError("disk full")
        return real(path, value)

    monkeypatch.setattr(finetune_module, "_write_json", dies_at_the_commit)
    with pytest.raises(OSError, match="disk full"):
        finetune_module.finetune(output_dir=str(run), resume=True, epochs=3, verbose=0)
    monkeypatch.setattr(finetune_module, "_write_json", real)
    assert history_epochs(run) == [0]
    result = finetune_module.finetune(output_dir=str(run), resume=True, verbose=0)
    assert result["epochs_done"] == 3 and history_epochs(run) == [0, 1, 2]
    assert sorted(os.listdir(run / "backup")) == ["epoch-0002.weights.h5", "state.json"]
    keras.models.load_model(run / "best.keras")


def test_python_journey(tmp_path):
    """fit, save, load, predict, and export where the backend allows, as a Keras user does."""
    digits = load_digits()
    x = np.repeat((digits.images[:256] / 16.0 * 255.0).astype("float32")[..., None], 3, axis=-1)
    y = keras.utils.to_categorical(digits.target[:256], 10)
    keras.utils.set_random_seed(0)
    model = ks.Sequencer2D(**TINY, input_shape=(8, 8, 3), classes=10, name="digits")
    model.compile(optimizer=keras.optimizers.AdamW(3e-3), loss="categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    model.save(tmp_path / "digits.keras")
    loaded = keras.models.load_model(tmp_path / "digits.keras")
    np.testing.assert_allclose(run_model(loaded, x[:8]), run_model(model, x[:8]), atol=1e-5)
    assert loaded.evaluate(x, y, verbose=0)[1] == pytest.approx(model.evaluate(x, y, verbose=0)[1], abs=1e-6)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        pytest.importorskip("ai_edge_litert")
        path = ks.export(loaded, str(tmp_path / "digits.tflite"), format="tflite")
        assert os.path.getsize(path) > 0
    elif backend == "torch":
        pytest.importorskip("onnxruntime")
        import onnxruntime

        path = ks.export(loaded, str(tmp_path / "digits.onnx"), format="onnx", batch_size=8)
        session = onnxruntime.InferenceSession(path)
        (out,) = session.run(None, {session.get_inputs()[0].name: x[:8]})
        np.testing.assert_allclose(out, run_model(model, x[:8]), atol=1e-4)

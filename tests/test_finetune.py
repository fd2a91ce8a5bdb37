"""`keras-sequencer finetune`: folders in, best model, log, plots and resumable backups out."""

import csv
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

import keras_sequencer as ks  # noqa: E402
from keras_sequencer import cli  # noqa: E402
from keras_sequencer.tasks.demo import load_digits_rgb  # noqa: E402
from keras_sequencer.tasks.finetune import FinetuneError, finetune  # noqa: E402
from keras_sequencer.models import Sequencer2D  # noqa: E402

BACKEND = keras.backend.backend()
SIZE = 16


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Three classes of real digits as 16x16 PNGs, plus a corrupt image and a text file."""
    from PIL import Image

    root = tmp_path_factory.mktemp("digits")
    x, y, _, _ = load_digits_rgb()
    for digit in (0, 1, 2):
        folder = root / f"digit_{digit}"
        folder.mkdir()
        for i, image in enumerate(x[y == digit][:14]):
            Image.fromarray(image.astype("uint8")).resize((SIZE, SIZE)).save(folder / f"{i}.png")
    (root / "digit_0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "digit_1" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def small_start(tmp_path_factory):
    """A compact Sequencer2D saved as .keras: the starting weights (--weights PATH)."""
    keras.utils.set_random_seed(0)
    model = Sequencer2D(
        layers=(1, 1), patch_sizes=(2, 2), embed_dims=(32, 48), hidden_sizes=(8, 12),
        mlp_ratios=(2.0, 2.0), input_shape=(SIZE, SIZE, 3), classes=10, name="small",
    )
    path = tmp_path_factory.mktemp("start") / "small.keras"
    model.save(path)
    return str(path)


class StopAfterEpoch(keras.callbacks.Callback):
    """Simulates an interruption (a killed job) once `epoch` has been backed up."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def logged_epochs(output):
    with open(output / "history.csv", newline="") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


@pytest.mark.tensorflow_trained_form
def test_finetune_resumes_after_interruption(image_folder, small_start, tmp_path):
    output = tmp_path / "run"
    options = dict(weights=small_start, image_size=SIZE, batch_size=8, learning_rate=2e-3, verbose=0)
    with pytest.raises(KeyboardInterrupt):
        finetune(str(image_folder), str(output), epochs=3, extra_callbacks=[StopAfterEpoch(1)], **options)
    assert logged_epochs(output) == [0, 1]
    result = finetune(str(image_folder), str(output), epochs=3, resume=True, **options)
    assert logged_epochs(output) == [0, 1, 2]
    steps_per_epoch = int(np.ceil(result["train_images"] / 8))
    assert result["optimizer_steps"] == 3 * steps_per_epoch  # optimizer state came back
    assert result["skipped"] == 2 and result["classes"] == ["digit_0", "digit_1", "digit_2"]
    assert result["validation_images"] == 9 and result["train_images"] == 33
    for name in ("best.keras", "history.csv", "curves.png", "confusion_matrix.png", "classes.json"):
        assert (output / name).stat().st_size > 0, name
    best = keras.models.load_model(output / "best.keras")
    assert best.output_shape == (None, 3)
    with pytest.raises(FinetuneError, match="--resume"):
        finetune(str(image_folder), str(output), epochs=3, **options)


@pytest.mark.tensorflow_trained_form
def test_mixed_precision_trains_a_saved_model_in_bfloat16(image_folder, small_start, tmp_path, capsys, monkeypatch):
    """--mixed-precision from a float32 `.keras` start (which restores the
    policy it was saved with): the run trains and saves bfloat16 layers, leaves
    the global policy as it was, and notes where bfloat16 is the slower choice."""
    from keras_sequencer.tasks import finetune as finetune_module

    monkeypatch.setattr(finetune_module, "cpu_has_bfloat16", lambda: True)
    result = finetune(str(image_folder), str(tmp_path / "bf16"), weights=small_start, image_size=SIZE, epochs=1,
                      batch_size=8, mixed_precision=True, verbose=2)
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    if BACKEND == "jax":
        assert len(notes) == 1 and "on JAX, bfloat16 on a CPU" in notes[0]
    else:
        assert notes == []
    assert keras.config.dtype_policy().name == "float32"
    best = keras.models.load_model(result["best_model"])
    assert best.get_layer("stem").dtype_policy.name == "mixed_bfloat16"
    assert best.output_shape == (None, 3)
    scores = ks.evaluate(best, str(image_folder), progress=False)  # the next step of a user's journey
    assert scores["images"] == 42 and 0 <= scores["top1"] <= 100


def test_mixed_precision_on_a_cpu_without_bfloat16_says_it_is_slower(monkeypatch):
    from keras_sequencer.tasks import finetune as finetune_module

    monkeypatch.setattr(finetune_module, "has_gpu", lambda: False)
    monkeypatch.setattr(finetune_module, "cpu_has_bfloat16", lambda: False)
    assert finetune_module.mixed_precision_policy() == (
        "mixed_bfloat16",
        "this CPU has no bfloat16 instructions (AVX512-BF16, AMX): bfloat16 trains slower than float32 here; "
        "leave out --mixed-precision for speed",
    )
    monkeypatch.setattr(finetune_module, "has_gpu", lambda: True)
    assert finetune_module.mixed_precision_policy() == ("mixed_float16", None)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="the command's wiring; the fit above runs on every backend")
def test_finetune_command_freezes_the_backbone(image_folder, small_start, tmp_path, capsys):
    output = tmp_path / "frozen"
    before = keras.models.load_model(small_start).get_layer("stem").get_weights()[0]
    status = cli.main(["finetune", str(image_folder), "--weights", small_start, "--image-size", str(SIZE),
                       "--epochs", "1", "--batch-size", "8", "--freeze-backbone",
                       "--output", str(output)])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "skipped 2 unreadable" in out
    assert out.strip().splitlines()[-1].startswith("accuracy: ")
    tuned = keras.models.load_model(output / "best.keras")
    np.testing.assert_array_equal(tuned.get_layer("stem").get_weights()[0], before)
    assert json.loads((output / "classes.json").read_text()) == ["digit_0", "digit_1", "digit_2"]


@pytest.mark.skipif(BACKEND != "tensorflow", reason="backend-independent script; runs under TensorFlow")
def test_finetune_example_runs(image_folder, small_start, tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, os.path.join("examples", "finetune_folder.py"), str(image_folder),
         "--weights", small_start, "--image-size", str(SIZE), "--epochs", "1", "--batch-size", "8",
         "--output", str(tmp_path / "example")],
        cwd=root, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith("accuracy: ")
    assert (tmp_path / "example" / "best.keras").exists()


def test_finetune_errors_are_one_line(image_folder, tmp_path, capsys):
    def fails(args, message):
        assert cli.main(["finetune", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err

    fails([str(tmp_path / "missing")], "no such directory")
    (tmp_path / "empty").mkdir()
    fails([str(tmp_path / "empty")], "no class sub-folders")
    lonely = tmp_path / "lonely" / "cats"
    lonely.mkdir(parents=True)
    (lonely / "a.png").write_bytes((image_folder / "digit_0" / "0.png").read_bytes())
    fails([str(tmp_path / "lonely")], "at least two class folders")
    unreadable = tmp_path / "unreadable"
    for name in ("a", "b"):
        (unreadable / name).mkdir(parents=True)
        (unreadable / name / "x.jpg").write_bytes(b"garbage")
    fails([str(unreadable)], "no readable images")
    fails([str(image_folder), "--image-size", "8", "--weights", "none"], "too small for sequencer2d_s")
    fails([str(image_folder), "--resume", "--output", str(tmp_path / "fresh")], "nothing to resume")
    fails([str(image_folder), "--weights", str(tmp_path / "nope.keras")], "no such weights file")
    if BACKEND == "torch":
        refused = tmp_path / "refused"
        fails([str(image_folder), "--distribute", "--weights", "none", "--image-size", "32", "--output", str(refused)],
              "--distribute runs on")
        assert not refused.exists()  # refused before anything was written


@pytest.mark.skipif(BACKEND == "torch", reason="--distribute is JAX DataParallel or TF MirroredStrategy")
def test_data_parallel_on_two_devices_matches_one_device():
    script = os.path.join(os.path.dirname(__file__), "distributed_loss.py")
    result = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=900,
                            env=dict(os.environ, KERAS_BACKEND=BACKEND))
    assert result.returncode == 0, result.stderr[-3000:]
    losses = json.loads(result.stdout.strip().splitlines()[-1])
    assert losses["devices"] == 2
    np.testing.assert_allclose(losses["parallel"], losses["single"], rtol=1e-4)

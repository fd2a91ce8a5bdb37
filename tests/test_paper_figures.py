"""examples/paper_figures.py (the README's ERF and resolution pictures) runs end
to end: a one-epoch digits demo, a small ERF batch and two sweep sizes."""

import os
import subprocess
import sys

import keras
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="subprocess smoke test; runs under TensorFlow")
def test_paper_figures_script_writes_both_pngs(tmp_path):
    output, work = tmp_path / "images", tmp_path / "work"
    env = dict(os.environ, KERAS_BACKEND="tensorflow")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "paper_figures.py"),
         "--output-dir", str(output), "--work-dir", str(work),
         "--epochs", "1", "--sizes", "8", "16", "--erf-images", "8", "--layers", "stages_0_blocks_0,stages_1_blocks_1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    for name in ("erf.png", "resolution.png"):
        path = output / name
        assert path.is_file(), name
        with open(path, "rb") as f:
            assert f.read(8) == PNG_SIGNATURE, name
    assert (work / "resolution" / "resolution.csv").is_file()
    assert "16 px: top-1" in result.stdout

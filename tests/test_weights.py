"""weights="imagenet" against a local hub (127.0.0.1), and local checkpoint files.

Served files are random-weight checkpoints made from timm here; no test touches
the internet.
"""

import hashlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

pytest.importorskip("timm")
safetensors_numpy = pytest.importorskip("safetensors.numpy")
import torch  # noqa: E402

import keras_sequencer as ks  # noqa: E402
from keras_sequencer import registry  # noqa: E402
from keras_sequencer import weights as weights_module  # noqa: E402
from keras_sequencer.weights import hub as hub_module  # noqa: E402
from conftest import run_model, run_once  # noqa: E402
from hub_server import serve_pretrained  # noqa: E402
from reference import (  # noqa: E402
    AUTHORS_VARIANTS,
    make_reference,
    normalize,
    reference_logits,
    to_authors_layout,
)

SOURCE = registry.PRETRAINED["sequencer2d_s"]
REPO, COMMIT, FILENAME = SOURCE["repo_id"], SOURCE["revision"], SOURCE["filename"]
HUB_PATH = f"/{REPO}/resolve/{COMMIT}/{FILENAME}"
SIZE = 56


def _safetensors_bytes(state_dict, path):
    arrays = {k: np.ascontiguousarray(v.detach().numpy()) for k, v in state_dict.items()}
    safetensors_numpy.save_file(arrays, str(path))
    return path.read_bytes()


@pytest.fixture(scope="module")
def reference():
    return make_reference("sequencer2d_s", seed=5)


@pytest.fixture(scope="module")
def checkpoint_bytes(reference, tmp_path_factory):
    return _safetensors_bytes(reference.state_dict(), tmp_path_factory.mktemp("ckpt") / "model.safetensors")


@pytest.fixture
def hub(monkeypatch, tmp_path, checkpoint_bytes):
    server = serve_pretrained(monkeypatch, tmp_path, "sequencer2d_s", checkpoint_bytes)
    yield server
    server.stop()


def _repo_cache():
    return os.path.join(hub_module.hub_cache_dir(), "models--" + REPO.replace("/", "--"))


def _cache_files():
    """The complete files of the repository in the Hugging Face cache (blobs)."""
    blobs = os.path.join(_repo_cache(), "blobs")
    names = sorted(os.listdir(blobs)) if os.path.isdir(blobs) else []
    return [n for n in names if not n.endswith(".incomplete")]


def _partial_files():
    blobs = os.path.join(_repo_cache(), "blobs")
    names = sorted(os.listdir(blobs)) if os.path.isdir(blobs) else []
    return [os.path.join(blobs, n) for n in names if n.endswith(".incomplete")]


def _assert_parity(model, reference, rng):
    images = rng.uniform(0, 255, (2, SIZE, SIZE, 3)).astype("float32")
    diff = np.abs(run_model(model, images) - reference_logits(reference, normalize(images))).max()
    assert diff <= 1e-4, diff


def test_imagenet_download_convert_cache_and_reuse_offline(hub, reference, rng):
    model = ks.Sequencer2DS(input_shape=(SIZE, SIZE, 3), classifier_activation=None)
    _assert_parity(model, reference, rng)
    assert hub.requests == 1
    # One copy on disk: the checkpoint in the Hugging Face cache, named by its sha256.
    assert _cache_files() == [registry.PRETRAINED["sequencer2d_s"]["sha256"]]
    assert not os.path.exists(os.path.join(os.environ["KERAS_HOME"], "models"))
    hub.stop()  # later calls use only the cache
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        again = ks.Sequencer2DS(include_top=False, pooling="avg", input_shape=(SIZE, SIZE, 3))
    finally:
        del os.environ["HF_HUB_OFFLINE"]
    full = ks.Sequencer2DS(input_shape=(SIZE, SIZE, 3), classifier_activation=None)
    assert hub.requests == 1
    images = rng.uniform(0, 255, (1, SIZE, SIZE, 3)).astype("float32")
    features = run_model(again, images)
    with torch.no_grad():
        x = torch.from_numpy(normalize(images).transpose(0, 3, 1, 2).copy())
        expected = reference.forward_head(reference.forward_features(x), pre_logits=True).numpy()
    assert np.abs(features - expected).max() <= 1e-4
    _assert_parity(full, reference, rng)


def test_hash_mismatch_removes_the_file(hub, monkeypatch):
    monkeypatch.setitem(registry.PRETRAINED, "sequencer2d_s", dict(SOURCE, sha256="0" * 64))
    with pytest.raises(ValueError, match="sha256 mismatch.*expected 0{64}, got [0-9a-f]{64}.*removed"):
        ks.Sequencer2DS(input_shape=(SIZE, SIZE, 3))
    assert _cache_files() == []
    # The removed file is not taken from the cache next time: it is downloaded anew.
    with pytest.raises(ValueError, match="sha256 mismatch"):
        ks.Sequencer2DS(input_shape=(SIZE, SIZE, 3))
    assert hub.requests == 2


def test_truncated_body(hub):
    hub.mode = "truncate"
    with pytest.raises(ValueError, match="truncated|interrupted"):
        ks.Sequencer2DS(input_shape=(SIZE, SIZE, 3))
    assert _cache_files() == []


def test_not_found(hub):
    hub.files.clear()
    with pytest.raises(ValueError, match=r"HTTP 404.*local file"):
        ks.Sequencer2DS(input_shape=(SIZE, SIZE, 3))
    assert _cache_files() == []


@run_once  # huggingface_hub's retries take 20 s; the download is the same on every backend
def test_connection_refused_says_what_to_do(hub, monkeypatch):
    """An unreachable endpoint: huggingface_hub's retries, then one line."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(ValueError) as info:
        ks.Sequencer2DS(input_shape=(SIZE, SIZE, 3))
    message = str(info.value)
    assert f"http://127.0.0.1:{port}{HUB_PATH}" in message
    assert "HF_ENDPOINT" in message and "local file" in message


def test_offline_without_cache(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set"):
        ks.Sequencer2DS(input_shape=(SIZE, SIZE, 3))
    assert hub.requests == 0


def test_wrong_variant_file_names_the_variant(hub):
    gru = make_reference("gru_sequencer2d_s", seed=6)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        from pathlib import Path

        body = _safetensors_bytes(gru.state_dict(), Path(d) / "gru.safetensors")
    hub.files[HUB_PATH] = body
    registry.PRETRAINED["sequencer2d_s"] = dict(SOURCE, sha256=hashlib.sha256(body).hexdigest())
    with pytest.raises(ValueError, match="looks like 'gru_sequencer2d_s'"):
        ks.Sequencer2DS(input_shape=(SIZE, SIZE, 3))


def _loader_script(sha):
    return textwrap.dedent(
        f"""
        import keras_sequencer as ks
        from keras_sequencer import registry
        registry.PRETRAINED["sequencer2d_s"]["sha256"] = {sha!r}
        model = ks.Sequencer2DS(input_shape=({SIZE}, {SIZE}, 3))
        print("loaded", flush=True)
        """
    )


@run_once
def test_two_processes_loading_at_once(hub, checkpoint_bytes):
    sha = hashlib.sha256(checkpoint_bytes).hexdigest()
    script = _loader_script(sha)
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
        assert "loaded" in out
    assert _cache_files() == [sha]


@run_once
def test_killed_download_leaves_nothing_taken_for_good(hub, checkpoint_bytes, reference, rng):
    hub.mode = "slow"
    script = _loader_script(hashlib.sha256(checkpoint_bytes).hexdigest())
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        partial = _partial_files()
        if hub.requests and partial and os.path.getsize(partial[0]) > 2 << 20:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _cache_files() == []  # only the .incomplete part, never taken for the file
    hub.mode = "ok"
    model = ks.Sequencer2DS(input_shape=(SIZE, SIZE, 3), classifier_activation=None)  # resumes
    _assert_parity(model, reference, rng)


def test_authors_pth_file_loads_as_it_is(tmp_path, rng):
    reference = make_reference("sequencer2d_s", seed=7)
    path = tmp_path / "sequencer2d_s.pth"
    torch.save(to_authors_layout(reference.state_dict(), AUTHORS_VARIANTS["sequencer2d_s"]["layers"]), path)
    model = ks.Sequencer2DS(weights=str(path), input_shape=(SIZE, SIZE, 3), classifier_activation=None)
    _assert_parity(model, reference, rng)


def test_local_safetensors_and_corrupt_files(tmp_path, reference, checkpoint_bytes, rng):
    good = tmp_path / "model.safetensors"
    good.write_bytes(checkpoint_bytes)
    model = ks.Sequencer2DS(weights=str(good), input_shape=(SIZE, SIZE, 3), classifier_activation=None)
    _assert_parity(model, reference, rng)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(checkpoint_bytes[: len(checkpoint_bytes) // 3])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        ks.Sequencer2DS(weights=str(truncated), input_shape=(SIZE, SIZE, 3))

    pth = tmp_path / "model.pth"
    torch.save(reference.state_dict(), pth)
    broken = tmp_path / "broken.pth"
    broken.write_bytes(pth.read_bytes()[:100_000])
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        ks.Sequencer2DS(weights=str(broken), input_shape=(SIZE, SIZE, 3))

    unknown = tmp_path / "model.npz"
    unknown.write_bytes(b"x")
    with pytest.raises(ValueError, match="Unsupported weights file"):
        ks.Sequencer2DS(weights=str(unknown), input_shape=(SIZE, SIZE, 3))


def test_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path)
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        ks.Sequencer2DS(weights=str(path), input_shape=(SIZE, SIZE, 3))


def test_missing_torch_is_explained(tmp_path, monkeypatch):
    path = tmp_path / "model.pth"
    path.write_bytes(b"anything")
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(ValueError, match="needs torch.*weights_conversion"):
        weights_module.read_checkpoint(path)


def test_old_converted_cache_is_retired_with_a_message(hub, reference, rng, capfd):
    old = os.path.join(os.environ["KERAS_HOME"], "models", f"sequencer2d_s.in1k.{COMMIT[:12]}.weights.h5")
    os.makedirs(os.path.dirname(old))
    with open(old, "wb") as f:
        f.write(b"a converted copy from an older version")
    model = ks.Sequencer2DS(input_shape=(SIZE, SIZE, 3), classifier_activation=None)
    _assert_parity(model, reference, rng)
    assert not os.path.exists(old)
    assert "removed the old converted copy" in capfd.readouterr().err


def test_a_file_timm_already_downloaded_is_used(hub, checkpoint_bytes, reference, rng):
    """timm's own download (huggingface_hub into the same cache) is found: nothing is fetched."""
    import huggingface_hub

    huggingface_hub.hf_hub_download(
        REPO, FILENAME, revision=COMMIT, endpoint=hub.endpoint, cache_dir=hub_module.hub_cache_dir()
    )
    fetched = hub.requests
    model = ks.Sequencer2DS(input_shape=(SIZE, SIZE, 3), classifier_activation=None)
    assert hub.requests == fetched
    _assert_parity(model, reference, rng)


TINY = dict(layers=(1, 1), patch_sizes=(4, 2), embed_dims=(16, 32), hidden_sizes=(8, 16), mlp_ratios=(2.0, 2.0))


def test_keras_weights_file_follows_the_head_rule(tmp_path, rng):
    """A .weights.h5 meets the rule of checkpoints and "imagenet": a model
    without a top takes a file with one; with a top the classes must match."""
    from keras_sequencer.models import Sequencer2D

    full = Sequencer2D(**TINY, input_shape=(32, 32, 3), classes=10, classifier_activation=None)
    path = str(tmp_path / "tiny.weights.h5")
    full.save_weights(path)
    images = rng.uniform(0, 255, (2, 32, 32, 3)).astype("float32")

    same = Sequencer2D(**TINY, input_shape=(32, 32, 3), classes=10, classifier_activation=None, weights=path)
    np.testing.assert_allclose(run_model(same, images), run_model(full, images), atol=1e-6)

    backbone = Sequencer2D(**TINY, input_shape=(32, 32, 3), include_top=False, pooling="avg", weights=path)
    pooled = Sequencer2D(**TINY, input_shape=(32, 32, 3), include_top=False, pooling="avg")
    pooled.set_weights([v.numpy() if hasattr(v, "numpy") else v for v in full.get_weights()[: len(pooled.weights)]])
    np.testing.assert_allclose(run_model(backbone, images), run_model(pooled, images), atol=1e-6)

    with pytest.raises(ValueError, match=r"head has 10 classes and the model's 5: build with classes=10") as info:
        Sequencer2D(**TINY, input_shape=(32, 32, 3), classes=5, weights=path)
    assert len(str(info.value)) < 400 and "\n" not in str(info.value)

    no_top = str(tmp_path / "no_top.weights.h5")
    backbone.save_weights(no_top)
    with pytest.raises(ValueError, match="has no classification head"):
        Sequencer2D(**TINY, input_shape=(32, 32, 3), classes=10, weights=no_top)


def test_keras_weights_file_of_another_variant_names_it(tmp_path):
    gru = ks.create_model("gru_sequencer2d_s", input_shape=(28, 28, 3))
    path = str(tmp_path / "gru.weights.h5")
    gru.save_weights(path)
    with pytest.raises(ValueError, match="looks like 'gru_sequencer2d_s'") as info:
        ks.Sequencer2DS(weights=path, input_shape=(28, 28, 3))
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message

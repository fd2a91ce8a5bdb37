"""Every export is loaded back in its own runtime and compared with Keras."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import run_model

import keras_sequencer as ks
from keras_sequencer.tasks import export as export_lib

BACKEND = keras.backend.backend()
tf_only = pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's exporters")
TOLERANCE = 1e-4
SMALL = dict(
    layers=(1, 1),
    patch_sizes=(4, 2),
    embed_dims=(16, 32),
    hidden_sizes=(8, 16),
    mlp_ratios=(2.0, 2.0),
)


def small_model(input_shape=(None, None, 3), **overrides):
    keras.utils.set_random_seed(0)
    model = ks.Sequencer2D(
        **dict(SMALL, **overrides),
        input_shape=input_shape,
        classes=10,
        weights=None,
        classifier_activation=None,
        name="small",
    )
    return with_random_biases(model)


def with_random_biases(model):
    """Non-zero biases and norm affines, so a dropped term would show."""
    rng = np.random.default_rng(1)
    for variable in model.weights:
        if len(variable.shape) <= 1:
            noise = rng.normal(0.0, 0.2, variable.shape).astype("float32")
            variable.assign(keras.ops.convert_to_numpy(variable) + noise)
    return model


def images(shape, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, shape).astype("float32")


@pytest.fixture(scope="module")
def model():
    return small_model()


def run_tflite(path, x):
    interpreter = export_lib.tflite_interpreter(path)
    interpreter.allocate_tensors()
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    interpreter.set_tensor(inp["index"], x.astype(inp["dtype"]))
    interpreter.invoke()
    return interpreter.get_tensor(out["index"])


def run_onnx(path, x):
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    return session.run(None, {inp.name: x})[0]


def assert_portable(path, format):
    ops = export_lib.exported_op_types(path, format)
    assert ops, "no ops read from the export"
    assert not [op for op in ops if "Cudnn" in op or op.startswith(("Flex", "FLEX", "CUSTOM"))], ops


@tf_only
def test_saved_model_serves_any_size(model, tmp_path):
    import tensorflow as tf

    path = export_lib.export(model, tmp_path / "sm")
    assert_portable(path, "saved_model")
    serve = tf.saved_model.load(path).signatures["serving_default"]
    for shape in [(2, 32, 32, 3), (3, 40, 24, 3)]:
        x = images(shape)
        (got,) = serve(tf.constant(x)).values()
        assert np.abs(got.numpy() - run_model(model, x)).max() <= TOLERANCE


@tf_only
@pytest.mark.parametrize("include_preprocessing", [True, False])
def test_saved_model_uint8_in_probabilities_out(include_preprocessing, tmp_path):
    import tensorflow as tf

    model = small_model(include_preprocessing=include_preprocessing)
    path = export_lib.export(model, tmp_path / "sm", image_size=32, uint8_input=True)
    serve = tf.saved_model.load(path).signatures["serving_default"]
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype="uint8")
    (got,) = serve(tf.constant(x)).values()
    floats = x.astype("float32")
    if not include_preprocessing:
        floats = ks.preprocess_input(floats, normalize=True)
    want = keras.ops.convert_to_numpy(keras.ops.softmax(run_model(model, floats)))
    assert got.dtype == tf.float32 and got.shape == (2, 10)
    assert np.abs(got.numpy() - want).max() <= TOLERANCE
    np.testing.assert_allclose(got.numpy().sum(-1), 1.0, atol=1e-5)


@tf_only
def test_tflite_runs_with_builtin_ops_only(model, tmp_path):
    path = export_lib.export(model, tmp_path / "m.tflite", format="tflite", image_size=(36, 28), batch_size=2)
    assert_portable(path, "tflite")
    x = images((2, 36, 28, 3))
    assert np.abs(run_tflite(path, x) - run_model(model, x)).max() <= TOLERANCE


@pytest.fixture(scope="module")
def fp32_tflite(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("fp32") / "fp32.tflite"
    return export_lib.export(model, path, format="tflite", image_size=32, batch_size=32)


@tf_only
@pytest.mark.parametrize("quantize", ["float16", "dynamic-int8"])
def test_tflite_quantized(quantize, model, fp32_tflite, tmp_path):
    x = images((32, 32, 32, 3), seed=3)
    plain = fp32_tflite
    small = export_lib.export(
        model, tmp_path / "q.tflite", format="tflite", image_size=32, batch_size=32, quantize=quantize
    )
    assert_portable(small, "tflite")
    fp32, quantized = run_tflite(plain, x), run_tflite(small, x)
    agreement = float((fp32.argmax(-1) == quantized.argmax(-1)).mean())
    ratio = os.path.getsize(small) / os.path.getsize(plain)
    print(f"{quantize}: top-1 agreement with fp32 {agreement:.3f} on 32 inputs, size {ratio:.2f}x fp32")
    assert np.isfinite(quantized).all()
    # float16 halves every weight; dynamic int8 only quantizes tensors of 1024+
    # elements, which are few in this small model.
    assert ratio < (0.75 if quantize == "float16" else 1.0)
    # float16 weights round at ~1e-3 relative; dynamic int8 at ~1e-2.
    assert agreement >= (0.95 if quantize == "float16" else 0.8)


@pytest.mark.skipif(BACKEND == "jax", reason="ONNX comes from TensorFlow (tf2onnx) or torch (torch.onnx)")
def test_onnx_runs_in_onnxruntime(model, tmp_path):
    path = export_lib.export(model, tmp_path / "m.onnx", format="onnx", image_size=32, batch_size=2)
    assert_portable(path, "onnx")
    x = images((2, 32, 32, 3))
    assert np.abs(run_onnx(path, x) - run_model(model, x)).max() <= TOLERANCE


@tf_only
def test_onnx_from_tensorflow_keeps_free_sizes(model, tmp_path):
    path = export_lib.export(model, tmp_path / "m.onnx", format="onnx")
    x = images((3, 40, 24, 3))
    assert np.abs(run_onnx(path, x) - run_model(model, x)).max() <= TOLERANCE


@tf_only
def test_export_traced_where_a_gpu_is_visible_has_no_cudnn_ops(model, tmp_path, monkeypatch):
    import importlib

    import tensorflow as tf

    rnn = importlib.import_module("keras.src.backend.tensorflow.rnn")
    monkeypatch.setattr(rnn, "_is_gpu_available", lambda: True)
    # On a real GPU "auto" picks Keras' loop (cuDNN); only Keras' check is faked here.
    for layer in model._flatten_layers():
        if isinstance(layer, ks.BiLSTM2D):
            monkeypatch.setattr(layer, "route", "keras")
    # Control: with a GPU in sight, Keras traces the cuDNN kernel.
    traced = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec((1, 32, 32, 3), tf.float32)
    )
    graph_ops = {op.type for op in traced.graph.get_operations()}
    for function in traced.graph.as_graph_def().library.function:
        graph_ops.update(node.op for node in function.node_def)
    assert any(op.startswith("CudnnRNN") for op in graph_ops)

    saved = export_lib.export(model, tmp_path / "sm", image_size=32)
    lite = export_lib.export(model, tmp_path / "m.tflite", format="tflite", image_size=32)
    onnx = export_lib.export(model, tmp_path / "m.onnx", format="onnx", image_size=32)
    for path, format in [(saved, "saved_model"), (lite, "tflite"), (onnx, "onnx")]:
        assert_portable(path, format)
    x = images((1, 32, 32, 3))
    assert np.abs(run_tflite(lite, x) - run_model(model, x)).max() <= TOLERANCE
    assert all(layer.use_cudnn == "auto" for layer in model._flatten_layers() if hasattr(layer, "use_cudnn"))


@tf_only
@pytest.mark.parametrize(
    "arch",
    [
        dict(rnn_type="gru", union="add"),
        dict(rnn_type="rnn", bidirectional=False),
        dict(union="vertical", with_fc=False),
        dict(union="horizontal", with_fc=False),
    ],
    ids=["gru-add", "rnn-unidirectional", "vertical", "horizontal"],
)
def test_tflite_every_variant_kind(arch, tmp_path):
    model = small_model(**arch)
    path = export_lib.export(model, tmp_path / "m.tflite", format="tflite", image_size=(24, 40))
    x = images((1, 24, 40, 3))
    assert np.abs(run_tflite(path, x) - run_model(model, x)).max() <= TOLERANCE


def test_bad_arguments_are_refused_before_anything_is_written(model, tmp_path):
    with pytest.raises(ValueError, match="Unknown export format"):
        export_lib.export(model, tmp_path / "x", format="coreml")
    with pytest.raises(ValueError, match="ending in '.tflite'"):
        export_lib.export(model, tmp_path / "x.onnx", format="tflite", image_size=32)
    with pytest.raises(ValueError, match="tflite format only"):
        export_lib.export(model, tmp_path / "x", quantize="float16")
    with pytest.raises(ValueError, match="image_size"):
        export_lib.export(model, tmp_path / "x", image_size=(0, 32))
    if BACKEND == "tensorflow":
        with pytest.raises(ValueError, match="static input shape"):
            export_lib.export(model, tmp_path / "x.tflite", format="tflite")
    else:
        with pytest.raises(export_lib.ExportError, match="KERAS_BACKEND=tensorflow"):
            export_lib.export(model, tmp_path / "x", image_size=32)
    assert os.listdir(tmp_path) == []


@tf_only
def test_existing_output_is_kept_unless_overwrite(model, tmp_path, monkeypatch):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_lib.export(model, target, format="onnx", image_size=32)
    assert target.read_bytes() == b"keep me"

    def broken(*args, **kwargs):
        raise export_lib.ExportError("converter failed")

    monkeypatch.setattr(export_lib, "_write_saved_model", broken)
    saved = tmp_path / "sm"
    saved.mkdir()
    (saved / "old").write_text("old export")
    with pytest.raises(export_lib.ExportError):
        export_lib.export(model, saved, overwrite=True)
    assert os.listdir(saved) == ["old"]
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "sm"]  # no temporary left behind
    monkeypatch.undo()
    export_lib.export(model, saved, overwrite=True, image_size=32)
    assert "saved_model.pb" in os.listdir(saved)


@tf_only
def test_missing_optional_dependency_names_the_install(model, tmp_path, monkeypatch):
    import importlib

    real = importlib.import_module

    def without_tf2onnx(name, *args):
        if name.startswith("tf2onnx"):
            raise ImportError("No module named 'tf2onnx'")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_tf2onnx)
    with pytest.raises(export_lib.ExportError, match=r"keras-sequencer\[export\]"):
        export_lib.export(model, tmp_path / "m.onnx", format="onnx")
    assert os.listdir(tmp_path) == []


def test_cli_exports_a_model_saved_on_this_backend(model, tmp_path):
    """A .keras file from any backend exports: the command switches to TensorFlow."""
    saved = tmp_path / "trained.keras"
    model.save(saved)
    output = tmp_path / "model.tflite"
    env = dict(os.environ, KERAS_BACKEND=BACKEND)
    result = subprocess.run(
        [sys.executable, "-m", "keras_sequencer.cli", "export", "--weights", str(saved),
         "--format", "tflite", "--image-size", "32", "--uint8-input", "--output", str(output)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote" in result.stdout
    x = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype="uint8")
    want = keras.ops.convert_to_numpy(keras.ops.softmax(run_model(model, x.astype("float32"))))
    if BACKEND == "tensorflow" or _has_litert():
        assert np.abs(run_tflite(str(output), x) - want).max() <= TOLERANCE

    again = subprocess.run(
        [sys.executable, "-m", "keras_sequencer.cli", "export", "--weights", str(saved),
         "--format", "tflite", "--image-size", "32", "--output", str(output)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert again.returncode == 2 and "overwrite" in again.stderr and "Traceback" not in again.stderr


@tf_only
def test_cli_onnx_export_is_quiet(model, tmp_path):
    """Only the result line: no warnings from Keras' tf2onnx shim under NumPy 2."""
    saved = tmp_path / "trained.keras"
    model.save(saved)
    output = tmp_path / "model.onnx"
    result = subprocess.run(
        [sys.executable, "-m", "keras_sequencer.cli", "export", "--weights", str(saved),
         "--format", "onnx", "--image-size", "32", "--output", str(output)],
        capture_output=True, text=True, env=dict(os.environ, KERAS_BACKEND="tensorflow"), timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote" in result.stdout and output.is_file()
    assert "Warning" not in result.stderr, result.stderr[-3000:]


def _has_litert():
    try:
        import ai_edge_litert  # noqa: F401
    except ImportError:
        return False
    return True


@tf_only
def test_export_example_runs(model, tmp_path):
    saved = tmp_path / "trained.keras"
    model.save(saved)
    output = tmp_path / "model.tflite"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, os.path.join("examples", "export_tflite.py"), str(output),
         "--weights", str(saved), "--image-size", "32"],
        cwd=root, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    difference = float(result.stdout.strip().splitlines()[-1].rsplit(" ", 1)[-1])
    assert difference <= TOLERANCE


@pytest.mark.slow
@tf_only
def test_sequencer2d_s_exports_at_224(tmp_path):
    model = with_random_biases(
        ks.create_model("sequencer2d_s", input_shape=(224, 224, 3), classifier_activation=None)
    )
    x = images((1, 224, 224, 3))
    want = run_model(model, x)
    assert want.std() > 0.1  # logits, not near-uniform probabilities
    lite = export_lib.export(model, tmp_path / "s.tflite", format="tflite")
    assert_portable(lite, "tflite")
    onnx = export_lib.export(model, tmp_path / "s.onnx", format="onnx")
    assert_portable(onnx, "onnx")
    differences = {"tflite": np.abs(run_tflite(lite, x) - want).max(), "onnx": np.abs(run_onnx(onnx, x) - want).max()}
    print("sequencer2d_s at 224, max abs logit difference vs Keras:", differences)
    assert max(differences.values()) <= TOLERANCE

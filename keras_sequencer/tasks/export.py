"""Export to SavedModel, TFLite/LiteRT and ONNX through Keras' own exporters.

Every export traces the portable recurrent loop (never cuDNN's CudnnRNN ops, which
only run on NVIDIA GPUs), is written through a temporary name, and has its op list
checked before it is moved into place.
"""

import contextlib
import os
import warnings

import keras

from keras_sequencer import keras_compat
from keras_sequencer.files import save_atomically
from keras_sequencer.layers import BiLSTM2D, cudnn_disabled
from keras_sequencer.imagenet import normalization_layer

FORMATS = ("saved_model", "tflite", "onnx")
QUANTIZATIONS = ("none", "float16", "dynamic-int8")
SUFFIXES = {"tflite": ".tflite", "onnx": ".onnx"}
CUDNN_OP_PREFIX = "CudnnRNN"
INSTALL_HINT = 'pip install "keras-sequencer[export]"'


class ExportError(Exception):
    """An export that cannot be made as asked; nothing was written."""


def _require(module, purpose):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ExportError(
            f"{purpose} needs the {module.split('.')[0]!r} package ({error}). Install it with: {INSTALL_HINT}"
        ) from None


def _check_arguments(model, path, format, quantize, image_size, batch_size):
    """Refuses a bad request before anything is built; returns image_size as
    (height, width), or None."""
    if format not in FORMATS:
        raise ValueError(f"Unknown export format {format!r}. Expected one of {FORMATS}.")
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"Unknown quantize={quantize!r}. Expected one of {QUANTIZATIONS}.")
    if quantize != "none" and format != "tflite":
        raise ValueError(f"quantize={quantize!r} applies to the tflite format only.")
    suffix = SUFFIXES.get(format)
    if suffix and not str(path).endswith(suffix):
        raise ValueError(f"A {format} export is a single file ending in {suffix!r}. Received: {path}")
    if image_size is not None:
        sizes = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(sizes) != 2 or min(sizes) < 1:
            raise ValueError(f"image_size must be a positive int or (height, width). Received: {image_size}")
        image_size = tuple(int(s) for s in sizes)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be positive. Received: {batch_size}")
    if len(model.inputs) != 1 or len(model.inputs[0].shape) != 4:
        raise ValueError("export() expects a Sequencer image model with one (batch, H, W, 3) input.")

    backend = keras.backend.backend()
    if export_backend(format, backend) != backend:
        raise ExportError(
            f"The {format} export runs on the TensorFlow backend (this process uses {backend!r}). "
            "Save the model with model.save('model.keras'), then load it and export with "
            "KERAS_BACKEND=tensorflow, for example: KERAS_BACKEND=tensorflow keras-sequencer export "
            f"--weights model.keras --format {format} --output ..."
        )
    return image_size


def export_backend(format, current):
    """The Keras backend an export of `format` runs on, given the `current` one:
    TensorFlow's converters make SavedModel and TFLite; ONNX also comes from torch."""
    if format == "onnx" and current == "torch":
        return current
    return "tensorflow"


def _image_size(model, image_size, format):
    """(height, width) of the export: the checked image_size, else the model's own."""
    if image_size is not None:
        return image_size
    height, width = model.inputs[0].shape[1:3]
    if format == "tflite" and (height is None or width is None):
        raise ValueError(
            "A TFLite export needs a static input shape and this model accepts any size: pass image_size."
        )
    return height, width


def serving_model(model, image_size=None, batch_size=None, uint8_input=False):
    """The model as exported: a fixed or free input size, and optionally uint8 RGB
    in and class probabilities out (preprocessing and softmax baked in)."""
    height, width = image_size if image_size is not None else model.inputs[0].shape[1:3]
    channels = model.inputs[0].shape[-1]
    images = keras.Input(
        (height, width, channels),
        batch_size=batch_size,
        dtype="uint8" if uint8_input else "float32",
        name="images",
    )
    x = images
    if uint8_input:
        x = keras.ops.cast(x, "float32")
        if not _has_layer(model, "preprocessing"):
            x = normalization_layer(name="serving_preprocessing")(x)
    outputs = model(x)
    if uint8_input and _has_layer(model, "predictions"):
        activation = model.get_layer("predictions").activation
        if activation in (None, keras.activations.linear):
            outputs = keras.layers.Softmax(name="probabilities", dtype="float32")(outputs)
    return keras.Model(images, outputs, name=f"{model.name}_serving")


def _has_layer(model, name):
    return any(layer.name == name for layer in model.layers)


@contextlib.contextmanager
def portable_recurrences(model):
    """Traces the generic recurrent loop instead of cuDNN's: Keras' TensorFlow
    backend picks cuDNN at trace time whenever a GPU is visible, and a graph with
    CudnnRNN ops fails on CPU servers and in the TFLite converter. The BiLSTM2D
    layers trace the Keras route for the same reason."""
    every_layer = keras_compat.flatten_layers(model)
    # The exporters know Keras' loops, not ATen's fused RNN calls.
    routed = [(layer, layer.route) for layer in every_layer if isinstance(layer, BiLSTM2D)]
    for layer, _ in routed:
        layer.route = "keras"
    try:
        with cudnn_disabled(every_layer):
            yield
    finally:
        for layer, route in routed:
            layer.route = route


def export(
    model,
    path,
    format="saved_model",
    image_size=None,
    batch_size=None,
    uint8_input=False,
    quantize="none",
    overwrite=False,
    verbose=False,
):
    """Exports a Sequencer model for serving.

    Args:
        model: a Sequencer model (any weights, with or without the head).
        path: a SavedModel directory, or a file ending in .tflite / .onnx.
        format: "saved_model" (serving signature "serving_default"), "tflite"
            (LiteRT, builtin ops only, static shape) or "onnx" (tf2onnx on
            TensorFlow, torch.onnx on torch).
        image_size: int or (height, width). Defaults to the model's input size;
            required for tflite when the model takes any size.
        batch_size: fixed batch size. Defaults to 1 for tflite, free otherwise.
        uint8_input: take uint8 RGB images and return probabilities.
        quantize: tflite only: "none", "float16" or "dynamic-int8".
        overwrite: replace an existing `path`.

    Returns the path written.
    """
    image_size = _check_arguments(model, path, format, quantize, image_size, batch_size)
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it.")
    size = _image_size(model, image_size, format)
    if format == "tflite" and batch_size is None:
        batch_size = 1
    if format == "onnx":
        _require("onnx", "ONNX export")
        if keras.backend.backend() == "tensorflow":
            _require("tf2onnx", "ONNX export on TensorFlow")
        else:
            _require("onnxscript", "ONNX export on torch")
            # torch.onnx traces the recurrences step by step: shapes are fixed.
            batch_size = batch_size or 1
            if None in size:
                raise ValueError("ONNX export on the torch backend needs a fixed size: pass image_size.")

    exported = serving_model(model, size, batch_size, uint8_input)
    spec = keras.InputSpec(shape=exported.inputs[0].shape, dtype=exported.inputs[0].dtype)

    def write(tmp):
        with portable_recurrences(exported):
            if format == "saved_model":
                _write_saved_model(exported, tmp, spec, verbose)
            elif format == "tflite":
                _write_tflite(exported, tmp, spec, quantize, verbose)
            elif keras.backend.backend() == "tensorflow":
                with warnings.catch_warnings():
                    # Keras' tf2onnx shim probes np.object, which NumPy 2 answers with a warning.
                    warnings.filterwarnings("ignore", message="In the future `np.object`", category=FutureWarning)
                    exported.export(tmp, format="onnx", input_signature=[spec], verbose=verbose)
            else:
                _write_torch_onnx(exported, tmp, verbose)
        cudnn = sorted(op for op in exported_op_types(tmp, format) if op.startswith(CUDNN_OP_PREFIX))
        if cudnn:
            raise ExportError(f"The traced graph still holds cuDNN-only ops {cudnn}; nothing was written.")

    save_atomically(write, path)
    return path


def _write_saved_model(model, path, spec, verbose):
    import functools

    archive = keras.export.ExportArchive()
    archive.track(model)
    import tensorflow as tf

    signature = tf.TensorSpec(spec.shape, spec.dtype, name="images")
    archive.add_endpoint("serve", functools.partial(model.__call__, training=False), input_signature=[signature])
    archive.write_out(path, verbose=verbose)


def _write_tflite(model, path, spec, quantize, verbose):
    import tensorflow as tf

    options = {"target_spec": {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS]}}
    if quantize == "float16":
        options["optimizations"] = [tf.lite.Optimize.DEFAULT]
        options["target_spec"]["supported_types"] = [tf.float16]
    elif quantize == "dynamic-int8":
        options["optimizations"] = [tf.lite.Optimize.DEFAULT]
    try:
        model.export(path, format="litert", input_signature=[spec], verbose=verbose, **options)
    except Exception as error:  # the converter's errors are long MLIR dumps
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ExportError(f"The TFLite converter failed with builtin ops only: {first_line}") from error


def _write_torch_onnx(model, path, verbose):
    """torch.onnx's dynamo exporter (Keras' own torch route uses the TorchScript
    exporter, which fails on LayerNormalization's shape arithmetic)."""
    import torch

    shape = tuple(model.inputs[0].shape)
    example = torch.zeros(shape, dtype=getattr(torch, model.inputs[0].dtype))
    model.eval()
    torch.onnx.export(
        model, (example,), path, dynamo=True, external_data=False, verbose=verbose,
        input_names=["images"], output_names=["output_0"],
    )


def exported_op_types(path, format):
    """The op types in an exported file, nested functions and loop bodies included."""
    if format == "saved_model":
        from tensorflow.core.protobuf import saved_model_pb2

        saved = saved_model_pb2.SavedModel()
        with open(os.path.join(path, "saved_model.pb"), "rb") as f:
            saved.ParseFromString(f.read())
        ops = set()
        for graph in saved.meta_graphs:
            ops.update(node.op for node in graph.graph_def.node)
            for function in graph.graph_def.library.function:
                ops.update(node.op for node in function.node_def)
        return ops
    if format == "tflite":
        interpreter = tflite_interpreter(path)
        return keras_compat.litert_op_names(interpreter)
    if format == "onnx":
        import onnx

        ops = set()

        def visit(graph):
            for node in graph.node:
                ops.add(node.op_type)
                for attribute in node.attribute:
                    if attribute.g is not None and attribute.g.node:
                        visit(attribute.g)
                    for subgraph in attribute.graphs:
                        visit(subgraph)

        visit(onnx.load(path, load_external_data=False).graph)
        return ops
    raise ValueError(f"Unknown export format {format!r}.")


def tflite_interpreter(path):
    """The standalone LiteRT interpreter (ai-edge-litert): builtin ops only, no
    Flex delegate, as on phones."""
    Interpreter = _require("ai_edge_litert.interpreter", "Running a TFLite file").Interpreter
    return Interpreter(model_path=path)

"""Every use of a Keras (or LiteRT) internal, in one place.

Each function here works around something Keras offers no public way to do.
Where the internal has moved, the function steps aside (the package keeps
working, saved files keep loading through the public API), and
`missing_internals()` names what moved: tests/test_keras_compat.py asserts it
is empty, so a Keras upgrade that moves one fails loudly in CI instead of
silently bringing back the bug it guards against.
"""

import collections
import contextlib
import ast
import functools
import importlib
import sys
import threading

import keras

# (what it guards against, module, attribute path) for every internal used;
# those of one backend's code are in BACKEND_INTERNALS too.
INTERNALS = {
    "functional graph walk": (
        "memory: Keras keeps every intermediate of a functional pass until it ends",
        "keras.src.models.functional",
        "Functional._run_through_graph",
    ),
    "object-sharing scope": (
        "random `go_backwards` mismatches when Bidirectional layers load from .keras files",
        "keras.src.backend.common.global_state",
        "get_global_attribute",
    ),
    "lazy tensorflow module": (
        "3 s of a JAX/torch cold start importing TensorFlow to serialise a layer",
        "keras.src.utils.module_utils",
        "tensorflow._available",
    ),
    "layer flattening": (
        "finding every nested recurrent layer (exports, cuDNN switches)",
        "keras.layers",
        "Layer._flatten_layers",
    ),
    "layer called flag": (
        "the torch whole-block path (layers.Sequencer2DBlock.__call__) marks a block called as Keras would",
        "keras.layers",
        "Layer()._called",
    ),
    "variable storage": (
        "the torch mixed_bfloat16 block form reads float32 variables, not Keras' autocast copies",
        "keras",
        "Variable(1, None, 'float32')._value",
    ),
    "optimizer gradient hooks": (
        "PyTorch-style AdamW steps (training.PyTorchAdamW)",
        "keras.optimizers",
        "Optimizer._backend_apply_gradients",
    ),
    "optimizer update hook": (
        "PyTorch-style AdamW steps fused into torch._fused_adamw_ on torch (training.PyTorchAdamW)",
        "keras.optimizers",
        "Optimizer._backend_update_step",
    ),
    "optimizer weight decay hook": (
        "the decay folded into that fused step (training.PyTorchAdamW)",
        "keras.optimizers",
        "Optimizer._apply_weight_decay",
    ),
    "optimizer weight decay rule": (
        "which variables that fused step decays (training.PyTorchAdamW)",
        "keras.optimizers",
        "Optimizer._use_weight_decay",
    ),
    "optimizer gradient clipping": (
        "PyTorch-style AdamW steps (training.PyTorchAdamW)",
        "keras.optimizers",
        "Optimizer._clip_gradients",
    ),
    "jax step compiler": (
        "JAX on AMX CPUs: evaluate and predict compiled without YNNPACK's slower products (models.base)",
        "keras.src.backend.jax.trainer",
        "jit",
    ),
}
# {internal: the backend whose code it is}: checked only where that backend runs.
BACKEND_INTERNALS = {"jax step compiler": "jax"}
# Attributes of a built functional model that the graph walk reads.
_FUNCTIONAL_ATTRIBUTES = ("_nodes_by_depth", "_outputs_struct")


def _resolve(module, path):
    value = importlib.import_module(module)
    for part in path.split("."):
        if part.endswith(")"):  # an attribute of an instance: name(literal arguments)
            name, arguments = part[:-1].split("(", 1)
            arguments = ast.literal_eval(f"({arguments},)") if arguments else ()
            value = getattr(value, name)(*arguments)
        else:
            value = getattr(value, part)
    return value


def missing_internals():
    """The names of INTERNALS that this Keras no longer has (empty when all
    resolve), leaving out those of backends other than the current one."""
    missing = []
    for name, (_, module, path) in INTERNALS.items():
        if BACKEND_INTERNALS.get(name, keras.backend.backend()) != keras.backend.backend():
            continue
        try:
            _resolve(module, path)
        except (ImportError, AttributeError):
            missing.append(name)
    return missing


def _available(name):
    _, module, path = INTERNALS[name]
    try:
        _resolve(module, path)
    except (ImportError, AttributeError):
        return False
    return True


def run_graph_freeing(model, inputs, operation_fn, call_fn):
    """`Functional._run_through_graph`, dropping each intermediate once its last
    consumer has run. Returns None where the internals it reads have moved
    (the caller then runs Keras' own walk)."""
    if not all(hasattr(model, name) for name in _FUNCTIONAL_ATTRIBUTES):
        return None
    nodes = [
        node
        for depth in sorted(model._nodes_by_depth, reverse=True)
        for node in model._nodes_by_depth[depth]
        if node.operation and not node.is_input
    ]
    uses = collections.Counter(id(x) for node in nodes for x in node.input_tensors)
    kept = {id(x) for x in model.outputs}
    tensor_dict = {id(x): y for x, y in zip(model.inputs, keras.tree.flatten(inputs))}
    for node in nodes:
        if any(id(x) not in tensor_dict for x in node.input_tensors):
            continue  # not computable, as Keras skips it
        args, kwargs = node.arguments.fill_in(tensor_dict)
        op = node.operation
        if call_fn is None and hasattr(model, "_get_operation_for_node"):  # Keras >= 3.11
            op = model._get_operation_for_node(node)
        op = operation_fn(op)
        outputs = call_fn(op, *args, **kwargs) if call_fn is not None else op(*args, **kwargs)
        del args, kwargs
        for x, y in zip(node.outputs, keras.tree.flatten(outputs)):
            tensor_dict[id(x)] = y
        for x in node.input_tensors:
            uses[id(x)] -= 1
            if uses[id(x)] == 0 and id(x) not in kept:
                tensor_dict.pop(id(x), None)
    if any(id(x) not in tensor_dict for x in model.outputs):
        return None  # Keras' own walk raises its error
    return keras.tree.pack_sequence_as(model._outputs_struct, [tensor_dict[id(x)] for x in model.outputs])


@contextlib.contextmanager
def outside_object_sharing_scope():
    """Keras' Bidirectional copies its layer by serialize/deserialize. Inside
    load_model's object-sharing scope those copies are keyed by id(), and an id
    reused after garbage collection can hand back another block's LSTM (seen as a
    random "different `go_backwards`" error when loading a .keras file)."""
    if not _available("object-sharing scope"):
        yield
        return
    from keras.src.backend.common import global_state

    keys = ("shared_objects/id_to_obj_map", "shared_objects/id_to_config_map")
    saved = [global_state.get_global_attribute(key) for key in keys]
    for key in keys:
        global_state.set_global_attribute(key, None)
    try:
        yield
    finally:
        for key, value in zip(keys, saved):
            global_state.set_global_attribute(key, value)


@contextlib.contextmanager
def tensorflow_left_unimported():
    """Keras' serializer asks `isinstance(obj, tf.TensorShape)` and, where
    TensorFlow is installed, imports it to do so: seconds of a JAX or torch cold
    start spent on a library they never use (Bidirectional serializes its layer
    to copy it). Before TensorFlow is imported no object can be one of its
    types, so the answer is known without the import."""
    if "tensorflow" in sys.modules or not _available("lazy tensorflow module"):
        yield
        return
    from keras.src.utils.module_utils import tensorflow as lazy_tensorflow

    if lazy_tensorflow._available is not None:
        yield
        return
    lazy_tensorflow._available = False
    try:
        yield
    finally:
        lazy_tensorflow._available = None  # asked afresh next time


@contextlib.contextmanager
def jax_steps_compiled_with(compiler_options):
    """Keras' JAX trainer compiles the train, test and predict steps it makes
    with `jax.jit` and no XLA options: inside this block those steps are
    compiled with `compiler_options` (XLA options for these computations only,
    not the process-wide XLA_FLAGS)."""
    if not compiler_options or not _available("jax step compiler"):
        yield
        return
    import jax
    from keras.src.backend.jax import trainer

    original = trainer.jit
    if original is not jax.jit:  # Flax NNX's jit, with its own arguments
        yield
        return
    trainer.jit = functools.partial(original, compiler_options=dict(compiler_options))
    try:
        yield
    finally:
        trainer.jit = original


def flatten_layers(layer):
    """`layer` and every layer nested in it, at any depth (Keras lists only a
    model's direct layers publicly)."""
    return list(layer._flatten_layers(include_self=True, recursive=True))


def mark_called(layer):
    """What Keras' `Layer.__call__` records on a layer's first call (its
    `_called` flag), for a call that bypasses `__call__`."""
    if not layer._called:
        layer._called = True


def stored_value(variable):
    """A variable's own tensor: inside a mixed-precision layer's call Keras'
    `value` is a fresh cast copy. In a stateless scope, that scope's value."""
    from keras.src.backend.common.global_state import get_global_attribute

    if get_global_attribute("stateless_scope") is not None:
        return variable.value
    return variable._value


def keras_value(variable):
    """A variable's tensor as Keras reads it (the reader where Keras substitutes one)."""
    return variable.value


def _own_value(variable):
    return variable._value


def variable_reader(x):
    """How one torch call on tensor `x` reads its (float32) variables: their own
    tensors, or Keras' `value` where Keras substitutes another (a stateless
    scope's value, a meta stub when `x` is symbolic). Decided once per call:
    `value` makes these checks at every read (about 4 us each on torch)."""
    from keras.src.backend.common.global_state import get_global_attribute

    if x.is_meta or get_global_attribute("stateless_scope") is not None:
        return keras_value
    return _own_value


def litert_op_names(interpreter):
    """The operator names of a LiteRT/TFLite interpreter's graph (no public API)."""
    return {op["op_name"] for op in interpreter._get_ops_details()}


@contextlib.contextmanager
def initializers_skipped():
    """Layers built in this thread start their weights at zero instead of drawing
    them from their initializers, for a model whose every weight is assigned
    next. Drawing millions of random numbers is a large part of a cold start,
    and on JAX each weight shape's initializer is an XLA program to compile.
    Only the values change: the layers keep their initializers (and configs);
    seed-generator states and other variables not made from a Keras
    initializer start as usual. Relies on `Layer.add_weight(shape, initializer)`,
    public API, by patching it for the duration."""
    import numpy as np

    Initializer, Layer = keras.initializers.Initializer, keras.layers.Layer
    original = Layer.add_weight
    thread = threading.get_ident()

    def zeros(shape, dtype=None):
        try:
            return np.zeros(shape, dtype=dtype or "float32")
        except TypeError:  # a dtype numpy does not know
            return keras.ops.zeros(shape, dtype=dtype)

    def add_weight(self, *args, **kwargs):
        if threading.get_ident() == thread:
            if len(args) >= 2:
                initializer, args = args[1], (args[0],) + args[2:]
            else:
                initializer = kwargs.pop("initializer", None)
            if isinstance(initializer, (Initializer, str)):
                initializer = zeros
            kwargs["initializer"] = initializer
        return original(self, *args, **kwargs)

    Layer.add_weight = add_weight
    try:
        yield
    finally:
        Layer.add_weight = original

"""load_torch_state_dict: all or nothing, with errors that name the problem."""

import keras
import numpy as np
import pytest

import keras_sequencer as ks
from keras_sequencer.weights.convert import guess_variant, normalize_state_dict

pytest.importorskip("timm")
from reference import make_reference  # noqa: E402


def _snapshot(model):
    return [keras.ops.convert_to_numpy(v).copy() for v in model.weights]


def test_wrong_variant_lists_problems_and_loads_nothing():
    model = ks.Sequencer2DS(weights=None, input_shape=(28, 28, 3))
    before = _snapshot(model)
    reference_m = make_reference("sequencer2d_m")
    with pytest.raises(ks.CheckpointMismatchError) as info:
        ks.load_torch_state_dict(model, reference_m.state_dict())
    message = str(info.value)
    extra = set(reference_m.state_dict()) - set(make_reference("sequencer2d_s").state_dict())
    assert extra and all(k.startswith("stages.2.blocks.") for k in extra)
    assert f"unexpected keys ({len(extra)})" in message
    assert "missing keys" not in message
    assert "looks like 'sequencer2d_m'" in message
    assert "nothing was loaded" in message
    for a, b in zip(before, _snapshot(model)):
        np.testing.assert_array_equal(a, b)


def test_shape_mismatch_and_missing_keys_are_listed():
    model = ks.Sequencer2DS(weights=None, input_shape=(28, 28, 3), classes=10)
    state = make_reference("sequencer2d_s").state_dict()
    del state["norm.weight"]
    with pytest.raises(ks.CheckpointMismatchError) as info:
        ks.load_torch_state_dict(model, state)
    message = str(info.value)
    assert "missing keys (1): norm.weight" in message
    assert "head.fc.weight (1000, 384) does not fit" in message


def test_gru_checkpoint_into_lstm_model_is_a_shape_mismatch():
    model = ks.Sequencer2DS(weights=None, input_shape=(28, 28, 3))
    state = make_reference("gru_sequencer2d_s").state_dict()
    with pytest.raises(ks.CheckpointMismatchError, match="shape mismatches"):
        ks.load_torch_state_dict(model, state)
    assert guess_variant(normalize_state_dict(state)) == "gru_sequencer2d_s"


def test_guess_variant_for_every_reference_variant():
    for name in ("sequencer2d_s", "sequencer2d_l", "sequencer2d_s_add", "sequencer2d_vertical",
                 "sequencer2d_s_unidirectional", "rnn_sequencer2d_s", "sequencer2d_l_d4_3x"):
        state = normalize_state_dict(make_reference(name).state_dict())
        assert guess_variant(state) == name


def test_non_tensor_entries_are_rejected():
    model = ks.Sequencer2DS(weights=None, input_shape=(28, 28, 3))
    with pytest.raises(ks.CheckpointMismatchError, match="not tensors: epoch"):
        ks.load_torch_state_dict(model, {"stem.proj.weight": np.zeros((192, 3, 7, 7)), "epoch": 3})
    with pytest.raises(TypeError):
        ks.load_torch_state_dict(model, [1, 2, 3])

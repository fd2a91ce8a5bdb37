"""features_only: multi-scale feature maps, against timm's `features_only=True`.

timm's Sequencer2d feature extractor (FeatureListNet, flatten_sequential) returns
the output of each chosen `stages.{i}` (its last block, before the final norm),
in the model's native NHWC layout, in stage order. Ours is compared map by map
with it, both filled from the same random-weight checkpoint file.
"""


import keras
import numpy as np
import pytest

timm = pytest.importorskip("timm")
safetensors_numpy = pytest.importorskip("safetensors.numpy")
import torch  # noqa: E402

import keras_sequencer as ks  # noqa: E402
from keras_sequencer import keras_compat  # noqa: E402
from hub_server import serve_pretrained  # noqa: E402
from reference import make_reference, normalize  # noqa: E402

TOLERANCE = 1e-4
HEIGHT, WIDTH = 56, 84  # non-square: maps of 8x12 (stage 0) and 4x6 (stages 1-3)
ALL = (0, 1, 2, 3)


def run(model, x):
    """The list of maps as numpy (JAX compiled; TF and torch eagerly)."""
    if keras.backend.backend() == "jax":
        outputs = model.predict(x, verbose=0, batch_size=len(x))
    else:
        outputs = model(x, training=False)
    return [keras.ops.convert_to_numpy(y) for y in outputs]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random-weight sequencer2d_s checkpoint (non-zero biases, norms and head)."""
    reference = make_reference("sequencer2d_s", seed=3)
    path = tmp_path_factory.mktemp("features") / "sequencer2d_s.safetensors"
    arrays = {k: np.ascontiguousarray(v.numpy()) for k, v in reference.state_dict().items()}
    safetensors_numpy.save_file(arrays, str(path))
    return path


def timm_features(checkpoint, out_indices):
    """timm.create_model(..., features_only=True) filled from `checkpoint`."""
    return timm.create_model(
        "sequencer2d_s",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(checkpoint)),
        features_only=True,
        out_indices=out_indices,
    ).eval()


def timm_maps(net, images):
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(normalize(images).transpose(0, 3, 1, 2)))
        return [y.numpy() for y in net(x)]


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(0, 255, (2, HEIGHT, WIDTH, 3)).astype("float32")


@pytest.fixture(scope="module")
def features_model(checkpoint):
    return ks.create_model(
        "sequencer2d_s",
        features_only=True,
        out_indices=ALL,
        weights=str(checkpoint),
        input_shape=(None, None, 3),
    )


@pytest.fixture(scope="module")
def expected_all(checkpoint, images):
    return timm_maps(timm_features(checkpoint, ALL), images)


def _without_layer(info):
    return [{k: v for k, v in d.items() if k != "layer"} for d in info]


def test_every_stage_matches_timm(features_model, expected_all, checkpoint, images):
    got = run(features_model, images)
    # timm returns NHWC for Sequencer2d (output_fmt of the model): no transpose.
    assert [g.shape for g in got] == [e.shape for e in expected_all] == [
        (2, 8, 12, 192),
        (2, 4, 6, 384),
        (2, 4, 6, 384),
        (2, 4, 6, 384),
    ]
    diffs = [float(np.abs(g - e).max()) for g, e in zip(got, expected_all)]
    print(f"max |keras - timm| per stage ({keras.backend.backend()}):", diffs)
    assert max(diffs) <= TOLERANCE, diffs
    assert min(float(np.abs(e).max()) for e in expected_all) > 0.1

    info = features_model.metadata["feature_info"]
    assert _without_layer(info) == timm_features(checkpoint, ALL).feature_info.get_dicts()
    assert [d["reduction"] for d in info] == [7, 14, 14, 14]
    assert [d["layer"] for d in info] == [
        "stages_0_blocks_3",
        "stages_1_blocks_2",
        "stages_2_blocks_7",
        "stages_3_blocks_2",
    ]
    assert "head" not in [layer.name for layer in features_model.layers]
    assert "norm" not in [layer.name for layer in features_model.layers]  # before the final norm


def test_subset_in_stage_order(checkpoint, images, expected_all):
    # timm returns the chosen stages in stage order whatever the order asked.
    model = ks.Sequencer2DS(
        weights=str(checkpoint),
        features_only=True,
        out_indices=(3, 1),
        input_shape=(HEIGHT, WIDTH, 3),
    )
    assert [d["index"] for d in model.metadata["feature_info"]] == [1, 3]
    assert model.output_shape == [(None, 4, 6, 384), (None, 4, 6, 384)]
    expected = timm_maps(timm_features(checkpoint, (3, 1)), images)
    got = run(model, images)
    for g, e, e_all in zip(got, expected, (expected_all[1], expected_all[3])):
        assert np.abs(e - e_all).max() == 0
        assert np.abs(g - e).max() <= TOLERANCE


TINY = dict(
    layers=(1, 1, 2),
    patch_sizes=(4, 2, 1),
    embed_dims=(8, 16, 24),
    hidden_sizes=(4, 8, 8),
    mlp_ratios=(2.0, 2.0, 2.0),
    input_shape=(None, None, 3),
)


def test_default_indices_and_truncation():
    # timm's default for Sequencer2d is out_indices=(0, 1, 2); like timm's, the
    # model stops after the last chosen stage. (Zero initial values: only the
    # architecture is checked, and JAX then compiles no initializers.)
    with keras_compat.initializers_skipped():
        model = ks.create_model("sequencer2d_s", features_only=True, input_shape=(56, 56, 3))
        last = ks.Sequencer2D(**TINY, features_only=True, out_indices=(-1,))
        two = ks.Sequencer2D(**TINY, features_only=True, out_indices=2)
    default = timm.create_model("sequencer2d_s", features_only=True)
    assert _without_layer(model.metadata["feature_info"]) == default.feature_info.get_dicts()
    assert model.output_shape == [(None, 8, 8, 192), (None, 4, 4, 384), (None, 4, 4, 384)]
    names = [layer.name for layer in model.layers]
    assert "stages_2_blocks_7" in names
    assert not any(n.startswith("stages_3") for n in names) and "norm" not in names

    # One stage: Keras returns a single-output model's map itself (timm a list of one).
    assert last.metadata["feature_info"] == [
        dict(num_chs=24, reduction=8, module="stages.2", index=2, layer="stages_2_blocks_1")
    ]
    assert last.output_shape == (None, None, None, 24)
    # An int n: the last n stages, as timm reads it.
    assert [d["index"] for d in two.metadata["feature_info"]] == [1, 2]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(features_only=True, include_top=True), "include_top"),
        (dict(features_only=True, pooling="avg"), "pooling"),
        (dict(features_only=True, out_indices=(0, 4)), "out of range"),
        (dict(features_only=True, out_indices=(-5,)), "out of range"),
        (dict(features_only=True, out_indices=(1, -3)), "twice"),
        (dict(features_only=True, out_indices=(0, 0)), "twice"),
        (dict(features_only=True, out_indices=()), "at least one"),
        (dict(features_only=True, out_indices=0), "last 0"),
        (dict(features_only=True, out_indices=5), "last 5"),
        (dict(features_only=True, out_indices=(0.0,)), "integers"),
        (dict(features_only=True, out_indices="0"), "out_indices"),
        (dict(out_indices=(0, 1)), "features_only"),
    ],
)
def test_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ks.create_model("sequencer2d_s", **kwargs)
    with pytest.raises(ValueError, match=message):
        ks.Sequencer2DS(weights=None, **kwargs)


def test_keras_file_round_trip(tmp_path):
    with keras_compat.initializers_skipped():  # values are set next
        model = ks.Sequencer2D(**TINY, features_only=True, out_indices=(0, 2))
    rng = np.random.default_rng(1)
    model.set_weights([rng.normal(0.0, 0.5, w.shape).astype("float32") for w in model.get_weights()])
    path = tmp_path / "features.keras"
    model.save(path)
    with keras_compat.initializers_skipped():  # the file's values replace them (JAX: 9 s less)
        loaded = keras.saving.load_model(path)
    assert loaded.metadata["feature_info"] == model.metadata["feature_info"]
    assert [d["index"] for d in loaded.metadata["feature_info"]] == [0, 2]
    assert ks.model_metadata(loaded)["dynamic_size"]
    x = rng.uniform(0, 255, (2, 24, 40, 3)).astype("float32")  # non-square, dynamic size
    before, after = run(model, x), run(loaded, x)
    assert [a.shape for a in after] == [(2, 6, 10, 8), (2, 3, 5, 24)]
    for a, b in zip(before, after):
        assert np.abs(a).max() > 0.1
        assert np.abs(a - b).max() <= 1e-6


def _weights_by_layer(model):
    return {layer.name: layer.get_weights() for layer in model.layers if layer.weights}


def _assert_same_weights(model, reference_model):
    reference = _weights_by_layer(reference_model)
    ours = _weights_by_layer(model)
    assert ours and set(ours) <= set(reference)
    for name, values in ours.items():
        for a, b in zip(values, reference[name]):
            np.testing.assert_array_equal(a, b, err_msg=name)


def test_imagenet_weights(checkpoint, features_model, monkeypatch, tmp_path):
    # The head and the later stages are not needed: the checkpoint fills the
    # features model as far as its last returned stage.
    server = serve_pretrained(monkeypatch, tmp_path, "sequencer2d_s", checkpoint.read_bytes())
    try:
        model = ks.Sequencer2DS(features_only=True, out_indices=(0, 1), input_shape=(56, 56, 3))
    finally:
        server.stop()
    assert server.requests == 1
    assert [d["index"] for d in model.metadata["feature_info"]] == [0, 1]
    assert not any(layer.name.startswith("stages_2") for layer in model.layers)
    _assert_same_weights(model, features_model)


def test_keras_weights_file(features_model, tmp_path):
    path = str(tmp_path / "features.weights.h5")
    features_model.save_weights(path)
    model = ks.create_model(
        "sequencer2d_s", features_only=True, out_indices=(0, 1), weights=path, input_shape=(56, 56, 3)
    )
    _assert_same_weights(model, features_model)

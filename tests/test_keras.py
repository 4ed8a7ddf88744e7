"""Keras 3 models on the torch backend: same weights as torchvision's VGG16, same numbers, every command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import convscope
from convscope.cli.main import main
from convscope.errors import ConvscopeError
from convscope.keras import application_preprocessing, import_keras

from .conftest import model_state

try:
    keras = import_keras()  # on the torch backend, chosen before Keras's first import
except ConvscopeError as err:
    pytest.skip(f"no Keras 3: {err}", allow_module_level=True)
SIZE = (64, 64)
POST_LAYERS = ["block1_conv2", "block1_pool", "block2_conv1", "block2_conv2", "block2_pool", "block3_conv1",
               "block3_conv2", "block3_conv3", "block3_conv4", "block3_pool", "block4_conv1", "block4_conv2",
               "block4_conv3", "block4_conv4", "block4_pool", "block5_conv1", "block5_conv2", "block5_conv3"]


def _copy_into_torchvision(km, tv, flatten_hw=None):
    """Keras's kernels (HWIO) into torchvision's convs (OIHW), Dense kernels transposed; the first
    Dense after Flatten reordered from Keras's (h, w, c) flatten order to torch's (c, h, w)."""
    convs = [layer for layer in km.layers if isinstance(layer, keras.layers.Conv2D)]
    dense = [layer for layer in km.layers if isinstance(layer, keras.layers.Dense)]
    tconvs = [m for m in tv.features if isinstance(m, torch.nn.Conv2d)]
    tdense = [m for m in getattr(tv, "classifier", []) if isinstance(m, torch.nn.Linear)]
    assert len(convs) == len(tconvs) and len(dense) in (0, len(tdense))  # no top: torchvision's goes unused
    with torch.no_grad():
        for kl, tm in zip(convs, tconvs):
            kernel, bias = kl.get_weights()
            tm.weight.copy_(torch.from_numpy(kernel).permute(3, 2, 0, 1))
            tm.bias.copy_(torch.from_numpy(bias))
        for i, (kl, tm) in enumerate(zip(dense, tdense)):
            kernel, bias = kl.get_weights()
            if i == 0 and flatten_hw is not None:
                h, w = flatten_hw
                kernel = kernel.reshape(h, w, -1, kernel.shape[-1]).transpose(2, 0, 1, 3).reshape(kernel.shape)
            tm.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel.T)))
            tm.bias.copy_(torch.from_numpy(bias))


@pytest.fixture(scope="module")
def pair():
    """Keras VGG16 (no top, seed 0) and torchvision's vgg16 with the same weights, both with 'caffe' input."""
    import torchvision

    keras.utils.set_random_seed(0)
    km = keras.applications.VGG16(weights=None, include_top=False, input_shape=(None, None, 3))
    tv = torchvision.models.vgg16(weights=None).eval()
    _copy_into_torchvision(km, tv)
    pre = application_preprocessing("VGG16", SIZE)
    return km, convscope.as_loaded(km, pre), convscope.as_loaded(tv, pre)


@pytest.fixture(scope="module")
def photo():
    return np.asarray(convscope.sample_photos()["chelsea"])


def _state(loaded) -> tuple:
    """The wrapper's modes, requires_grad and hooks, and every Keras layer's hooks and trainable flag."""
    layers = loaded.module.convscope_layers().values()
    return (model_state(loaded.module), [len(layer._forward_hooks) + len(layer._forward_pre_hooks) for layer in layers],
            [layer.trainable for layer in layers])


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1e-12))


def test_caffe_preprocessing_is_the_applications_own(photo):
    pre = application_preprocessing("VGG16", SIZE)
    assert pre.channel_order == "BGR" and "caffe" in pre.description
    image = pre.fit(photo, SIZE)
    ours = pre.to_tensor(image).permute(0, 2, 3, 1).numpy()
    theirs = keras.applications.vgg16.preprocess_input(image.astype("float32")[None])
    assert np.allclose(ours, theirs, atol=1e-3)  # 0-255 scale: float32 rounding only
    assert np.allclose(pre.denormalize(pre.to_tensor(image)).permute(0, 2, 3, 1).numpy()[0] * 255, image, atol=1e-3)
    tf_mode = application_preprocessing("MobileNetV2", SIZE)
    assert tf_mode.channel_order == "RGB" and tf_mode.mean == pytest.approx((0.5,) * 3)


def test_every_conv_layer_equals_torchvision(pair, photo):
    km, lk, lt = pair
    ours, ref = convscope.activations(lk, photo, size=SIZE), convscope.activations(lt, photo, size=SIZE)
    conv_names = [layer.name for layer in km.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [layer.name for layer in ours.layers] == conv_names  # Keras's own names, the convs the defaults
    assert [layer.alias for layer in ref.layers] == conv_names
    for a, b in zip(ours.layers, ref.layers):
        assert ours.maps[a.name].shape == ref.maps[b.name].shape
        assert _rel(ours.maps[a.name], ref.maps[b.name]) < 1e-4, a.name
        assert (a.stride, a.rf_size, a.rf_start) == (b.stride, b.rf_size, b.rf_start)  # traced through Keras's ops


@pytest.mark.parametrize("method", ["deconvnet", "guided"])
def test_projections_equal_torchvision(pair, photo, method):
    _, lk, lt = pair
    before = _state(lk)
    ours = convscope.deconv(lk, photo, "block3_conv2", channels=range(6), method=method, size=SIZE)
    ref = convscope.deconv(lt, photo, "block3_conv2", channels=range(6), method=method, size=SIZE)
    a, b = ours.projections[method], ref.projections[method]
    assert [(u.channel, u.row, u.col) for u in a.units] == [(u.channel, u.row, u.col) for u in b.units]
    assert np.abs(a.maps).max() > 0
    assert _rel(a.maps, b.maps) < 1e-4
    assert _state(lk) == before


def test_feature_objectives_equal_torchvision(pair):
    km, lk, lt = pair
    trainable = [layer.trainable for layer in km.layers]
    grads = [p.requires_grad for p in lk.module.parameters()]
    ours = convscope.visualize_features(lk, "block2_conv1", [0, 1, 2], steps=3, size=48, seed=0)
    ref = convscope.visualize_features(lt, "features.6", [0, 1, 2], steps=3, size=48, seed=0)
    # The first step sees the same image: equal objectives; Adam then amplifies float noise slowly.
    assert ours.history[0] == pytest.approx(ref.history[0], rel=1e-4)
    assert ours.history[-1] == pytest.approx(ref.history[-1], rel=1e-2)
    assert [layer.trainable for layer in km.layers] == trainable
    assert [p.requires_grad for p in lk.module.parameters()] == grads


@pytest.mark.slow
def test_classifier_occlusion_and_predict_equal_torchvision(photo):
    """With the top: the Dense kernels in torch's flatten order give the same logits and occlusion maps."""
    import torchvision

    keras.utils.set_random_seed(1)
    km = keras.applications.VGG16(weights=None, include_top=True, input_shape=(*SIZE, 3), classes=10,
                                  classifier_activation=None)
    tv = torchvision.models.vgg16(weights=None, num_classes=10).eval()
    tv.avgpool = torch.nn.Identity()  # Keras flattens the 2x2 map directly
    tv.classifier[0] = torch.nn.Linear(512 * 2 * 2, 4096)
    _copy_into_torchvision(km, tv, flatten_hw=(2, 2))
    pre = application_preprocessing("VGG16", SIZE)
    lk, lt = convscope.as_loaded(km, pre), convscope.as_loaded(tv, pre)
    x, _ = lk.tensor(photo, SIZE)
    with torch.no_grad():
        assert _rel(lk.module(x), lt.module(x)) < 1e-4
    assert [p["index"] for p in convscope.predict(lk, photo)] == [p["index"] for p in convscope.predict(lt, photo)]
    ours = convscope.occlusion(lk, photo, patch=16, stride=16, size=SIZE, layer="block5_conv3")
    ref = convscope.occlusion(lt, photo, patch=16, stride=16, size=SIZE, layer="features.29")
    assert ours.target == ref.target
    assert np.allclose(ours.probability, ref.probability, atol=1e-5)
    assert _rel(ours.activity, ref.activity) < 1e-4


@pytest.mark.slow
def test_the_posts_model_layers_2_to_20_with_the_shapes_keras_gives(tmp_path, capsys, photo):
    """`--model keras:VGG19 --random --size 200x300 --layers <model.layers[2:20]>`, as the post reads them."""
    from PIL import Image

    assert main(["layers", "--model", "keras:VGG19", "--random", "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert all(f" {name} " in table for name in POST_LAYERS)
    Image.fromarray(photo).save(tmp_path / "andrew.jpg")
    out = tmp_path / "post"
    assert main(["activations", str(tmp_path / "andrew.jpg"), "--model", "keras:VGG19", "--random", "--device", "cpu",
                 "--size", "200x300", "--layers", ",".join(POST_LAYERS), "--out", str(out), "--save-npz"]) == 0
    printed = capsys.readouterr().out
    loaded = convscope.load_model("keras:VGG19", random=True, device="cpu")
    km = loaded.module.keras_model
    assert [layer.name for layer in km.layers[2:20]] == POST_LAYERS
    shapes = {}
    x = keras.KerasTensor((1, 200, 300, 3))
    for layer in km.layers[1:20]:
        x = layer.compute_output_spec(x)
        shapes[layer.name] = (x.shape[3], x.shape[1], x.shape[2])
    assert shapes["block1_conv2"] == (64, 200, 300)  # the post prints (1, 200, 300, 64)
    for name in POST_LAYERS:
        assert f"{name} " in printed and "×".join(map(str, shapes[name])) in printed.split(f"{name} ")[1].split("\n")[0]
    assert len(list(out.glob("*.png"))) >= len(POST_LAYERS)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A small saved .keras model: a nested Sequential, a layer called twice, BN and a classifier."""
    layers = keras.layers
    keras.utils.set_random_seed(3)
    inp = keras.Input((None, None, 3))
    x = layers.Conv2D(8, 3, padding="same", activation="relu", name="conv_a")(inp)
    x = layers.MaxPooling2D(name="pool_a")(x)
    inner = keras.Sequential([layers.Conv2D(8, 3, padding="same", name="inner_conv"),
                              layers.BatchNormalization(name="inner_bn"), layers.ReLU(name="inner_relu")], name="inner")
    x = inner(x)
    shared = layers.Conv2D(8, 3, padding="same", activation="relu", name="shared")
    x = shared(shared(x))
    x = layers.MaxPooling2D(name="pool_b")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    out = layers.Dense(10, name="logits")(x)
    model = keras.Model(inp, out, name="small")
    path = tmp_path_factory.mktemp("keras") / "small.keras"
    model.save(path)
    return path


def test_saved_model_layers_are_keras_names_flattened(saved_model):
    loaded = convscope.load_model(str(saved_model), device="cpu")
    cat = loaded.catalogue_at((32, 32))
    names = [layer.name for layer in cat]
    assert names[:4] == ["conv_a", "pool_a", "inner/inner_conv", "inner/inner_bn"]
    assert "shared" in names and "shared@1" in names  # a layer called twice: one row per call
    assert cat["shared@1"].rf_size == (16.0, 16.0)  # 3, 4 (pool), 8, 12, 16: traced through both calls
    assert cat["inner/inner_relu"].is_feature and cat["conv_a"].is_feature
    assert cat["conv_a"].shape == (8, 32, 32) and cat["logits"].shape == (10,)


@pytest.mark.slow
def test_saved_model_runs_through_every_command(saved_model, tmp_path, capsys, photo):
    from PIL import Image

    image = tmp_path / "cat.png"
    Image.fromarray(photo).save(image)
    model = ["--model", str(saved_model), "--device", "cpu"]
    runs = {
        "predict": ["predict", str(image), *model],
        "activations": ["activations", str(image), *model, "--size", "32"],
        "features": ["features", *model, "--layer", "shared@1", "--channels", "0-1", "--steps", "4", "--size", "32"],
        "deconv": ["deconv", str(image), *model, "--layer", "shared@1", "--top", "2", "--method", "all", "--size", "32"],
        "occlusion": ["occlusion", str(image), *model, "--patch", "8", "--stride", "8", "--size", "32"],
        "scan": ["scan", "--samples", *model, "--layers", "conv_a", "--limit", "8", "--top", "2", "--size", "32"],
        "probe": ["probe", "--samples", *model, "--layers", "conv_a,shared@1", "--folds", "2", "--size", "32"],
        "atlas": ["atlas", *model, "--layers", "conv_a", "--channels-per-layer", "2", "--steps", "4", "--size", "32",
                  "--photos", "1", "--top", "2"],
    }
    for command, argv in runs.items():
        assert main([*argv, "--out", str(tmp_path / command)] if command != "predict" else argv) == 0, command
    printed = capsys.readouterr().out
    assert "inner/inner_relu" in printed
    assert (tmp_path / "atlas" / "index.html").is_file()


def test_audit_refuses_a_keras_nonlinearity_without_a_rule(photo):
    layers = keras.layers
    inp = keras.Input((None, None, 3))
    x = layers.Conv2D(4, 3, activation="relu", name="relu_conv")(inp)
    x = layers.Conv2D(4, 3, activation="gelu", name="gelu_conv")(x)  # Keras applies it inside the layer
    loaded = convscope.as_loaded(keras.Model(inp, x))
    relu = convscope.deconv(loaded, photo, "relu_conv", top=1, size=32, method="deconvnet")
    assert np.abs(relu.projections["deconvnet"].maps).max() > 0
    with pytest.raises(ConvscopeError, match="(?i)gelu"):
        convscope.deconv(loaded, photo, "gelu_conv", top=1, size=32, method="deconvnet")


def test_a_fixed_size_keras_model_says_which_size(photo):
    inp = keras.Input((16, 16, 3))
    loaded = convscope.as_loaded(keras.Model(inp, keras.layers.Conv2D(2, 3, name="c")(inp)))
    assert loaded.preprocessing.input_size == (16, 16)
    assert convscope.activations(loaded, photo, size=(16, 16)).maps["c"].shape == (2, 14, 14)
    with pytest.raises(ConvscopeError, match="--size"):
        convscope.activations(loaded, photo, size=(16, 24))


def test_lambda_layer_is_refused_by_safe_mode(tmp_path):
    inp = keras.Input((8, 8, 3))
    out = keras.layers.Lambda(lambda t: t * 2)(inp)
    path = tmp_path / "lambda.keras"
    keras.Model(inp, out).save(path)
    with pytest.raises(ConvscopeError, match="safe_mode"):
        convscope.load_model(str(path), device="cpu")


def test_names_weights_and_offline_messages(tmp_path, monkeypatch):
    with pytest.raises(ConvscopeError, match="VGG19"):
        convscope.load_model("keras:VGG91", random=True, device="cpu")
    # No cached file and no network: one line naming --weights and Keras's own path.
    from keras.src.backend import config
    from keras.src.utils import file_utils

    def no_network(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(config, "_KERAS_DIR", str(tmp_path))
    monkeypatch.setattr(file_utils, "urlretrieve", no_network)
    with pytest.raises(ConvscopeError) as err:
        convscope.load_model("keras:VGG16", device="cpu")
    text = str(err.value)
    assert "--weights" in text and str(tmp_path / "models" / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5") in text
    assert "\n" not in text


def test_random_is_seeded_and_weights_files_load(tmp_path):
    state = (torch.random.get_rng_state(), np.random.get_state()[1].copy())
    a = convscope.load_model("keras:VGG16", random=True, seed=5, device="cpu")
    b = convscope.load_model("keras:VGG16", random=True, seed=5, device="cpu")
    c = convscope.load_model("keras:VGG16", random=True, seed=6, device="cpu")
    assert torch.equal(torch.random.get_rng_state(), state[0]) and np.array_equal(np.random.get_state()[1], state[1])
    assert convscope.models.fingerprint(a.module) == convscope.models.fingerprint(b.module)
    assert convscope.models.fingerprint(a.module) != convscope.models.fingerprint(c.module)
    path = tmp_path / "vgg16.weights.h5"
    c.module.keras_model.save_weights(path)
    d = convscope.load_model("keras:VGG16", weights=path, device="cpu")
    assert not d.random_init and convscope.models.fingerprint(d.module) == convscope.models.fingerprint(c.module)
    (tmp_path / "state.pt").write_bytes(b"x")
    with pytest.raises(ConvscopeError, match="weights.h5"):
        convscope.load_model("keras:VGG16", weights=tmp_path / "state.pt", device="cpu")


def test_keras_on_another_backend_is_refused(monkeypatch):
    """A process has one Keras backend, fixed at import; this one has only torch, so the other is simulated."""
    monkeypatch.setattr(keras.backend, "backend", lambda: "tensorflow")
    with pytest.raises(ConvscopeError, match="'tensorflow' backend.*KERAS_BACKEND=torch"):
        convscope.load_model("keras:VGG16", random=True, device="cpu")


def test_profile_of_a_saved_keras_model_measures_the_deconvnet(saved_model, tmp_path, capsys):
    """The depth profile on a Keras model: its layers by Keras name, its random-init baseline from
    Keras's own initialisers, the deconvnet measured (max-pooling)."""
    out = tmp_path / "profile"
    assert main(["profile", "--model", str(saved_model), "--device", "cpu", "--layers", "conv_a,shared@1",
                 "--limit", "4", "--dead-steps", "2", "--folds", "2", "--out", str(out)]) == 0
    index = json.loads((out / "profile.json").read_text())
    assert [row["layer"] for row in index["layers"]] == ["conv_a", "shared@1"]
    assert set(index["methods"]) == {"deconvnet", "guided", "gradient"}
    assert all(index["methods"][m]["layers_measured"] == 2 for m in ("deconvnet", "guided", "gradient"))
    assert "conv_a" in capsys.readouterr().out

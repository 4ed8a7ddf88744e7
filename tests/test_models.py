import socket
import time
import urllib.error
import warnings

import pytest
import torch
from torch import nn

import convscope
from convscope import sources
from convscope.cli.main import main
from convscope.errors import ConvscopeError
from convscope.methods.activations import predict
from convscope.weights import map_state_dict_by_order


def test_default_model_real_weights_cat_and_espresso(default_model, photos):
    cat = predict(default_model, photos["chelsea"])
    assert cat[0]["name"] == "Egyptian cat"
    assert cat[0]["probability"] > 0.6
    coffee = predict(default_model, photos["coffee"])
    assert coffee[0]["name"] == "espresso"
    assert coffee[0]["probability"] > 0.7


def test_default_model_carries_preprocessing_and_classes(default_model):
    pre = default_model.preprocessing
    assert pre.input_size == (224, 224)
    assert pre.value_range == pytest.approx((-1.0, 1.0))
    assert len(default_model.class_names) == 1000
    assert default_model.class_names[285] == "Egyptian cat"


def test_unknown_model_suggests_close_names():
    with pytest.raises(ConvscopeError, match="vgg19"):
        convscope.load_model("vgg91")


def test_offline_torchvision_names_weights_and_random(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ConvscopeError) as err:
        convscope.load_model("alexnet", device="cpu")
    assert "--weights" in str(err.value) and "--random" in str(err.value)


def test_random_init_says_so_in_title():
    loaded = convscope.load_model("alexnet", random=True, device="cpu")
    assert "RANDOM" in loaded.title and loaded.random_init


def test_local_state_dict_loads_weights_only(tmp_path):
    torch.manual_seed(3)
    source = convscope.load_model("alexnet", random=True, device="cpu").module
    path = tmp_path / "alexnet.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    loaded = convscope.load_model("alexnet", weights=str(path), device="cpu")
    for a, b in zip(source.state_dict().values(), loaded.module.state_dict().values()):
        assert torch.equal(a, b)


def test_state_dict_for_wrong_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(nn.Linear(3, 4).state_dict(), path)
    with pytest.raises(ConvscopeError, match="do not fit"):
        convscope.load_model("alexnet", weights=str(path), device="cpu")


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x).relu()


def tiny_factory():
    return _Tiny()


def test_pickled_module_needs_trust_file(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(_Tiny(), path)
    with pytest.raises(ConvscopeError, match="--trust-file"):
        convscope.load_model(str(path), device="cpu")
    loaded = convscope.load_model(str(path), trust_file=True, device="cpu")
    assert isinstance(loaded.module, _Tiny)


def test_torchscript_file_and_factory(tmp_path):
    path = tmp_path / "tiny.ts"
    torch.jit.script(_Tiny()).save(str(path))
    assert convscope.load_model(str(path), device="cpu").module(torch.zeros(1, 3, 8, 8)).shape == (1, 4, 8, 8)
    loaded = convscope.load_model("tests.test_models:tiny_factory", device="cpu")
    assert type(loaded.module).__name__ == "_Tiny"


def test_state_dict_file_as_model_says_use_weights(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(_Tiny().state_dict(), path)
    with pytest.raises(ConvscopeError, match="--weights"):
        convscope.load_model(str(path), device="cpu")


def test_map_state_dict_by_order_checks_shapes():
    target = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 5, 1)).state_dict()
    good = {f"x{i}": v.clone() + 1 for i, v in enumerate(target.values())}
    mapped = map_state_dict_by_order(good, target)
    assert all(torch.equal(mapped[k], v) for k, v in zip(target, good.values()))
    bad = dict(good)
    bad["x0"] = torch.zeros(4, 3, 5, 5)
    with pytest.raises(ConvscopeError, match="shape mismatch"):
        map_state_dict_by_order(bad, target)


def test_as_loaded_does_not_touch_a_user_module():
    module = _Tiny().train()
    loaded = convscope.as_loaded(module)
    assert loaded.module is module and module.training


def test_models_command_lists_what_the_errors_point_to(capsys):
    with pytest.raises(ConvscopeError, match="`convscope models` lists them") as err:
        convscope.load_model("vgg91")
    assert "vgg19" in str(err.value)
    assert main(["models", "vgg1*"]) == 0
    listed = capsys.readouterr().out.split()
    assert "vgg19" in listed and "vgg16_bn" in listed and "resnet50" not in listed
    assert main(["models", "resnet18", "--timm"]) == 0
    assert capsys.readouterr().out.split() == ["resnet18", "timm:resnet18"]
    assert main(["models"]) == 0
    assert "efficientnet_lite0  (default)" in capsys.readouterr().out


def test_hub_probe_reaches_a_listening_port_only(monkeypatch):
    from huggingface_hub import constants

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
        assert sources._hub_reachable(timeout=2.0)
    assert not sources._hub_reachable(timeout=2.0)  # the port is closed now


def test_timm_offline_fails_fast_and_restores_the_hub_setting(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(sources, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    start = time.perf_counter()
    with pytest.raises(ConvscopeError, match="--random"):
        convscope.load_model("timm:resnet18", device="cpu")
    assert time.perf_counter() - start < 15  # huggingface_hub's retries took about 50 s
    assert constants.HF_HUB_OFFLINE is False


def test_random_init_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a = convscope.load_model("resnet18", random=True)
    b = convscope.load_model("resnet18", random=True)
    c = convscope.load_model("resnet18", random=True, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    first = "conv1.weight"
    assert torch.equal(a.module.state_dict()[first], b.module.state_dict()[first])  # the same construction
    assert not torch.equal(a.module.state_dict()[first], c.module.state_dict()[first])
    assert "RANDOM INIT seed 0" in a.title and "RANDOM INIT seed 1" in c.title


def test_cli_random_says_its_seed(capsys):
    assert main(["layers", "--model", "resnet18", "--random", "--seed", "3", "--filter", "conv1"]) == 0
    assert "RANDOM INIT seed 3" in capsys.readouterr().out


class CifarNet(nn.Module):
    """The PyTorch tutorial's CIFAR-10 network: functional ReLU and max-pooling, a classifier on 5x5 maps."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 5), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(16 * 5 * 5, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(nn.functional.relu(self.conv1(x)), (2, 2))
        x = nn.functional.max_pool2d(nn.functional.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        return self.fc3(nn.functional.relu(self.fc2(nn.functional.relu(self.fc1(x)))))


def cifar_factory():
    torch.manual_seed(0)
    return CifarNet()


def test_a_fixed_size_network_runs_with_its_input_size_and_preprocessing(capsys):
    spec = "tests.test_models:cifar_factory"
    assert main(["layers", "--model", spec]) == 2                       # at 224 px its classifier cannot run
    assert "--input-size" in capsys.readouterr().err
    assert main(["layers", "--model", spec, "--input-size", "32", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"]) == 0
    out = capsys.readouterr().out
    assert "input 32×32" in out and "mean (0.5, 0.5, 0.5), std (0.25, 0.25, 0.25)" in out and "16×10×10" in out
    for bad in (["--input-size", "4"], ["--input-size", "32x"], ["--mean", "0.5,0.5"]):
        assert main(["layers", "--model", spec, *bad]) == 2
        assert "give" in capsys.readouterr().err
    loaded = convscope.load_model(spec, input_size=(32, 32), std=(0.5, 0.5, 0.5), device="cpu")
    assert loaded.preprocessing.input_size == (32, 32) and loaded.preprocessing.mean == (0.485, 0.456, 0.406)
    with pytest.raises(ConvscopeError, match="all above 0"):
        convscope.load_model(spec, std=(0.5, 0.0, 0.5), device="cpu")


def test_functional_max_pooling_counts_as_max_pooling(photos, tmp_path):
    """The tutorial network pools with F.max_pool2d: `auto` takes the deconvnet, whose switches it has;
    a photo of another shape gets the centre crop the classifier can take."""
    import json

    from PIL import Image

    from convscope.methods.deconv.choice import has_max_pooling, projection_method

    pooled = convscope.load_model("tests.test_models:cifar_factory", input_size=32, device="cpu")
    assert has_max_pooling(pooled) and projection_method(pooled).name == "deconvnet"
    plain = convscope.models.as_loaded(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AvgPool2d(2)))
    assert not has_max_pooling(plain) and projection_method(plain).name == "guided"
    assert pooled.fit(photos["chelsea"]).shape == (32, 32, 3)                       # 300x451: the centre, 32x32
    assert plain.fit(photos["chelsea"]).shape == (224, 337, 3)                      # fully convolutional: all of it
    photo = tmp_path / "cat.png"
    Image.fromarray(photos["chelsea"]).save(photo)
    out = tmp_path / "deconv"
    assert main(["deconv", str(photo), "--model", "tests.test_models:cifar_factory", "--input-size", "32",
                 "--layer", "relu@fn1", "--out", str(out)]) == 0
    record = json.loads((out / "deconv.json").read_text())
    assert record["methods"] == ["deconvnet"] and record["image_size"] == [32, 32]


def test_torchscript_is_refused_with_what_to_load_instead(tmp_path):
    path = tmp_path / "net.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch.jit is deprecated
        torch.jit.script(CifarNet()).save(str(path))
        loaded = convscope.load_model(str(path), input_size=32, device="cpu")
    with pytest.raises(ConvscopeError, match=r"TorchScript module.*forward hooks.*package.module:factory"):
        _ = loaded.catalogue


def test_a_model_file_is_recorded_by_absolute_path_for_workers(tmp_path, monkeypatch):
    """A Ray worker repeats the load: a relative file name would depend on its working directory."""
    torch.save(_Tiny(), tmp_path / "tiny.pt")
    monkeypatch.chdir(tmp_path)
    loaded = convscope.load_model("tiny.pt", trust_file=True, device="cpu")
    assert loaded.source["spec"] == str((tmp_path / "tiny.pt").resolve()) and loaded.source["trust_file"]
    assert convscope.load_model("resnet18", random=True, device="cpu").source["spec"] == "resnet18"

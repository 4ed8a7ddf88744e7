import socket
import time
import urllib.error

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

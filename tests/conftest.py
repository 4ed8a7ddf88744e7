"""Shared fixtures: the real default model (loaded once), VGG with random weights, sample photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import convscope
from convscope.images import sample_photos


@pytest.fixture(scope="session")
def default_model() -> convscope.LoadedModel:
    """EfficientNet-Lite0 with its real ImageNet weights (offline), on the CPU."""
    return convscope.load_model(device="cpu")


@pytest.fixture(scope="session")
def vgg19() -> convscope.LoadedModel:
    torch.manual_seed(0)
    return convscope.load_model("vgg19", random=True, device="cpu")


@pytest.fixture(scope="session")
def vgg16() -> convscope.LoadedModel:
    torch.manual_seed(0)
    return convscope.load_model("vgg16", random=True, device="cpu")


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """scikit-image's chelsea, astronaut and coffee as uint8 RGB arrays."""
    return sample_photos()


def model_state(module: torch.nn.Module) -> tuple:
    """Everything an analysis must leave as it found it: modes, requires_grad, hook counts."""
    modes = tuple(m.training for m in module.modules())
    grads = tuple(p.requires_grad for p in module.parameters())
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                + len(getattr(m, "_backward_pre_hooks", {})) for m in module.modules())
    return modes, grads, hooks


@pytest.fixture(scope="module")
def one_thread():
    """Many small ops: on a shared, oversubscribed CPU one torch thread is much faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole run: 2 CPUs, traffic on 127.0.0.1, no dashboard, quiet.

    Actors ask for half a CPU each (convscope.distributed.ACTOR_CPUS), so a pool of two leaves
    room for Ray Data's read tasks.
    """
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        yield ray
        return
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False, object_store_memory=256 * 1024 * 1024)
    try:
        yield ray
    finally:
        ray.shutdown()

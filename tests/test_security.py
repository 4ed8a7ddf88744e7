"""Files convscope reads never choose the code it runs: checkpoints, weights and model files."""

from __future__ import annotations

import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import convscope
from convscope.cli.main import main
from convscope.datasets import FolderImages, TensorImages
from convscope.errors import ConvscopeError
from convscope.methods.scan import STATE_FILE, scan
from convscope.models import Preprocessing


class _Marker:
    """A pickle whose loading creates ``path``: the side effect a malicious file would have."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _run(argv: list[str], capsys) -> tuple[int, str]:
    rc = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


# --------------------------------------------------------------------------- weights and model files


@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_weights_pickle_is_refused_without_running(tmp_path, capsys, legacy):
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.pt"
    torch.save({"conv.weight": _Marker(marker)}, evil, _use_new_zipfile_serialization=not legacy)
    rc, err = _run(["layers", "--weights", str(evil)], capsys)
    assert rc == 2
    assert err.startswith("convscope: error: ") and "only tensors" in err and "io.open" in err
    assert "weights_only=False" not in err
    assert not marker.exists()


def test_malicious_model_pickle_needs_trust_file_and_does_not_run(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.pt"
    torch.save(_Marker(marker), evil)
    rc, err = _run(["layers", "--model", str(evil)], capsys)
    assert rc == 2 and "--trust-file" in err and "weights_only" not in err
    assert not marker.exists()


def test_junk_model_file_is_not_called_a_pickle(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model at all\n")
    for extra in ([], ["--trust-file"]):
        rc, err = _run(["layers", "--model", str(junk), *extra], capsys)
        assert rc == 2 and "not a PyTorch file" in err
        assert "pickle" not in err.split("accepts")[0] and "add --trust-file" not in err


def test_file_kinds_are_told_apart(tmp_path):
    script, state = tmp_path / "net.ts", tmp_path / "sd.pt"
    torch.jit.script(nn.Conv2d(3, 4, 3)).save(str(script))
    torch.save(nn.Conv2d(3, 4, 3).state_dict(), state)
    with pytest.raises(ConvscopeError, match="is a TorchScript archive, not a state dict"):
        convscope.load_model("alexnet", random=True, weights=str(script), device="cpu")
    with pytest.raises(ConvscopeError, match="holds a state dict, not a model.*--weights"):
        convscope.load_model(str(state), device="cpu")
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(pickle.PROTO + bytes([4]) + b"\x00garbage")
    truncated = tmp_path / "truncated.pt"
    torch.save(nn.Conv2d(3, 4, 3), truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    for path in (damaged, truncated):
        for trust in (False, True):
            with pytest.raises(ConvscopeError, match="is a damaged or truncated torch.save file"):
                convscope.load_model(str(path), trust_file=trust, device="cpu")


def test_state_dict_with_wrong_shapes_or_values_names_the_key(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    shapes = tmp_path / "shapes.pt"
    torch.save({"0.weight": torch.zeros(4, 3, 5, 5), "0.bias": torch.zeros(4)}, shapes)
    with pytest.raises(ConvscopeError, match=r"'0.weight' has shape \(4, 3, 5, 5\) in the file but \(4, 3, 3, 3\)"):
        convscope.weights.load_state_dict(net, shapes)
    values = tmp_path / "values.pt"
    torch.save({"0.weight": [1.0, 2.0], "0.bias": torch.zeros(4)}, values)
    with pytest.raises(ConvscopeError, match="'0.weight' holds a list, not a tensor"):
        convscope.weights.load_state_dict(net, values)


# --------------------------------------------------------------------------- scan --resume


@pytest.fixture(scope="module")
def scanned(tmp_path_factory):
    out = tmp_path_factory.mktemp("scan")
    assert main(["scan", "--samples", "--limit", "8", "--size", "64", "--layers", "blocks.2.1.bn3", "--top", "2",
                 "--no-render", "--quiet", "--out", str(out)]) == 0
    return out


def _tamper(out: Path, tmp_path: Path, **meta) -> Path:
    """A copy of the scan whose checkpoint names other model options, as an attacker could write."""
    copy = tmp_path / "tampered"
    copy.mkdir(parents=True)
    state = torch.load(out / STATE_FILE, weights_only=True)
    state["meta"].update(meta)
    torch.save(state, copy / STATE_FILE)
    return copy


def test_resume_never_imports_the_factory_named_in_the_checkpoint(scanned, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "MARKER"
    (tmp_path / "evil_factory.py").write_text(
        f"from pathlib import Path\n\ndef make():\n    Path({str(marker)!r}).touch()\n    raise SystemExit(0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = _tamper(scanned, tmp_path, model="evil_factory:make")
    rc, err = _run(["scan", "--resume", "--no-render", "--quiet", "--out", str(out)], capsys)
    assert rc == 2
    assert "--model evil_factory:make" in err and "--model efficientnet_lite0" in err
    assert not marker.exists() and "evil_factory" not in sys.modules
    for spec in ("sys:exit", "tempfile:mkdtemp"):  # once a silent exit 0, and a folder made by the resume
        rc, err = _run(["scan", "--resume", "--no-render", "--quiet", "--out", str(_tamper(scanned, tmp_path / spec[:3],
                                                                                           model=spec))], capsys)
        assert rc == 2 and f"--model {spec}" in err


def test_resume_never_unpickles_the_model_file_named_in_the_checkpoint(scanned, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.pt"
    torch.save(_Marker(marker), evil)
    out = _tamper(scanned, tmp_path, model=str(evil))
    rc, err = _run(["scan", "--resume", "--trust-file", "--no-render", "--quiet", "--out", str(out)], capsys)
    assert rc == 2 and "cannot resume" in err
    assert not marker.exists()


def test_resume_with_other_model_flags_is_refused_and_with_the_same_ones_runs(scanned, tmp_path, capsys):
    rc, err = _run(["scan", "--resume", "--random", "--no-render", "--quiet", "--out", str(scanned)], capsys)
    assert rc == 2 and "--random" in err and "cannot resume" in err
    assert main(["scan", "--resume", "--model", "default", "--no-render", "--quiet", "--out", str(scanned)]) == 0
    assert "scanned 8 images" in capsys.readouterr().out


def _tiny_model() -> convscope.LoadedModel:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    return convscope.as_loaded(net.eval())


def test_resume_checks_the_range_end_and_the_preprocessing(tmp_path):
    model = _tiny_model()
    images = TensorImages(torch.randint(0, 256, (12, 16, 16, 3), dtype=torch.uint8))
    checkpoint = tmp_path / "state.pt"
    scan(model, images, "2", top=2, batch_size=4, stop=8, checkpoint=checkpoint, progress=False)
    with pytest.raises(ConvscopeError, match="end of the range"):
        scan(model, images, "2", top=2, stop=12, checkpoint=checkpoint, resume=True, progress=False)
    other = convscope.as_loaded(model.module, Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
    with pytest.raises(ConvscopeError, match="preprocessing"):
        scan(other, images, "2", top=2, stop=8, checkpoint=checkpoint, resume=True, progress=False)
    bicubic = convscope.as_loaded(model.module, Preprocessing(interpolation="bicubic"))
    with pytest.raises(ConvscopeError, match="preprocessing"):
        scan(bicubic, images, "2", top=2, stop=8, checkpoint=checkpoint, resume=True, progress=False)
    scan(model, images, "2", top=2, stop=8, checkpoint=checkpoint, resume=True, progress=False)


def test_folder_fingerprint_sees_a_replaced_file_of_the_same_size(tmp_path):
    for name, value in (("a.bmp", 10), ("b.bmp", 200)):
        Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(tmp_path / name)
    before = FolderImages(tmp_path, (8, 8)).fingerprint
    target = tmp_path / "a.bmp"
    size, mtime = target.stat().st_size, target.stat().st_mtime_ns
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(target)
    assert target.stat().st_size == size  # same size, other pixels
    os.utime(target, ns=(time.time_ns(), mtime + 1_000_000))
    assert FolderImages(tmp_path, (8, 8)).fingerprint != before


def test_a_hostile_checkpoint_is_refused_without_running_or_torchs_advice(tmp_path, capsys):
    from convscope.methods.scan import load_checkpoint

    marker = tmp_path / "MARKER"
    state = tmp_path / "scan_state.pt"
    torch.save({"format": "convscope.scan-state/1", "meta": _Marker(marker)}, state)
    with pytest.raises(ConvscopeError) as err:
        load_checkpoint(state)
    assert "weights_only=False" not in str(err.value) and "start afresh" in str(err.value)
    assert not marker.exists()

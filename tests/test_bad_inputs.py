"""Bad input through the CLI: exit 2, one `convscope: error:` line, no traceback, nothing left behind.

Each case runs ``convscope.cli.main.main(argv)`` in-process with the working directory in a
fresh tmp folder (so default ``--out`` folders would land there). Most cases must be refused
before the model is loaded; the model loader is replaced by one that records the call and
hands out the session's default model, so ``early`` cases prove that no model was needed and
the others stay fast. A few cases run a real subprocess to prove the promise end to end.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convscope.cli import _common
from convscope.cli.main import main

SRC = Path(__file__).resolve().parents[1] / "src"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_bomb(path: Path, side: int = 20000) -> None:
    """A valid-header PNG of ``side``² pixels (far over PIL's limit) in a few bytes; PIL refuses it on open."""
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
                     + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b""))


def make_inputs(root: Path) -> None:
    rng = np.random.default_rng(0)
    inputs = root / "in"
    inputs.mkdir()
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(inputs / "good.jpg")
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(inputs / "tiny.png")
    Image.fromarray(np.zeros((10, 4000, 3), np.uint8)).save(inputs / "thin.png")
    write_bomb(inputs / "bomb.png")
    (inputs / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (inputs / "file.txt").write_text("not a folder\n")
    broken = inputs / "broken"
    broken.mkdir()
    for i in range(3):
        (broken / f"b{i}.jpg").write_bytes(b"garbage" * (i + 1))
    write_bomb(broken / "bomb.png")
    # A probe folder whose class "a" has a single image: too few for any cross-validation.
    for name, count in (("a", 1), ("b", 3)):
        (inputs / "classes" / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(inputs / "classes" / name / f"{i}.png")
    # A probe folder whose class "a" holds only a decompression bomb: skipped, leaving one class.
    for name in ("a", "b"):
        (inputs / "bombclass" / name).mkdir(parents=True)
    write_bomb(inputs / "bombclass" / "a" / "bomb.png")
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(inputs / "bombclass" / "b" / f"{i}.png")
    (inputs / "empty").mkdir()


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# (id, argv, fragment the error must contain, needs the model). "in/" is the inputs folder.
CASES = [
    # predict
    ("predict-top-negative", ["predict", "in/good.jpg", "--top", "-1"], "--top", False),
    ("predict-top-zero", ["predict", "in/good.jpg", "--top", "0"], "at least 1", False),
    ("predict-top-text", ["predict", "in/good.jpg", "--top", "five"], "whole number", False),
    ("predict-tiny", ["predict", "in/tiny.png"], "at least 8 px", False),
    ("predict-bomb", ["predict", "in/bomb.png"], "too large to decode", False),
    ("predict-missing", ["predict", "in/missing.jpg"], "not found", False),
    ("predict-corrupt", ["predict", "in/corrupt.jpg"], "in/corrupt.jpg", False),
    ("predict-no-image", ["predict"], "required", False),
    # activations
    ("activations-cols-zero", ["activations", "in/good.jpg", "--cols", "0"], "--cols", False),
    ("activations-size-zero", ["activations", "in/good.jpg", "--size", "0"], "--size", False),
    ("activations-thin-size", ["activations", "in/thin.png", "--size", "224"], "--max-side", False),
    ("activations-thin-default", ["activations", "in/thin.png"], "--max-side", True),
    ("activations-tiny", ["activations", "in/tiny.png"], "at least 8 px", False),
    ("activations-bomb", ["activations", "in/bomb.png"], "too large to decode", False),
    ("activations-out-proc", ["activations", "in/good.jpg", "--out", "/proc/convscope-out"], "cannot write", False),
    ("activations-out-file", ["activations", "in/good.jpg", "--out", "in/file.txt"], "is a file", False),
    ("activations-out-under-file", ["activations", "in/good.jpg", "--out", "in/file.txt/sub"], "is a file", False),
    ("activations-max-side-zero", ["activations", "in/good.jpg", "--max-side", "0"], "--max-side", False),
    # features
    ("features-lr-nan", ["features", "--layer", "blocks.1.0", "--lr", "nan"], "finite", False),
    ("features-lr-negative", ["features", "--layer", "blocks.1.0", "--lr", "-1"], "greater than 0", False),
    ("features-steps-zero", ["features", "--layer", "blocks.1.0", "--steps", "0"], "--steps", False),
    ("features-batch-size-zero", ["features", "--layer", "blocks.1.0", "--batch-size", "0"], "--batch-size", False),
    ("features-cols-zero", ["features", "--layer", "blocks.1.0", "--cols", "0"], "--cols", False),
    ("features-tv-negative", ["features", "--layer", "blocks.1.0", "--tv", "-0.5"], "--tv", False),
    ("features-max-scale-below-min", ["features", "--layer", "blocks.1.0", "--max-scale", "0.5"], "smallest scale",
     False),
    ("features-max-scale-zero", ["features", "--layer", "blocks.1.0", "--max-scale", "0"], "greater than 0", False),
    ("features-out-proc", ["features", "--layer", "blocks.1.0", "--out", "/sys/convscope-out"], "cannot write", False),
    ("features-channels-reversed", ["features", "--layer", "blocks.1.0", "--channels", "5-2"], "lower end", False),
    # deconv
    ("deconv-layer-pattern", ["deconv", "in/good.jpg", "--layer", "blocks.1.*"], "one layer", False),
    ("deconv-tile-zero", ["deconv", "in/good.jpg", "--layer", "blocks.1.0", "--tile", "0"], "--tile", False),
    ("deconv-cols-zero", ["deconv", "in/good.jpg", "--layer", "blocks.1.0", "--cols", "0"], "--cols", False),
    ("deconv-batch-size-zero", ["deconv", "in/good.jpg", "--layer", "blocks.1.0", "--batch-size", "0"],
     "--batch-size", False),
    ("deconv-channels-reversed", ["deconv", "in/good.jpg", "--layer", "blocks.1.0", "--channels", "5-2"],
     "lower end", False),
    ("deconv-tiny", ["deconv", "in/tiny.png", "--layer", "blocks.1.0"], "at least 8 px", False),
    ("deconv-bomb", ["deconv", "in/bomb.png", "--layer", "blocks.1.0"], "too large to decode", False),
    ("deconv-unknown-layer", ["deconv", "in/good.jpg", "--layer", "nosuchlayer"], "unknown layer", True),
    ("deconv-channel-range", ["deconv", "in/good.jpg", "--layer", "blocks.1.0", "--channels", "99999"],
     "out of range", True),
    # scan
    ("scan-workers-negative", ["scan", "--samples", "--workers", "-1"], "--workers", False),
    ("scan-top-zero", ["scan", "--samples", "--top", "0"], "--top", False),
    ("scan-limit-zero", ["scan", "--samples", "--limit", "0"], "--limit", False),
    ("scan-batch-size-zero", ["scan", "--samples", "--batch-size", "0"], "--batch-size", False),
    ("scan-channels-reversed", ["scan", "--samples", "--channels", "5-2"], "lower end", False),
    ("scan-out-file", ["scan", "--samples", "--out", "in/file.txt"], "is a file", False),
    ("scan-neither", ["scan"], "--samples", False),
    ("scan-all-corrupt", ["scan", "in/broken", "--workers", "0"], "none of the 4 images", True),
    ("scan-channel-range", ["scan", "--samples", "--channels", "99999"], "out of range", True),
    ("scan-missing-folder", ["scan", "in/missing"], "not found", False),
    ("profile-missing-folder", ["profile", "--images", "in/missing"], "not found", False),
    ("profile-folder-is-a-file", ["profile", "--images", "in/file.txt"], "got a file", False),
    # occlusion
    ("occlusion-patch-zero", ["occlusion", "in/good.jpg", "--patch", "0"], "--patch", False),
    ("occlusion-stride-zero", ["occlusion", "in/good.jpg", "--stride", "0"], "--stride", False),
    ("occlusion-batch-size-zero", ["occlusion", "in/good.jpg", "--batch-size", "0"], "--batch-size", False),
    ("occlusion-memory-zero", ["occlusion", "in/good.jpg", "--memory", "0"], "--memory", False),
    ("occlusion-memory-inf", ["occlusion", "in/good.jpg", "--memory", "inf"], "not a size", False),
    ("occlusion-tiny", ["occlusion", "in/tiny.png"], "at least 8 px", False),
    ("occlusion-bomb", ["occlusion", "in/bomb.png"], "too large to decode", False),
    ("occlusion-thin", ["occlusion", "in/thin.png", "--size", "100"], "--max-side", False),
    # probe
    ("probe-batch-size-zero", ["probe", "--samples", "--batch-size", "0"], "--batch-size", False),
    ("probe-folds-one", ["probe", "--samples", "--folds", "1"], "at least 2", False),
    ("probe-class-of-one", ["probe", "in/classes", "--folds", "2"], "add images to it", False),
    ("probe-bomb-only-class", ["probe", "in/bombclass"], "at least two classes", False),
    ("probe-missing", ["probe", "in/missing"], "not found", False),
    ("probe-neither", ["probe"], "--samples", False),
    # atlas
    ("atlas-recipe-bogus", ["atlas", "--recipe", "bogus"], "invalid choice", False),
    ("atlas-scan-missing", ["atlas", "--scan", "in/missing"], "not a folder", False),
    ("atlas-scan-all-corrupt", ["atlas", "--scan", "in/broken"], "none of the 4 images", False),
    ("atlas-images-bomb", ["atlas", "--images", "in/bomb.png"], "too large to decode", False),
    ("atlas-images-tiny", ["atlas", "--images", "in/tiny.png"], "at least 8 px", False),
    ("atlas-images-empty-folder", ["atlas", "--images", "in/empty"], "no images", False),
    ("atlas-photos-zero", ["atlas", "--photos", "0"], "--photos", False),
    ("atlas-skip-bogus", ["atlas", "--skip", "bogus"], "unknown stage", False),
    ("atlas-scan-limit-without-scan", ["atlas", "--scan-limit", "5"], "give --scan too", False),
    ("atlas-projections-without-scan", ["atlas", "--projections", "3"], "give --scan too", False),
    ("atlas-projections-over-top", ["atlas", "--scan", "samples", "--top", "4", "--projections", "5"],
     "give 1 to --top (4)", False),
    ("atlas-out-proc", ["atlas", "--out", "/proc/convscope-atlas"], "cannot write", False),
    ("atlas-images-thin", ["atlas", "--images", "in/thin.png"], "--max-side", True),
    # serve
    ("serve-port-high", ["serve", "in", "--port", "70000"], "65535", False),
    ("serve-file", ["serve", "in/file.txt"], "is a file", False),
    ("serve-no-index", ["serve", "in/empty"], "no index.html", False),
    # demo
    ("demo-out-proc", ["demo", "--out", "/proc/convscope-demo"], "cannot write", False),
    # the command itself
    ("no-command", [], "required", False),
    ("unknown-command", ["bogus"], "invalid choice", False),
]

class _Marker:
    """A pickle whose loading creates ``path``: the side effect a malicious file would have."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def make_model_files(root: Path) -> Path:
    """Hostile and broken model files in ``root/models``; returns the marker no load may create."""
    import torch

    models = root / "models"
    models.mkdir()
    marker = root / "MARKER"
    torch.save({"conv.weight": _Marker(marker)}, models / "evil_weights.pt")
    torch.save({"conv.weight": _Marker(marker)}, models / "evil_legacy.pt", _use_new_zipfile_serialization=False)
    torch.save(_Marker(marker), models / "evil_model.pt")
    (models / "junk.pt").write_bytes(b"not a model at all\n")
    torch.save({"conv_stem.weight": torch.zeros(3, 3)}, models / "wrong_shape.pt")
    torch.save({"conv_stem.weight": "a string"}, models / "not_tensors.pt")
    (models / "truncated.pt").write_bytes((models / "evil_weights.pt").read_bytes()[:40])
    return marker


# Model files and names, through the real loader: (id, argv, fragment). "models/" holds make_model_files' output.
MODEL_CASES = [
    ("weights-malicious-pickle", ["layers", "--weights", "models/evil_weights.pt"], "only tensors"),
    ("weights-malicious-legacy-pickle", ["layers", "--weights", "models/evil_legacy.pt"], "only tensors"),
    ("model-malicious-pickle", ["layers", "--model", "models/evil_model.pt"], "--trust-file"),
    ("model-junk", ["layers", "--model", "models/junk.pt"], "not a PyTorch file"),
    ("model-junk-trusted", ["layers", "--model", "models/junk.pt", "--trust-file"], "not a PyTorch file"),
    ("weights-wrong-shape", ["predict", "in/good.jpg", "--weights", "models/wrong_shape.pt"], "do not fit"),
    ("weights-not-tensors", ["layers", "--weights", "models/not_tensors.pt"], "do not fit"),
    ("weights-truncated", ["layers", "--weights", "models/truncated.pt"], "models/truncated.pt"),
    ("weights-missing", ["layers", "--weights", "models/none.pt"], "models/none.pt"),
    ("model-unknown-name", ["layers", "--model", "vgg91"], "vgg19"),
    ("model-bad-factory", ["layers", "--model", "no_such_package.module:make"], "no_such_package"),
]


@pytest.fixture()
def workdir(tmp_path, monkeypatch, request):
    make_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    calls = []

    def load_model(name=None, **kwargs):
        calls.append(name)
        assert name is None, "the table uses the default model only"
        return request.getfixturevalue("default_model")

    monkeypatch.setattr(_common, "load_model", load_model)
    return tmp_path, calls


def assert_one_error_line(err: str, fragment: str) -> None:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("convscope: error: "), err
    assert fragment in lines[0], err


@pytest.mark.parametrize("argv, fragment, needs_model", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_cleanly(argv, fragment, needs_model, workdir, capsys):
    root, calls = workdir
    before = tree(root)
    code = main(argv)
    _, err = capsys.readouterr()
    assert code == 2
    assert_one_error_line(err, fragment)
    assert tree(root) == before, "files were left behind"
    if "--out" in argv:
        out = Path(argv[argv.index("--out") + 1])
        assert not out.exists() or out == Path("in/file.txt")
    if not needs_model:
        assert calls == [], "refused only after loading the model"


def test_probe_folds_advice_names_a_usable_count(workdir, capsys):
    """With 3 images in the smallest class, 5 folds are too many: the advice is 3, never more than there are."""
    root, _ = workdir
    (root / "in" / "classes" / "a" / "1.png").write_bytes((root / "in" / "classes" / "b" / "0.png").read_bytes())
    (root / "in" / "classes" / "a" / "2.png").write_bytes((root / "in" / "classes" / "b" / "1.png").read_bytes())
    code = main(["probe", "in/classes", "--folds", "5"])
    _, err = capsys.readouterr()
    assert code == 2
    assert_one_error_line(err, "use --folds 3")


def test_help_still_exits_zero(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["scan", "--help"])
    assert exit_info.value.code == 0
    assert "--workers" in capsys.readouterr().out


@pytest.mark.parametrize("argv, fragment", [
    (["predict", "in/bomb.png"], "too large to decode"),
    (["scan", "--samples", "--workers", "-1"], "--workers"),
    (["activations", "in/good.jpg", "--out", "/proc/convscope-out"], "cannot write"),
], ids=["bomb", "argparse", "out-unwritable"])
def test_real_process_prints_one_line_and_no_traceback(argv, fragment, tmp_path):
    make_inputs(tmp_path)
    before = tree(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "convscope", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr, fragment)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("argv, fragment", [c[1:] for c in MODEL_CASES], ids=[c[0] for c in MODEL_CASES])
def test_bad_model_input_is_refused_cleanly_and_runs_no_code(argv, fragment, tmp_path, monkeypatch, capsys):
    make_inputs(tmp_path)
    marker = make_model_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    code = main(argv)
    _, err = capsys.readouterr()
    assert code == 2
    assert_one_error_line(err, fragment)
    assert "weights_only=False" not in err  # never pass on torch's advice to unpickle anyway
    assert not marker.exists(), "a hostile pickle ran"
    assert tree(tmp_path) == before

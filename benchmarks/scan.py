"""Benchmark: dataset-scan throughput against a bare batched forward, memory flatness, and what it means for ImageNet.

Task: the default model (EfficientNet-Lite0) and VGG16 (random init) at 224x224, batch 32, the
three default layers (VGG16: block3_conv3, block4_conv3, block5_conv3). Side by side in one process,
over the same decoded uint8 tensors:

  full forward       model(normalize(x)) per batch: the whole network, no hooks;
  truncated forward  the same, stopped right after the deepest tracked layer (one hook that ends the
                     pass, nothing recorded): the work the scan must do at the least;
  scan               convscope.scan over those tensors in memory: hooks on 3 layers, the top-9 fold of
                     every channel, the forward stopped after the deepest tracked layer. Timed from
                     outside the call, on a fresh LoadedModel with no cached catalogue, so the
                     catalogue trace, the weight fingerprint and the image-set fingerprint count;
  scan+read          convscope.scan streaming the same images as JPEG files from a folder (listing and
                     fingerprinting the folder counted too), decoded and resized by DataLoader workers
                     (the real end-to-end path; the readers share the cores).

The scan stops early, so against the full forward it gains work it skips; the ratio to the
truncated forward is the honest overhead of hooks and top-k. Both are printed.
Target: scan >= 0.8x the full forward's images/s.

Memory: peak resident memory of `scan` streaming 500 and 2000 JPEG files (each count in a fresh
subprocess, default model), and the size of the top-k state; both must be flat in the image count.

Context: the Deep Visualization Toolbox's README reports 40 hours for the top-9 over ImageNet's 1.3M
training images. We print what our measured rate means for 1.3M images on this machine.

Run:  .venv/bin/python benchmarks/scan.py [--device cuda] [--images 256 --vgg-images 64] [--repeat 3]
      [--memory 500,2000]
Quick smoke run:  .venv/bin/python benchmarks/scan.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _machine
import torch
from PIL import Image

import convscope
from convscope.datasets import FolderImages, SampleImages, TensorImages
from convscope.hooks import StopForward, recording
from convscope.layers import build_catalogue
from convscope.methods.scan import default_layers, scan
from convscope.models import fingerprint

IMAGENET_TRAIN = 1_281_167
DEEPVIS_HOURS = 40.0


def decoded_images(n: int, size=(224, 224)) -> torch.Tensor:
    """``n`` distinct uint8 images from the sample set's windows (flipped and shifted past 531)."""
    windows = SampleImages(size)
    base = [windows[i][1] for i in range(min(n, len(windows)))]
    out = []
    for i in range(n):
        image = base[i % len(base)]
        variant = i // len(base)
        if variant % 2:
            image = image.flip(1)
        if variant >= 2:
            image = image.roll(shifts=(7 * variant, 11 * variant), dims=(0, 1))
        out.append(image)
    return torch.stack(out)


def write_jpegs(pixels: torch.Tensor, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(pixels.numpy()):
        Image.fromarray(image).save(folder / f"img{i:06d}.jpg", quality=90)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_forward(loaded, pixels: torch.Tensor, batch: int, stop_at: str | None = None) -> float:
    """Seconds for a plain eval forward of every batch (uint8 -> device -> normalise -> model).

    With ``stop_at``, one hook ends each pass right after that layer and keeps nothing: the
    forward the scan needs, without its recording and top-k work.
    """
    module, pre, device = loaded.module, loaded.preprocessing, loaded.device
    hook = recording(module, [stop_at], clone=False, stop_after_last=True) if stop_at else contextlib.nullcontext()
    sync(device)
    start = time.perf_counter()
    with torch.no_grad(), hook:
        for s in range(0, len(pixels), batch):
            x = pixels[s:s + batch].to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
            with contextlib.suppress(StopForward):
                module(pre.normalize(x))
    sync(device)
    return time.perf_counter() - start


def uncached(loaded):
    """The same model and weights with no catalogue cached, so the next scan traces it afresh."""
    return dataclasses.replace(loaded)  # a new LoadedModel: its per-size catalogue cache starts empty


def timed_scan(loaded, make_images, names: str, batch: int, workers: int = 0) -> float:
    """Wall seconds of everything a caller waits for: the image set's fingerprint, the catalogue
    trace, the weight fingerprint and the scan itself (``ScanResult.seconds`` counts only the last)."""
    loaded = uncached(loaded)
    sync(loaded.device)
    start = time.perf_counter()
    scan(loaded, make_images(), names, batch_size=batch, workers=workers, progress=False)
    sync(loaded.device)
    return time.perf_counter() - start


def setup_costs(loaded) -> dict:
    """Seconds of the two one-off steps inside the scan's time, measured alone for the breakdown."""
    start = time.perf_counter()
    build_catalogue(loaded.module, loaded.preprocessing.input_size, loaded.device)
    trace = time.perf_counter() - start
    start = time.perf_counter()
    fingerprint(loaded.module)
    return {"trace": trace, "fingerprint": time.perf_counter() - start}


def bench_model(loaded, pixels: torch.Tensor, batch: int, workers: int, folder: Path | None, repeat: int) -> dict:
    layers = default_layers(loaded.catalogue)
    names = ",".join(layer.name for layer in layers)
    deepest = layers[-1].name  # default_layers returns them in forward order
    loaded.module.eval()
    in_memory = lambda: TensorImages(pixels)  # noqa: E731
    bare_forward(loaded, pixels[:batch], batch)                        # warm-up (allocator, kernels)
    bare_forward(loaded, pixels[:batch], batch, stop_at=deepest)
    timed_scan(loaded, lambda: TensorImages(pixels[:batch]), names, batch)
    t_full, t_cut, t_scan = [], [], []
    for _ in range(repeat):                                            # interleaved: all see the same noise
        t_full.append(bare_forward(loaded, pixels, batch))
        t_cut.append(bare_forward(loaded, pixels, batch, stop_at=deepest))
        t_scan.append(timed_scan(loaded, in_memory, names, batch))
    n = len(pixels)
    out = {"model": loaded.title, "layers": [layer.label for layer in layers], "deepest": layers[-1].label, "n": n,
           "full": n / min(t_full), "cut": n / min(t_cut), "scan": n / min(t_scan), **setup_costs(loaded)}
    if folder is not None:
        size, resample = loaded.preprocessing.input_size, loaded.preprocessing.resample
        t_read = [timed_scan(loaded, lambda: FolderImages(folder, size, resample), names, batch, workers)
                  for _ in range(repeat)]
        out["scan_read"] = n / min(t_read)
    return out


def memory_child(folder: str, count: int, device: str, batch: int, workers: int) -> None:
    """Run in a subprocess: scan the first ``count`` files and print peak memory as JSON."""
    loaded = convscope.load_model(device=device)
    images = FolderImages(folder, loaded.preprocessing.input_size, loaded.preprocessing.resample)
    if loaded.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = scan(loaded, images, None, batch_size=batch, workers=workers, stop=count, progress=False)
    peak_gpu = torch.cuda.max_memory_allocated() if loaded.device.type == "cuda" else 0
    print(json.dumps({"count": result.images_scanned, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "gpu_mb": peak_gpu / 2**20, "state_bytes": result.topk.nbytes, "rate": result.rate}))


def report(r: dict, repeat: int, workers: int) -> None:
    print(f"\n{r['model']}: layers {', '.join(r['layers'])}; {r['n']} images, best of {repeat}")
    print(f"  full forward (whole network)    {r['full']:8.1f} images/s")
    print(f"  forward truncated               {r['cut']:8.1f} images/s   (stops after {r['deepest']})")
    print(f"  scan (3 layers, top-9)          {r['scan']:8.1f} images/s   {r['scan'] / r['full']:.2f}x the full "
          f"forward (target >= 0.8x), {r['scan'] / r['cut']:.2f}x the truncated one")
    print(f"    (inside the scan's time: catalogue trace {r['trace']:.2f} s, weight fingerprint "
          f"{r['fingerprint']:.2f} s, measured alone)")
    if "scan_read" in r:
        print(f"  scan + JPEG reading             {r['scan_read']:8.1f} images/s   {r['scan_read'] / r['full']:.2f}x "
              f"the full forward (decode and resize by {workers} worker(s) on the same cores)")
        hours = IMAGENET_TRAIN / r["scan_read"] / 3600
        print(f"  1.3M ImageNet images at the end-to-end rate: {hours:.1f} wall hours on this machine; the DeepVis "
              f"Toolbox README reports {DEEPVIS_HOURS:.0f} h for its top-9 ({DEEPVIS_HOURS / hours:.2f}x its speed)")


def memory_check(args, folder: Path, counts: list[int]) -> str:
    print(f"\nmemory: default model, scanning JPEG files, fresh process per count ({args.device})")
    peaks = []
    for count in counts:
        child = subprocess.run(
            [sys.executable, __file__, "--device", args.device, "--batch", str(args.batch),
             "--workers", str(args.workers), "--memory-child", str(folder), str(count)],
            capture_output=True, text=True, check=True)
        stats = json.loads(child.stdout.strip().splitlines()[-1])
        peaks.append(stats)
        gpu = f", GPU peak {stats['gpu_mb']:.0f} MB" if args.device == "cuda" else ""
        print(f"  {stats['count']:6d} images: peak RSS {stats['rss_mb']:7.1f} MB{gpu}, "
              f"top-k state {stats['state_bytes'] / 1024:.1f} KiB, {stats['rate']:.1f} images/s (scan loop)")
    if len(peaks) < 2:
        return ""
    growth = peaks[-1]["rss_mb"] / peaks[0]["rss_mb"] - 1
    flat = "flat" if abs(growth) < 0.05 and peaks[-1]["state_bytes"] == peaks[0]["state_bytes"] else "NOT flat"
    print(f"  peak RSS change {growth:+.1%} from {peaks[0]['count']} to {peaks[-1]['count']} images: {flat}")
    return f"; memory {flat} ({growth:+.1%} RSS, {peaks[0]['count']} -> {peaks[-1]['count']} images)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=256, help="images for the default model's throughput")
    parser.add_argument("--vgg-images", type=int, default=64, help="images for VGG16's throughput (slow on a CPU)")
    parser.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)))
    parser.add_argument("--repeat", type=int, default=3, help="interleaved repeats; the best time of each counts")
    parser.add_argument("--memory", default="500,2000", help="image counts for the memory check ('' to skip)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 64 and 16 images, 1 repeat, memory at 64 and 128 images")
    parser.add_argument("--memory-child", nargs=2, metavar=("FOLDER", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child[0], int(args.memory_child[1]), args.device, args.batch, args.workers)
        return
    if args.quick:
        args.images, args.vgg_images, args.repeat, args.memory = 64, 16, 1, "64,128"

    device = torch.device(args.device)
    _machine.header("benchmark: scan throughput and memory")
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(f"device {args.device}{gpu}; 224x224, batch {args.batch}, {args.workers} reader workers, "
          f"best of {args.repeat} interleaved repeats")
    counts = [int(c) for c in args.memory.split(",") if c.strip()]
    total = max([args.images, args.vgg_images, *counts])
    summary = []
    with tempfile.TemporaryDirectory() as tmp:
        pixels = decoded_images(total)
        folder = Path(tmp) / "jpegs"
        write_jpegs(pixels, folder)
        torch.manual_seed(0)
        for loaded, n in ((convscope.load_model(device=args.device), args.images),
                          (convscope.load_model("vgg16", random=True, device=args.device), args.vgg_images)):
            sub = Path(tmp) / f"first{n}"
            if not sub.exists():
                sub.mkdir()
                for i in range(n):
                    os.link(folder / f"img{i:06d}.jpg", sub / f"img{i:06d}.jpg")
            r = bench_model(loaded, pixels[:n], args.batch, args.workers, sub, args.repeat)
            report(r, args.repeat, args.workers)
            summary.append(f"{loaded.name} {r['scan'] / r['full']:.2f}x full / {r['scan'] / r['cut']:.2f}x truncated")
        memory = memory_check(args, folder, counts) if counts else ""
    print("\nTimes on a shared machine are noisy; compare ratios measured in the same run.")
    _machine.footer("scan vs forward (images/s ratio): " + "; ".join(summary) + memory)


if __name__ == "__main__":
    main()

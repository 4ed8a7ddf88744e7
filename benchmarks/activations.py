"""Benchmark: capture every conv layer + grids to PNG, vs a bare forward and vs the post's pipeline.

Task: VGG19 (random init) and the default model at 224×224, all conv (feature) layers.
Side by side in one process:
  bare      a bare forward pass, plus PNG encoding of grid-sized images made beforehand;
  ours      convscope.activations (one forward, hooks) + one grid PNG per layer;
  post      the blog post's loop: per-channel copies into np.zeros, plt.imshow at figsize (25, 25), savefig.
Targets: ours within 2x of bare; at least 5x faster than post.

Every timing is warm (one untimed call first, so matplotlib's font cache and torch's kernels are
ready) and the best of the same ``--repeat`` runs. The post's pipeline draws every layer unless
``--post-layers N`` asks for the first N only; then its time is scaled by the layer count, and the
output says so.

Run: .venv/bin/python benchmarks/activations.py [--repeat 3] [--post-layers N]
Quick smoke run: .venv/bin/python benchmarks/activations.py --quick
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import _machine
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import convscope  # noqa: E402
from convscope._io import save_png  # noqa: E402
from convscope.hooks import capture  # noqa: E402
from convscope.images import sample_photos  # noqa: E402


def post_pipeline(maps: dict[str, np.ndarray], out: Path) -> None:
    """The post's code, channels-first: a per-channel loop into np.zeros, then a 25x25-inch figure."""
    for name, activation in maps.items():
        num_channels, h, w = activation.shape
        cols = 16
        rows = math.ceil(num_channels / cols)
        img_grid = np.zeros((h * rows, w * cols))
        for c in range(num_channels):
            f_r = math.ceil((c + 1) / cols)
            f_c = (c + 1) if f_r == 1 else (c + 1 - (f_r - 1) * cols)
            img_grid[(f_r - 1) * h:f_r * h, (f_c - 1) * w:f_c * w] = activation[c]
        plt.figure(figsize=(25, 25))
        plt.imshow(img_grid, aspect="equal", cmap="viridis")
        plt.grid(False)
        plt.title(name, fontsize=16)
        plt.savefig(out / f"post_{name}.png")
        plt.close()


def bench(loaded, photo, repeat, post_layers, out: Path) -> dict:
    layers = loaded.catalogue.features
    x, rgb = loaded.tensor(photo, (224, 224))
    last = layers[-1].name

    def bare_forward():
        capture(loaded.module, x, [last])  # forward to the deepest conv layer, nothing else kept

    result = convscope.activations(loaded, rgb, size=(224, 224))
    grids = [result.grid(layer) for layer in layers]  # the very pictures ours writes

    def encode_only():
        for i, grid in enumerate(grids):
            grid.save(out / f"bare_{i}.png", compress_level=1)

    def ours():
        res = convscope.activations(loaded, rgb, size=(224, 224))
        for layer in res.layers:
            render_path = out / f"ours_{layer.name}.png"
            save_png(res.grid(layer), render_path)

    post_maps = {layer.name: result.maps[layer.name] for layer in layers[:post_layers or len(layers)]}
    t_forward = _machine.best_of(bare_forward, repeat)
    t_encode = _machine.best_of(encode_only, repeat)
    t_ours = _machine.best_of(ours, repeat)
    first = dict(list(post_maps.items())[:1])  # one figure warms matplotlib (fonts, Agg canvas) for all
    t_post_part = _machine.best_of(lambda: post_pipeline(post_maps, out), repeat, warm=lambda: post_pipeline(first, out))
    t_post = t_forward + t_post_part * len(layers) / len(post_maps)  # scaled to all layers when it drew fewer
    return {"model": loaded.title, "layers": len(layers), "forward": t_forward, "bare": t_forward + t_encode,
            "ours": t_ours, "post": t_post, "post_measured_layers": len(post_maps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of every pipeline (best counts), after a warm-up")
    parser.add_argument("--post-layers", type=int, default=0,
                        help="layers the post's pipeline draws (default 0 = all; fewer: its time is scaled by the "
                             "layer count)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, the post on 3 layers (scaled)")
    args = parser.parse_args()
    if args.quick:
        args.repeat, args.post_layers = 1, 3
    _machine.header("benchmark: activations (capture + grids to PNG) vs bare forward and the post's pipeline")
    torch.manual_seed(0)
    photo = sample_photos(("astronaut",))["astronaut"]
    print(f"224x224, all feature layers; every pipeline warm, best of {args.repeat}")
    summary = []
    with tempfile.TemporaryDirectory() as tmp:
        for loaded in (convscope.load_model("vgg19", random=True, device="cpu"), convscope.load_model(device="cpu")):
            r = bench(loaded, photo, args.repeat, args.post_layers, Path(tmp))
            print(f"\n{r['model']}: {r['layers']} layers")
            print(f"  bare forward                 {r['forward']:7.3f} s")
            print(f"  bare forward + PNG encoding  {r['bare']:7.3f} s")
            print(f"  ours: capture + grids + PNG  {r['ours']:7.3f} s   ratio to bare {r['ours'] / r['bare']:.2f}x (target <= 2x)")
            if r["post_measured_layers"] == r["layers"]:
                how = "all layers drawn"
            else:
                how = (f"SCALED: drew {r['post_measured_layers']} of {r['layers']} layers, time x "
                       f"{r['layers'] / r['post_measured_layers']:.2f}")
            print(f"  post's pipeline (plt)        {r['post']:7.3f} s   ({how})")
            print(f"  speed-up over the post       {r['post'] / r['ours']:.1f}x (target >= 5x)")
            summary.append(f"{loaded.name} {r['ours'] / r['bare']:.2f}x of bare, {r['post'] / r['ours']:.1f}x faster "
                           "than the post" + ("" if r["post_measured_layers"] == r["layers"] else " (scaled)"))
    _machine.footer("; ".join(summary))


if __name__ == "__main__":
    main()

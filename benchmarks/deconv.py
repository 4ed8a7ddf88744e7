"""Deconvnet / guided backprop speed: convscope's batched projections against captum, one call per channel.

Task (issue 4): the strongest unit of each of 64 channels of a middle layer and of the deepest
conv layer, at 224x224, for VGG16 (random init) and for the default model (EfficientNet-Lite0).
Ours: one ``project_units`` call (receptive-field crops batched for the middle layer, one shared
forward pass for deep units). captum: ``NeuronDeconvolution`` / ``NeuronGuidedBackprop``, one
``attribute`` call per channel, as its documentation shows. Both run in this process, on the
same input and units; the maps are compared too, so the figures compare equal work.

On the default model captum cannot compute deconvnet or guided backprop: it swaps the backward
of ``nn.ReLU`` modules only, and the model rectifies with ``nn.ReLU6``. There captum's numbers
are for the plain gradient it actually returns (printed as such).

Usage:
    python benchmarks/deconv.py                      # all, 64 channels, best of 2 (about an hour on 2 busy cores)
    python benchmarks/deconv.py --captum-channels 16 # time captum on 16 of the 64 calls (rate per projection)
    python benchmarks/deconv.py --models vgg16 --threads 1
    python benchmarks/deconv.py --quick                  # smoke run: 4 channels, captum on 2, one repeat
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import _machine
import numpy as np
import torch
from torch import nn

import convscope
from convscope.methods.deconv import project_units, strongest_units

# (model spec, middle layer, deepest conv layer)
CASES = {
    "vgg16": ("vgg16", "block4_conv1", "block5_conv3"),
    "default": (None, "blocks.3.0.bn2", "bn2"),
}


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def _captum_model(module: nn.Module) -> nn.Module:
    """captum's full backward hooks refuse in-place ReLUs: a copy without them (same maths)."""
    model = copy.deepcopy(module).eval()
    for m in model.modules():
        if isinstance(m, nn.ReLU | nn.ReLU6):
            m.inplace = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def bench_layer(loaded, x, layer_name: str, channels: int, captum_channels: int, relu6: bool,
                repeat: int) -> list[dict]:
    from captum.attr import NeuronDeconvolution, NeuronGuidedBackprop

    layer = loaded.catalogue.get(layer_name)
    units = strongest_units(loaded, x, layer, channels=range(channels))
    target_model = _captum_model(loaded.module)
    target = dict(target_model.named_modules())[layer.name]
    rows = []
    for method, cls in (("deconvnet", NeuronDeconvolution), ("guided", NeuronGuidedBackprop)):
        project_units(loaded, x, layer, units[:2], method=method)            # warm-up
        explainer = cls(target_model, target)

        def run_captum(explainer=explainer):
            maps = []
            for u in units[:captum_channels]:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    a = explainer.attribute(x.clone(), neuron_selector=(u.channel, u.row, u.col))
                maps.append(a[0].permute(1, 2, 0).detach().numpy())
            return np.stack(maps)

        # Alternate the two and keep each one's best time: the machine is shared, and the
        # minimum over repeats is the least disturbed measurement of each.
        t_ours = t_captum = float("inf")
        for _ in range(repeat):
            ours, t = _timed(lambda m=method: project_units(loaded, x, layer, units, method=m))
            t_ours = min(t_ours, t)
            theirs, t = _timed(run_captum)
            t_captum = min(t_captum, t)
        n = len(theirs)
        scale = max(float(np.abs(theirs).max()), float(np.abs(ours.maps[:n]).max()), 1e-12)
        diff_same = float(np.abs(ours.maps[:n] - theirs).max()) / scale
        note = f"max |ours - captum| / max = {diff_same:.1e}"
        if relu6:
            plain = project_units(loaded, x, layer, units[:n], method="gradient").maps
            diff_plain = float(np.abs(plain - theirs).max()) / scale
            note = (f"captum = plain gradient here (max diff {diff_plain:.1e}); "
                    f"ours {method} differs from it by {diff_same:.2f} x max")
        rows.append({
            "layer": layer.label, "method": method, "units": len(units), "strategy": ours.strategy,
            "ours_rate": len(units) / t_ours, "captum_rate": n / t_captum, "captum_calls": n,
            "captum_method": "plain gradient (ReLU6 not hooked)" if relu6 else method, "note": note,
        })
        print(_format(rows[-1]), flush=True)
    return rows


def _format(row: dict) -> str:
    ratio = row["ours_rate"] / row["captum_rate"]
    return (f"  {row['layer']:<28} {row['method']:<9} ours {row['ours_rate']:7.2f} proj/s ({row['strategy']}, "
            f"{row['units']} units) | captum {row['captum_rate']:6.2f} proj/s ({row['captum_method']}, "
            f"{row['captum_calls']} calls) | ratio {ratio:5.1f}x\n      {row['note']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vgg16,default", help="comma-separated: vgg16, default")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--captum-channels", type=int, default=None,
                        help="time captum on the first N of the channels (default all); rates are per projection")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=2, help="alternating repeats; the best time of each counts")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--layers", default="middle,deep", help="middle, deep or both")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 channels, captum on 2, one repeat")
    args = parser.parse_args()
    if args.quick:
        args.channels, args.captum_channels, args.repeat = 4, 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    _machine.header("benchmark: deconvnet / guided backprop, convscope vs captum")
    captum_channels = args.captum_channels or args.channels
    photo = convscope.sample_photos(("chelsea",))["chelsea"]
    print(f"deconv benchmark: {args.channels} channels, strongest unit each, {args.size}x{args.size}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, best of {args.repeat}")
    results = []
    for key in args.models.split(","):
        spec, middle, deep = CASES[key.strip()]
        torch.manual_seed(0)
        loaded = convscope.load_model(spec, random=spec is not None, device="cpu")
        relu6 = any(isinstance(m, nn.ReLU6) for m in loaded.module.modules())
        x, _ = loaded.tensor(photo, (args.size, args.size))
        print(f"{loaded.title}" + ("  [rectifier nn.ReLU6: captum computes only the plain gradient]" if relu6 else ""))
        chosen = {"middle": middle, "deep": deep}
        for which in args.layers.split(","):
            results += bench_layer(loaded, x, chosen[which.strip()], args.channels, captum_channels, relu6,
                                   args.repeat)
    print("\nsummary (projections per second; ratio = ours / captum; targets: >= 5x middle, >= 1.5x deepest conv)")
    for row in results:
        print(f"  {row['layer']:<28} {row['method']:<9} {row['ours_rate']:7.2f} vs {row['captum_rate']:6.2f}  "
              f"{row['ours_rate'] / row['captum_rate']:5.1f}x  [{row['captum_method']}]")
    ratios = [row["ours_rate"] / row["captum_rate"] for row in results]
    _machine.footer(f"ours / captum projections per second: {min(ratios):.1f}x to {max(ratios):.1f}x over "
                    f"{len(results)} cases (see the summary for which)")


if __name__ == "__main__":
    main()

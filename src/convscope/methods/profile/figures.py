"""The depth profile's one multi-panel figure (matplotlib, drawn off-screen)."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from .result import ProfileResult

__all__ = ["profile_figure"]

_COLOURS = {"deconvnet": "tab:purple", "guided": "tab:orange", "gradient": "tab:blue"}


def _ticks(ax, result: ProfileResult) -> None:
    n = len(result.layers)
    step = max(1, int(np.ceil(n / 12)))
    where = list(range(0, n, step))
    if where[-1] != n - 1:
        where.append(n - 1)
    ax.set_xticks(where, [result.layers[i].alias or result.layers[i].name for i in where], rotation=60, ha="right",
                  fontsize=6)
    ax.set_xlim(-0.5, n - 0.5)
    ax.grid(alpha=0.3)


def _probe_panel(ax, result: ProfileResult, key: str, x: np.ndarray) -> None:
    scores = getattr(result, key)
    for data, label, marker in ((scores.trained, "trained", "o"), (scores.random, "RANDOM INIT", "s")):
        mean = data.mean(axis=1)
        std = data.std(axis=1, ddof=1) if data.shape[1] > 1 else np.zeros(len(mean))
        ax.plot(x, mean, marker=marker, markersize=3, linewidth=1.2, label=label)
        ax.fill_between(x, mean - std, mean + std, alpha=0.2)
    ax.axhline(scores.chance, color="gray", linestyle="--", linewidth=1, label=f"chance {scores.chance:.2f}")
    ax.set_ylim(min(scores.chance - 0.05, 0.4), 1.02)
    ax.set_ylabel("CV accuracy (mean ± std)")
    name = "far task" if key == "far" else "near task"
    ax.set_title(f"{name}: {scores.task}\n{scores.n_images} images at {scores.size[0]}px, {scores.folds} folds",
                 fontsize=8)
    ax.legend(fontsize=6, loc="lower right")
    _ticks(ax, result)


def profile_figure(result: ProfileResult) -> Image.Image:
    """Geometry, activity, the two probes, projection trust by depth and the cascade, in one picture."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    rows = result.rows()
    x = np.arange(len(rows))
    probes = result.far is not None
    panels = 2 + (2 if probes else 0) + (2 if result.trust else 0)
    cols = 3 if panels > 4 else 2
    grid_rows = -(-panels // cols)
    fig = Figure(figsize=(5.2 * cols, 3.9 * grid_rows + 0.6), dpi=100)
    axes = list(np.atleast_1d(fig.subplots(grid_rows, cols)).ravel())
    for ax in axes[panels:]:
        ax.set_visible(False)
    fig.suptitle(f"Depth profile of {result.model_title}: shallow → deep, one point per feature layer", fontsize=10)

    ax = axes[0]
    rf = [np.nan if not isinstance(r["rf"], int) else r["rf"] for r in rows]
    stride = [np.nan if r["stride"] is None else r["stride"] for r in rows]
    ax.plot(x, rf, marker="o", markersize=3, label="receptive field (px)")
    ax.plot(x, stride, marker="s", markersize=3, label="stride (px)")
    glob = [i for i, r in enumerate(rows) if r["rf"] == "global"]
    if glob:
        ax.scatter(glob, [max(np.nanmax(rf) if np.isfinite(rf).any() else 1, 1)] * len(glob), marker="^",
                   color="black", label="global field")
    ax.axhline(max(result.model["preprocessing"]["input_size"]), color="gray", linestyle="--", linewidth=1,
               label="input size")
    ax.set_yscale("log", base=2)
    ax.set_title("geometry", fontsize=8)
    ax.legend(fontsize=6)
    _ticks(ax, result)

    ax = axes[1]
    ax.plot(x, [r["sparsity"] for r in rows], marker="o", markersize=3, label="sparsity (share of zeros)")
    ax.plot(x, [r["silent_share"] for r in rows], marker="s", markersize=3, label="silent channels (share)")
    ax.plot(x, [r["dead_share"] for r in rows], marker="x", markersize=4, color="black", label="dead channels (share)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"activity on {len(result.photos)} photos + {result.scan_images} scan images;\n"
                 f"dead = silent and not raised by {result.settings.get('dead_steps')} optimization steps", fontsize=8)
    ax.legend(fontsize=6)
    _ticks(ax, result)

    at = 2
    if probes:
        _probe_panel(axes[at], result, "far", x)
        _probe_panel(axes[at + 1], result, "near", x)
        at += 2
    if result.trust:
        ax = axes[at]
        for scores in result.trust:
            colour = _COLOURS.get(scores.rule.name)
            for of, style, label in (("median_spearman", "-", "{title}"),
                                     ("chance_spearman", ":", "{title}: another photo (chance)")):
                medians = [r["trust"][scores.rule.name].get(of) for r in rows]
                at_x = [i for i, m in enumerate(medians) if m is not None]
                ax.plot(at_x, [medians[i] for i in at_x], marker="o" if style == "-" else None, markersize=3,
                        linestyle=style, color=colour, label=label.format(title=scores.rule.title))
        ax.set_ylim(-0.3, 1.02)
        ax.set_ylabel("Spearman ρ, trained vs randomized")
        missing = "; ".join(f"{k}: not applicable" for k in result.not_measured)
        ax.set_title("projection trust (every weight below the layer randomized);\n"
                     "insensitive where the solid line stays above its dotted chance line"
                     + (f"\n{missing}" if missing else ""), fontsize=8)
        ax.legend(fontsize=6)
        _ticks(ax, result)
        ax = axes[at + 1]
        steps = ["none"] + list(result.cascade_steps)
        for scores in result.trust:
            if scores.cascade is None:
                continue
            med = [np.nanmedian(r) if np.isfinite(r).any() else np.nan for r in scores.cascade]
            ax.plot(range(len(steps)), [1.0, *med], marker="o", markersize=3, color=_COLOURS.get(scores.rule.name),
                    label=scores.rule.title)
        ax.set_xticks(range(len(steps)), steps, rotation=45, ha="right", fontsize=6)
        ax.set_ylim(-0.3, 1.02)
        ax.grid(alpha=0.3)
        ax.set_ylabel("Spearman ρ (median over units)")
        deepest = result.layers[-1]
        ax.set_title(f"cascading randomization at {deepest.alias or deepest.name}:\nrandomized from the top down to …",
                     fontsize=8)
        ax.legend(fontsize=6)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")

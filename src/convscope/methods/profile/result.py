"""What a depth profile returns: one row per layer, the cascade, and the files it is saved as."""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..._io import atomic_path, save_json, save_png
from ...layers import LayerInfo
from . import figures
from .engine import LayerActivity, ProbeScores, TrustScores

__all__ = ["ProfileResult", "insensitive", "TRUST_ALPHA"]


# The one-sided test's level, and the fewest unit pairs it is run on.
TRUST_ALPHA = 0.05
TRUST_MIN_UNITS = 6


def insensitive(same: np.ndarray | None, elsewhere: np.ndarray | None) -> tuple[bool | None, float | None]:
    """Adebayo et al.'s sanity check, calibrated on the same units: ``(flag, p)``.

    ``same[i]``: Spearman between unit i's map on the trained model and on the randomized model,
    same photo; ``elsewhere[i]``: the same against the randomized model's map of the unit on another
    photo (what footprint alone gives). A method is insensitive to the weights when its randomized
    maps are reliably closer to the trained maps on the same photo: a one-sided Wilcoxon
    signed-rank test of ``same - elsewhere > 0`` at :data:`TRUST_ALPHA`. ``(None, None)`` with
    fewer than :data:`TRUST_MIN_UNITS` measured pairs.
    """
    if same is None or elsewhere is None:
        return None, None
    keep = np.isfinite(same) & np.isfinite(elsewhere)
    diff = np.asarray(same)[keep] - np.asarray(elsewhere)[keep]
    if diff.size < TRUST_MIN_UNITS:
        return None, None
    if not np.any(diff):
        return False, 1.0
    from scipy.stats import wilcoxon

    p = float(wilcoxon(diff, alternative="greater").pvalue)
    return p < TRUST_ALPHA, p


def _round(x, digits: int = 4):
    if x is None:
        return None
    x = float(x)
    return None if np.isnan(x) else round(x, digits)


def _text(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _stats(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample std over folds (axis 1)."""
    std = scores.std(axis=1, ddof=1) if scores.shape[1] > 1 else np.zeros(len(scores))
    return scores.mean(axis=1), std


@dataclass
class ProfileResult:
    """A depth profile: per feature layer, geometry, activity, dead channels, probes and projection trust.

    Attributes:
        layers: the profiled layers, shallow to deep.
        activity: ``{layer name: LayerActivity}`` (sparsity, magnitudes, silent and dead channels).
        far, near: the probes (digits; orientation of photo patches), or None when not measured.
        trust: one :class:`TrustScores` per measured method (deconvnet, guided, gradient).
        cascade_steps: the cascade's blocks, top first (each step randomizes one more).
        not_measured: ``{method: why}`` for a method that does not apply to this model.
        model_title, model: the model's title and description.
        scan_set, scan_images: the scan set's description and how many of its images were read.
        photos: the reference photos' names.
        settings: everything else the numbers depend on.
        seconds: wall time of each part.
    """

    layers: list[LayerInfo]
    activity: dict[str, LayerActivity]
    far: ProbeScores | None
    near: ProbeScores | None
    trust: list[TrustScores]
    cascade_steps: list[str]
    not_measured: dict[str, str]
    model_title: str
    model: dict
    scan_set: dict
    scan_images: int
    photos: list[str]
    seed: int
    settings: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ numbers

    def trust_median(self, method: str, layer: str | None = None, of: str = "layers") -> float | None:
        """The median Spearman correlation of ``method`` over all units (of one layer, or of all
        layers): trained vs randomized (``of="layers"``), or a reference point: ``"chance"`` (the
        same unit on another photo) or ``"edge"`` (an edge detector's map of the photo)."""
        scores = next((t for t in self.trust if t.rule.name == method), None)
        if scores is None:
            return None
        table = getattr(scores, of)
        values = [table.get(layer)] if layer is not None else list(table.values())
        values = [v for v in values if v is not None]
        if not values:
            return None
        flat = np.concatenate(values)
        flat = flat[~np.isnan(flat)]
        return float(np.median(flat)) if flat.size else None

    def methods(self) -> dict[str, dict]:
        """Per method: the median correlations (randomized, and the chance and edge-map references),
        the cascade's medians, and the verdict (:func:`insensitive`)."""
        out = {}
        for scores in self.trust:
            name = scores.rule.name
            median, chance, edge = (self.trust_median(name, of=of) for of in ("layers", "chance", "edge"))
            pairs = [(scores.layers[k], scores.chance[k]) for k in scores.layers if k in scores.chance]
            flag, p = insensitive(np.concatenate([a for a, _ in pairs]) if pairs else None,
                                  np.concatenate([b for _, b in pairs]) if pairs else None)
            cascade = None
            if scores.cascade is not None:
                cascade = [_round(np.nanmedian(row)) if np.isfinite(row).any() else None for row in scores.cascade]
            if flag is None:
                verdict = f"not measured (fewer than {TRUST_MIN_UNITS} units with a map)"
            elif flag:
                verdict = ("insensitive to the weights: its maps on the randomized model stay closer to the trained "
                           "maps on the same photo than on another photo, so they show the image more than what the "
                           "model learned")
            else:
                verdict = ("sensitive to the weights: once randomized, its maps are no closer to the trained maps on "
                           "the same photo than on another photo")
            out[name] = {
                "title": scores.rule.title, "median_spearman": _round(median), "chance_spearman": _round(chance),
                "edge_spearman": _round(edge), "insensitive": flag, "p_value": _round(p), "verdict": verdict,
                "cascade": cascade, "layers_measured": len(scores.layers), "not_measured": dict(scores.reasons),
            }
        for name, why in self.not_measured.items():
            out[name] = {"title": name, "median_spearman": None, "chance_spearman": None, "edge_spearman": None,
                         "insensitive": None, "p_value": None, "verdict": why, "cascade": None, "layers_measured": 0,
                         "not_measured": {}}
        return out

    def rows(self) -> list[dict]:
        """One JSON-ready dict per layer."""
        rows = []
        far = _stats(self.far.trained) + _stats(self.far.random) if self.far is not None else None
        near = _stats(self.near.trained) + _stats(self.near.random) if self.near is not None else None
        for i, layer in enumerate(self.layers):
            act = self.activity[layer.name]
            row = {
                "layer": layer.name, "alias": layer.alias, "shape": list(layer.shape),
                "rf": "global" if layer.field == "global" else (None if layer.rf_size is None else
                                                                  int(max(layer.rf_size))),
                "field": layer.field, "stride": None if layer.stride is None else float(max(layer.stride)),
                "channels": act.channels, "sparsity": _round(act.sparsity),
                "silent": len(act.silent), "silent_share": _round(len(act.silent) / act.channels),
                "dead": len(act.dead), "dead_share": _round(len(act.dead) / act.channels),
                "dead_channels": list(act.dead), "layer_scale": float(f"{act.scale:.6g}"),
                "dead_limit": float(f"{act.limit:.6g}"),
            }
            for key, stats, scores in (("far", far, self.far), ("near", near, self.near)):
                if stats is None:
                    continue
                mean, std, rmean, rstd = stats
                row[key] = {"trained_mean": _round(mean[i]), "trained_std": _round(std[i]),
                            "random_mean": _round(rmean[i]), "random_std": _round(rstd[i]),
                            "trained_folds": [_round(v) for v in scores.trained[i]],
                            "random_folds": [_round(v) for v in scores.random[i]]}
            row["trust"] = {}
            for scores in self.trust:
                if layer.name in scores.layers:
                    values = scores.layers[layer.name]
                    name = scores.rule.name
                    row["trust"][name] = {
                        "median_spearman": _round(self.trust_median(name, layer.name)),
                        "chance_spearman": _round(self.trust_median(name, layer.name, "chance")),
                        "edge_spearman": _round(self.trust_median(name, layer.name, "edge")),
                        "units": [_round(v) for v in values]}
                else:
                    row["trust"][scores.rule.name] = {
                        "median_spearman": None,
                        "not_measured": scores.reasons.get(layer.name, "not among the layers measured (trust_layers)")}
            rows.append(row)
        return rows

    # ------------------------------------------------------------------ text

    def _probe_head(self, key: str) -> str:
        scores = self.far if key == "far" else self.near
        return (f"{key} task: {scores.task}, {scores.n_images} images at {scores.size[0]}x{scores.size[1]}, "
                f"chance {scores.chance:.2f}")

    def table(self) -> str:
        """A markdown table, one row per layer, with a header that says what each column is."""
        methods = self.methods()
        trusted = [t.rule.name for t in self.trust]
        lines = [f"# Depth profile: {self.model_title}", ""]
        lines.append(f"- activity on {len(self.photos)} photos ({', '.join(self.photos)}) and {self.scan_images} "
                     f"scan-set images ({self.scan_set.get('root', self.scan_set.get('kind', ''))}); dead = silent on "
                     f"every image (|activation| <= {self.settings.get('dead_fraction')} x the layer's scale) and not "
                     f"raised above that by {self.settings.get('dead_steps')} steps of feature visualization")
        for key in ("far", "near"):
            if getattr(self, key) is not None:
                lines.append(f"- {self._probe_head(key)}; ridge probe on pooled features, "
                             f"{self.settings.get('folds')}-fold CV, mean ± std; RANDOM = same architecture at random "
                             f"init (seed {self.seed})")
        for name, info in methods.items():
            if info["median_spearman"] is None:
                median = "n/a"
            else:
                median = (f"median Spearman {info['median_spearman']:.2f} trained vs randomized; edge map "
                          f"{_text(info['edge_spearman'])}, chance {_text(info['chance_spearman'])}")
            lines.append(f"- {name}: {median}; {info['verdict']}")
        lines.append("")
        head = ["layer", "shape", "RF", "stride", "sparsity", "silent", "dead"]
        if self.far is not None:
            head += ["far (trained)", "far (RANDOM)", "near (trained)", "near (RANDOM)"]
        head += [f"ρ {name}" for name in trusted]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join("---" for _ in head) + "|")
        for row in self.rows():
            cells = [row["alias"] or row["layer"], "x".join(map(str, row["shape"])),
                     str(row["rf"]) if row["rf"] is not None else "unknown",
                     "?" if row["stride"] is None else f"{row['stride']:g}",
                     f"{row['sparsity']:.2f}", f"{row['silent_share']:.2f}",
                     f"{row['dead_share']:.2f} ({row['dead']})"]
            if self.far is not None:
                for key in ("far", "near"):
                    p = row[key]
                    cells += [f"{p['trained_mean']:.2f} ± {p['trained_std']:.2f}",
                              f"{p['random_mean']:.2f} ± {p['random_std']:.2f}"]
            for name in trusted:
                value = row["trust"][name]["median_spearman"]
                cells.append("–" if value is None else f"{value:.2f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("ρ: median Spearman rank correlation between a method's map of the layer's strongest units on the "
                     "trained model and on the randomized model (|v| inside the receptive field); near 1 = the map "
                     "does not depend on the weights; – = not measured at this layer. References on the same units: "
                     "edge map = the trained map against a Sobel edge map of the photo (an image-only map); chance = "
                     "against the randomized model's map of the same unit on another photo (the receptive field's "
                     "footprint without the photo). Insensitive: same photo reliably above chance (one-sided "
                     f"Wilcoxon signed-rank over the units, p < {TRUST_ALPHA}).")
        return "\n".join(lines)

    def csv(self) -> str:
        """The table's numbers, one row per layer (CSV)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        trusted = [t.rule.name for t in self.trust]
        head = ["layer", "alias", "channels", "rf", "stride", "sparsity", "silent_share", "dead_share", "dead"]
        if self.far is not None:
            head += [f"{k}_{m}" for k in ("far", "near") for m in ("trained_mean", "trained_std", "random_mean",
                                                                     "random_std")]
        head += [f"spearman_{name}" for name in trusted]
        writer.writerow(head)
        for row in self.rows():
            cells = [row["layer"], row["alias"] or "", row["channels"], row["rf"], row["stride"], row["sparsity"],
                     row["silent_share"], row["dead_share"], row["dead"]]
            if self.far is not None:
                cells += [row[k][m] for k in ("far", "near") for m in ("trained_mean", "trained_std", "random_mean",
                                                                         "random_std")]
            cells += [row["trust"][name]["median_spearman"] for name in trusted]
            writer.writerow(["" if c is None else c for c in cells])
        return buffer.getvalue()

    # ------------------------------------------------------------------ pictures and files

    def plot(self) -> Image.Image:
        """The multi-panel figure (a PIL image): geometry, activity, both probes, projection trust, the cascade."""
        return figures.profile_figure(self)

    def to_dict(self) -> dict:
        """Settings, per-method verdicts and every row; no arrays."""
        probes = {}
        for key in ("far", "near"):
            scores = getattr(self, key)
            if scores is not None:
                probes[key] = {"task": scores.task, "n_images": scores.n_images, "input_size": list(scores.size),
                               "chance": _round(scores.chance), "folds": scores.folds,
                               "classifier": "StandardScaler + RidgeClassifierCV, StratifiedKFold(shuffle=True)",
                               "features": "per-channel spatial mean and max of each layer's output"}
        return {"model": self.model, "model_title": self.model_title, "seed": self.seed,
                "photos": self.photos, "scan_set": self.scan_set, "scan_images": self.scan_images,
                "settings": self.settings, "probes": probes, "methods": self.methods(),
                "trust_test": f"one-sided Wilcoxon signed-rank, randomized maps same photo vs another photo, p < {TRUST_ALPHA}", "cascade_layer": self.layers[-1].name if self.trust else None,
                "cascade_steps": self.cascade_steps, "seconds": self.seconds, "layers": self.rows()}

    def save(self, folder: str | os.PathLike) -> dict:
        """Write ``profile.png``, ``profile.md``, ``profile.csv`` and ``profile.json`` (last); return the index."""
        folder = Path(folder)
        files = {"plot": "profile.png", "table": "profile.md", "csv": "profile.csv", "json": "profile.json"}
        save_png(self.plot(), folder / files["plot"])
        with atomic_path(folder / files["table"]) as tmp:
            tmp.write_text(self.table() + "\n")
        with atomic_path(folder / files["csv"]) as tmp:
            tmp.write_text(self.csv())
        index = {**self.to_dict(), "files": files}
        save_json(index, folder / files["json"])
        return index

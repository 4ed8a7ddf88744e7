"""Transfer probes: how linearly decodable is a labelled image set from each layer?

This puts a number on the closing claim of the blog post: shallow features are generic,
deep ones task-specific, and pretrained filters transfer. For each chosen layer, every
image's feature maps are globally pooled (mean and max over space, per channel), and a
standardised logistic regression is fitted with stratified k-fold cross-validation
(scikit-learn, one fixed seed, the same folds for every layer). The same is done with the
same architecture at random initialisation, so the value of pretraining is visible.

The built-in set is scikit-image's ``lfw_subset``: 100 faces and 100 non-faces, 25x25
grayscale, upsampled to the model's input size. A folder with one sub-folder per class
works the same way.

Example:
    >>> res = convscope.probe(convscope.load_model())      # built-in faces vs non-faces
    >>> print(res.table())
    >>> res.plot().save("probe.png")
"""

from __future__ import annotations

import copy
import io
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .._io import atomic_path, save_json, save_png
from ..datasets import MIN_SIDE
from ..errors import ConvscopeError
from ..hooks import capture
from ..images import IMAGE_EXTENSIONS, load_image
from ..layers import LayerInfo
from ..models import LoadedModel, as_loaded
from ..selection import spread

__all__ = ["ProbeDataset", "ProbeResult", "probe", "lfw_faces", "image_folder", "random_init_like",
           "pooled_features", "digits", "orientation", "Classifier", "LOGISTIC", "RIDGE", "cross_validate"]


@dataclass
class ProbeDataset:
    """A labelled image set: ``images[i]`` (uint8 RGB, any size) has class ``labels[i]``."""

    images: list[np.ndarray]
    labels: np.ndarray
    class_names: list[str]
    name: str

    def __len__(self) -> int:
        return len(self.images)

    @property
    def counts(self) -> dict[str, int]:
        return {name: int((self.labels == i).sum()) for i, name in enumerate(self.class_names)}


def lfw_faces() -> ProbeDataset:
    """scikit-image's ``lfw_subset``: 100 faces then 100 non-faces, 25x25 grayscale (offline)."""
    from skimage.data import lfw_subset

    gray = (np.clip(lfw_subset(), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    images = [np.repeat(g[:, :, None], 3, axis=2) for g in gray]
    labels = np.array([1] * 100 + [0] * 100)
    return ProbeDataset(images, labels, ["non-face", "face"], "lfw_subset (faces vs non-faces)")


def digits(per_class: int = 30, seed: int = 0) -> ProbeDataset:
    """A far task: scikit-learn's ``load_digits`` (8x8 handwritten digits, 10 classes), upsampled
    by the probe like any image; ``per_class`` digits of each class, drawn with ``seed`` (offline).

    Far from photographs, and with few examples per class it does not saturate. It is linearly
    easy, though: the ridge probe on the raw 8x8 pixels reaches 0.90 (30 per class, 5 folds, seed
    0), so any features that keep the pixels, random filters included, do about as well; it
    measures what a layer keeps more than what it learned.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    rng = np.random.default_rng(seed)
    picks = np.sort(np.concatenate([rng.choice(np.flatnonzero(data.target == c), min(per_class, int((data.target == c).sum())),
                                               replace=False) for c in range(10)]))
    gray = (data.images[picks] / 16.0 * 255.0 + 0.5).astype(np.uint8)
    images = [np.repeat(g[:, :, None], 3, axis=2) for g in gray]
    return ProbeDataset(images, data.target[picks].astype(np.int64), [str(c) for c in range(10)],
                        f"digits ({per_class} per class, 8x8)")


# Photos that ship with scikit-image and scikit-learn and have an up and a down (scenes, a face,
# a cat, text); photos without one (micrographs, coins, the Hubble field) would only add noise.
ORIENTATION_PHOTOS = ("skimage:astronaut", "skimage:chelsea", "skimage:coffee", "skimage:rocket", "skimage:camera",
                      "skimage:page", "skimage:text", "skimage:horse", "sklearn:china.jpg", "sklearn:flower.jpg")


def _orientation_photos() -> dict[str, np.ndarray]:
    from skimage import data
    from sklearn.datasets import load_sample_images

    from ..images import to_rgb8

    bundled = load_sample_images()
    by_file = {Path(name).name: image for name, image in zip(bundled.filenames, bundled.images)}
    photos = {}
    for key in ORIENTATION_PHOTOS:
        source, name = key.split(":")
        image = getattr(data, name)() if source == "skimage" else by_file[name]
        if image.dtype == bool:
            image = image.astype(np.uint8) * 255
        photos[key] = to_rgb8(image)
    return photos


def orientation(per_photo: int = 24, seed: int = 0, side: float = 0.45) -> ProbeDataset:
    """A near task of natural images: is a patch upright or upside down (turned 180 degrees)?

    Square patches (``side`` x the photo's shorter side, at seeded random positions) of photos
    that ship offline (:data:`ORIENTATION_PHOTOS`), ``per_photo`` each, every second one turned;
    each patch appears once, in one orientation, and every photo gives as many of each class, so
    neither the photo nor its colours tell the class. Global pooling keeps no position, so a
    probe must read oriented content (sky above, faces and letters upright): random filters
    barely do, trained ones do much better. Tried before it, and rejected: which-photo-is-this
    patches (random init solves them from colour and texture statistics) and ``lfw_subset``
    faces vs non-faces (0.98 at the first layer, random init too).
    """
    if per_photo < 2:
        raise ConvscopeError(f"per_photo must be at least 2 (got {per_photo})")
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for photo in _orientation_photos().values():
        height, width = photo.shape[:2]
        edge = max(MIN_SIDE, int(min(height, width) * side))
        for k in range(per_photo):
            top = int(rng.integers(0, height - edge + 1))
            left = int(rng.integers(0, width - edge + 1))
            patch = photo[top:top + edge, left:left + edge]
            turned = k % 2
            images.append(np.ascontiguousarray(patch[::-1, ::-1]) if turned else patch.copy())
            labels.append(turned)
    return ProbeDataset(images, np.array(labels, dtype=np.int64), ["upright", "upside down"],
                        f"orientation ({len(ORIENTATION_PHOTOS)} photos x {per_photo} patches, upright vs turned 180)")


def image_folder(path: str | Path) -> ProbeDataset:
    """A folder with one sub-folder per class, each holding that class's images.

    Raises :class:`ConvscopeError` for a missing or empty folder, or a single class.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise ConvscopeError(f"folder not found: {root}")
    if not root.is_dir():
        raise ConvscopeError(f"expected a folder with one sub-folder per class, got a file: {root}")
    classes: dict[str, list[Path]] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in sub.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if files:
            classes[sub.name] = files
    loose = [f for f in root.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
    if not classes:
        hint = (f" It holds {len(loose)} images directly; put each class's images in its own sub-folder."
                if loose else "")
        raise ConvscopeError(f"no images found in {root}: expected one sub-folder of images per class.{hint}")
    if len(classes) == 1:
        only = next(iter(classes))
        raise ConvscopeError(f"{root} has only one class (sub-folder {only!r}); a probe needs at least two "
                             "sub-folders of images, one per class")
    images, labels = [], []
    for label, files in enumerate(classes.values()):
        for f in files:
            # An unreadable file (corrupt, a decompression bomb, too small) is skipped, as the scan does.
            try:
                image = load_image(f)
            except ConvscopeError as err:
                tqdm.write(f"warning: skipped {f}: {err}")
                continue
            if min(image.shape[:2]) < MIN_SIDE:
                tqdm.write(f"warning: skipped {f}: {image.shape[1]}x{image.shape[0]} px, under {MIN_SIDE} px on a side")
                continue
            images.append(image)
            labels.append(label)
    return ProbeDataset(images, np.array(labels, dtype=np.int64), list(classes), str(root))


def check_dataset(dataset: ProbeDataset, folds: int) -> None:
    """Raise :class:`ConvscopeError` unless ``dataset`` supports ``folds``-fold stratified cross-validation."""
    if len(dataset) == 0:
        raise ConvscopeError("the image set is empty (no readable image); add images")
    if folds < 2:
        raise ConvscopeError(f"--folds must be at least 2 (got {folds})")
    counts = dataset.counts
    present = [name for name, count in counts.items() if count]
    if len(present) < 2:
        raise ConvscopeError(f"a probe needs readable images of at least two classes; only "
                             f"{present[0] if present else 'none'!r} has any")
    smallest = min(counts.items(), key=lambda kv: kv[1])
    if smallest[1] < 2:
        raise ConvscopeError(f"class {smallest[0]!r} has {smallest[1]} readable image(s); cross-validation needs "
                             f"at least 2 per class: add images to it")
    if smallest[1] < folds:
        raise ConvscopeError(f"class {smallest[0]!r} has {smallest[1]} images, but {folds}-fold cross-validation "
                             f"needs at least {folds} per class; add images or use --folds {smallest[1]}")


def random_init_like(loaded: LoadedModel, seed: int = 0) -> LoadedModel:
    """The same architecture with random weights, seeded; ``loaded`` is left untouched.

    Models loaded by name (the default, torchvision, ``timm:``) are rebuilt with their own
    initialisation; any other module is deep-copied and its layers' ``reset_parameters``
    run (PyTorch's default initialisation, batch-norm statistics reset).
    """
    from ..sources import list_models, load_model

    if loaded.name in list_models() or loaded.name.startswith(("timm:", "keras:")):
        try:
            return load_model(loaded.name, random=True, seed=seed, device=loaded.device)  # seeds its own fork
        except ConvscopeError:
            pass
    reinitialized = getattr(loaded.module, "reinitialized", None)  # a model with its own initialisers (Keras)
    if callable(reinitialized):
        return LoadedModel(reinitialized(seed), loaded.name, "random init", loaded.preprocessing, loaded.class_names,
                           random_init=True, seed=seed, device=loaded.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = copy.deepcopy(loaded.module)
        for m in module.modules():
            if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
                m.reset_parameters()
    return LoadedModel(module, loaded.name, "random init", loaded.preprocessing, loaded.class_names,
                       random_init=True, seed=seed, device=loaded.device)


@dataclass
class ProbeResult:
    """Cross-validated linear-probe accuracy per layer, pretrained and at random init.

    Attributes:
        layers: the probed layers, shallow to deep.
        accuracy: ``(layers, folds)`` accuracy of each fold, pretrained weights.
        baseline: the same for random-init weights, or None.
        feature_dims: pooled feature length per layer (2 x channels: mean and max).
        shapes: each layer's output shape ``(C, h, w)`` at the probe's input size.
    """

    layers: list[LayerInfo]
    accuracy: np.ndarray
    baseline: np.ndarray | None
    feature_dims: list[int]
    shapes: list[tuple[int, ...]]
    dataset: str
    class_counts: dict[str, int]
    folds: int
    seed: int
    size: tuple[int, int]
    model_title: str
    baseline_title: str | None

    @property
    def n_images(self) -> int:
        return sum(self.class_counts.values())

    @property
    def chance(self) -> float:
        """Accuracy of always answering the largest class."""
        return max(self.class_counts.values()) / self.n_images

    @staticmethod
    def _stats(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return scores.mean(axis=1), scores.std(axis=1, ddof=1) if scores.shape[1] > 1 else np.zeros(len(scores))

    def rows(self) -> list[dict]:
        mean, std = self._stats(self.accuracy)
        rows = []
        for i, layer in enumerate(self.layers):
            row = {"layer": layer.name, "alias": layer.alias, "shape": list(self.shapes[i]),
                   "features": self.feature_dims[i], "accuracy_mean": float(mean[i]), "accuracy_std": float(std[i]),
                   "accuracy_folds": self.accuracy[i].tolist()}
            if self.baseline is not None:
                bmean, bstd = self._stats(self.baseline)
                row.update(random_mean=float(bmean[i]), random_std=float(bstd[i]),
                           random_folds=self.baseline[i].tolist())
            rows.append(row)
        return rows

    def table(self) -> str:
        """A plain-text table: layer, shape, pretrained and random-init accuracy (mean ± std over folds)."""
        head = (f"{self.dataset}: {self.n_images} images ({', '.join(f'{k} {v}' for k, v in self.class_counts.items())}), "
                f"{self.folds}-fold stratified CV, seed {self.seed}, input {self.size[0]}x{self.size[1]}; "
                f"chance {self.chance:.3f}")
        lines = [head, f"{'layer':<30} {'shape':<14} {'pretrained':>15}" + (f" {'random init':>15} {'gain':>7}"
                                                                         if self.baseline is not None else "")]
        for row in self.rows():
            name = f"{row['alias']} ({row['layer']})" if row["alias"] else row["layer"]
            shape = "x".join(str(v) for v in row["shape"])
            line = f"{name:<30} {shape:<14} {row['accuracy_mean']:>8.3f} ± {row['accuracy_std']:.3f}"
            if self.baseline is not None:
                line += (f" {row['random_mean']:>8.3f} ± {row['random_std']:.3f}"
                         f" {row['accuracy_mean'] - row['random_mean']:>+7.3f}")
            lines.append(line)
        lines.append("accuracy: mean ± std over folds (sample std); features: per-channel spatial mean and max, "
                     "standardised; logistic regression (L2, C=1)")
        return "\n".join(lines)

    def plot(self) -> Image.Image:
        """Accuracy by depth with ±1 std error bars, random init and chance for reference (a PIL image)."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure

        x = np.arange(len(self.layers))
        mean, std = self._stats(self.accuracy)
        fig = Figure(figsize=(max(6.0, 0.55 * len(x) + 3), 4.6), dpi=110)
        ax = fig.subplots()
        ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=f"pretrained: {self.model_title}")
        if self.baseline is not None:
            bmean, bstd = self._stats(self.baseline)
            ax.errorbar(x, bmean, yerr=bstd, marker="s", capsize=3, label="same architecture, RANDOM INIT")
        ax.axhline(self.chance, color="gray", linestyle="--", linewidth=1, label=f"chance ({self.chance:.2f})")
        ax.set_xticks(x, [layer.alias or layer.name for layer in self.layers], rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("cross-validated accuracy")
        ax.set_xlabel("layer (shallow → deep)")
        ax.set_ylim(min(0.4, self.chance - 0.05), 1.02)
        ax.grid(alpha=0.3)
        ax.set_title(f"Linear probe by depth: {self.dataset}\n{self.n_images} images at "
                     f"{self.size[0]}x{self.size[1]}, {self.folds}-fold CV (mean ± std over folds), seed {self.seed}",
                     fontsize=9)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        buffer.seek(0)
        return Image.open(buffer).convert("RGB")

    def to_dict(self) -> dict:
        """Settings and the per-layer accuracies (:meth:`rows`), for the JSON output."""
        return {"dataset": self.dataset, "n_images": self.n_images, "class_counts": self.class_counts,
                "folds": self.folds, "seed": self.seed, "input_size": list(self.size), "chance": self.chance,
                "model": self.model_title, "baseline_model": self.baseline_title,
                "classifier": "StandardScaler + LogisticRegression(C=1, lbfgs), StratifiedKFold(shuffle=True)",
                "features": "per-channel spatial mean and max of each layer's output",
                "layers": self.rows()}

    def save(self, folder: str | os.PathLike) -> dict:
        """Write ``probe.png`` (:meth:`plot`), ``probe.txt`` (:meth:`table`) and ``probe.json`` (last).

        Returns the JSON index: :meth:`to_dict` plus ``files``, the names written.
        """
        folder = Path(folder)
        files = {"json": "probe.json", "plot": "probe.png", "table": "probe.txt"}
        save_png(self.plot(), folder / files["plot"])
        with atomic_path(folder / files["table"]) as tmp:
            tmp.write_text(self.table() + "\n")
        index = {**self.to_dict(), "files": files}
        save_json(index, folder / files["json"])
        return index



def pooled_features(loaded: LoadedModel, images: list[np.ndarray], layers: list[LayerInfo],
                    size: tuple[int, int], batch_size: int = 16,
                    progress: bool = False) -> tuple[list[np.ndarray], list[tuple[int, ...]]]:
    """``(N, 2C)`` features per layer (each channel's spatial mean, then its spatial max), and the
    layers' output shapes at this input size.

    Images are resized to ``size`` (the whole picture, as ``predict`` does).
    """
    from tqdm import tqdm

    pre = loaded.preprocessing
    param = next(loaded.module.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    chunks: list[list[np.ndarray]] = [[] for _ in layers]
    shapes: list[tuple[int, ...]] = [tuple(layer.shape) for layer in layers]
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc=f"features ({loaded.title[:40]})", unit="batch", disable=not progress, leave=False):
        batch = [pre.fit(img, size) for img in images[start:start + batch_size]]
        x = pre.to_tensor(batch, loaded.device).to(dtype)
        outputs = capture(loaded.module, x, layers)
        for i, layer in enumerate(layers):
            out = outputs[layer.name].double()
            shapes[i] = tuple(out.shape[1:])
            if out.dim() > 2:
                flat = out.flatten(2)
                pooled = torch.cat([flat.mean(2), flat.amax(2)], dim=1)
            else:
                pooled = out.flatten(1)
            chunks[i].append(pooled.cpu().numpy())
    return [np.concatenate(c) for c in chunks], shapes


@dataclass(frozen=True)
class Classifier:
    """A linear probe: ``make(seed)`` builds a fresh scikit-learn estimator (features standardised first)."""

    name: str
    description: str
    make: Callable[[int], object]


def _logistic(seed: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=1.0, max_iter=2000, random_state=seed)


# Leave-one-out over the ridge penalty is one eigendecomposition of the n x n kernel per fold, so
# this probe costs milliseconds where the logistic one iterates for a second on wide layers.
_RIDGE_ALPHAS = tuple(float(a) for a in np.logspace(-1, 5, 7))


def _ridge(seed: int):
    from sklearn.linear_model import RidgeClassifierCV

    return RidgeClassifierCV(alphas=_RIDGE_ALPHAS)


LOGISTIC = Classifier("logistic", "StandardScaler + LogisticRegression(C=1, lbfgs)", _logistic)
RIDGE = Classifier("ridge", "StandardScaler + RidgeClassifierCV(alphas 1e-1..1e5, leave-one-out in the training fold)",
                   _ridge)


def cross_validate(features: list[np.ndarray], labels: np.ndarray, folds: int, seed: int,
                   classifier: Classifier = LOGISTIC) -> np.ndarray:
    """``(layers, folds)`` test accuracy of ``classifier`` on each feature matrix, with the same
    stratified, shuffled folds (seeded) for every layer."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(features[0], labels))
    scores = np.zeros((len(features), folds))
    # One BLAS thread: the fits are small (a few hundred samples), and on a busy machine BLAS
    # threads spin against each other (measured under load: a 240x240 eigh 0.1 s on one thread, 1 s on two).
    with threadpool_limits(limits=1, user_api="blas"):
        for i, X in enumerate(features):
            X = np.nan_to_num(X)  # a dead random-init channel can be constant; never NaN, but be safe
            for k, (train, test) in enumerate(splits):
                clf = make_pipeline(StandardScaler(), classifier.make(seed))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    clf.fit(X[train], labels[train])
                scores[i, k] = clf.score(X[test], labels[test])
    return scores


def probe(
    model: LoadedModel | torch.nn.Module,
    dataset: ProbeDataset | str | Path | None = None,
    layers: str | list[str | LayerInfo] | None = None,
    *,
    folds: int = 5,
    seed: int = 0,
    size: int | tuple[int, int] | None = None,
    baseline: bool = True,
    batch_size: int = 16,
    progress: bool = False,
) -> ProbeResult:
    """Linear-probe accuracy of each layer's pooled features, pretrained versus random init.

    Args:
        model: a :class:`LoadedModel` or ``nn.Module``.
        dataset: a :class:`ProbeDataset`, a folder (one sub-folder per class), or None for
            the built-in :func:`lfw_faces`.
        layers: names, aliases or patterns (or :class:`LayerInfo` rows), resolved at the input
            size used; default 8 feature layers spread over the depth.
        folds: stratified folds (each class needs at least this many images).
        seed: fixes the fold split, the classifier and the random-init baseline.
        size: image size fed to the model, ``(H, W)`` or a side; default the model's input size.
        baseline: also probe the same architecture at random initialisation.

    Example:
        >>> res = probe(convscope.load_model(), layers="blocks.1.*.bn3,bn2", folds=5)
        >>> res.accuracy.shape
        (2, 5)
    """
    loaded = as_loaded(model)
    if dataset is None:
        dataset = lfw_faces()
    elif not isinstance(dataset, ProbeDataset):
        dataset = image_folder(dataset)
    check_dataset(dataset, folds)
    if batch_size < 1:
        raise ConvscopeError(f"batch size must be at least 1 (got {batch_size})")
    if isinstance(size, int):
        size = (size, size)
    size = tuple(size) if size is not None else tuple(loaded.preprocessing.input_size)
    if layers is None:
        chosen = spread(loaded.catalogue_at(size) if size is not None else loaded.catalogue)
    else:
        if not isinstance(layers, str):
            layers = [layer.name if isinstance(layer, LayerInfo) else layer for layer in layers]
        chosen = loaded.catalogue_at(size).resolve(layers)

    feats, shapes = pooled_features(loaded, dataset.images, chosen, size, batch_size, progress)
    accuracy = cross_validate(feats, dataset.labels, folds, seed)
    base_scores, base_title = None, None
    if baseline:
        random_model = random_init_like(loaded, seed)
        random_catalogue = random_model.catalogue_at(size)
        missing = [layer.name for layer in chosen if layer.name not in random_catalogue]
        if missing:
            raise ConvscopeError(f"the random-init copy lacks layers {missing}")
        random_layers = [random_catalogue.get(layer.name) for layer in chosen]
        base_feats, _ = pooled_features(random_model, dataset.images, random_layers, size, batch_size, progress)
        base_scores = cross_validate(base_feats, dataset.labels, folds, seed)
        base_title = random_model.title
    return ProbeResult(chosen, accuracy, base_scores, [f.shape[1] for f in feats], shapes, dataset.name,
                       dataset.counts, folds, seed, size, loaded.title, base_title)

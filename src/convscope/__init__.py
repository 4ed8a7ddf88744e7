"""convscope: open a convolutional network layer by layer and see what each layer and filter responds to.

Example:
    >>> import convscope
    >>> model = convscope.load_model()                      # EfficientNet-Lite0, ImageNet weights, offline
    >>> convscope.predict(model, "cat.jpg")[0]["name"]
    >>> res = convscope.activations(model, "cat.jpg")       # every conv layer after its activation
    >>> res.grid(res.layers[3])                             # a PIL image; shows inline in Jupyter
    >>> convscope.visualize_features(model, "blocks.3.1.bn1", range(8)).sheet()   # what 8 filters want to see
    >>> convscope.occlusion(model, "cat.jpg").sheet()       # occlusion maps (exact incremental inference)
    >>> print(convscope.probe(model).table())               # linear probes by depth, pretrained vs random
    >>> convscope.build_atlas(model, out="runs/atlas").index  # browsable pages (then: convscope serve runs/atlas)
"""

from ._version import __version__  # noqa: F401 - the package version
from .atlas import AtlasSettings, build_atlas
from .capture import capture, frozen, recording
from .datasets import FolderImages, SampleImages, TensorImages
from .errors import ConvscopeError
from .images import load_image, sample_photos
from .layers import Catalogue, LayerInfo, build_catalogue
from .methods.activations import ActivationResult, activations, predict
from .methods.deconv import (
    DeconvResult,
    Projections,
    Unit,
    deconv,
    project_units,
    render_projection_pair,
    strongest_units,
    top_positions,
)
from .methods.features import FeatureResult, visualize, visualize_classes, visualize_features
from .methods.occlusion import OcclusionResult, occlusion
from .methods.probe import ProbeDataset, ProbeResult, probe
from .methods.scan import ScanResult, TopK, scan
from .models import LoadedModel, Preprocessing, as_loaded, list_models, load_model
from .rectifiers import backward_rule
from .render import channel_grid, overlay_heatmap

__all__ = [
    "ActivationResult", "AtlasSettings", "Catalogue", "ConvscopeError", "DeconvResult", "FeatureResult", "FolderImages",
    "LayerInfo", "LoadedModel", "OcclusionResult", "Preprocessing", "ProbeDataset", "ProbeResult",
    "Projections", "SampleImages", "ScanResult", "TensorImages", "TopK", "Unit", "activations", "as_loaded",
    "backward_rule", "build_atlas", "build_catalogue", "capture", "channel_grid", "deconv", "frozen", "list_models",
    "load_image", "load_model", "occlusion", "overlay_heatmap", "predict", "probe", "project_units",
    "recording", "render_projection_pair", "sample_photos", "scan", "strongest_units", "top_positions",
    "visualize", "visualize_classes", "visualize_features",
]

"""convscope: open a convolutional network layer by layer and see what each layer and filter responds to.

Example:
    >>> import convscope
    >>> model = convscope.load_model()                      # EfficientNet-Lite0, ImageNet weights, offline
    >>> convscope.predict(model, "cat.jpg")[0]["name"]
    >>> res = convscope.activations(model, "cat.jpg")       # every conv layer after its activation
    >>> res.grid(res.layers[3])                             # a PIL image; shows inline in Jupyter
    >>> convscope.occlusion(model, "cat.jpg").sheet()       # occlusion maps (exact incremental inference)
    >>> print(convscope.probe(model).table())               # linear probes by depth, pretrained vs random
"""

from .activations import ActivationResult, activations, predict
from .capture import capture, frozen, recording
from .errors import ConvscopeError
from .images import load_image, sample_photos
from .layers import Catalogue, LayerInfo, build_catalogue
from .models import LoadedModel, Preprocessing, as_loaded, list_models, load_model
from .occlusion import OcclusionResult, occlusion
from .probe import ProbeDataset, ProbeResult, probe
from .render import channel_grid, overlay_heatmap

__all__ = [
    "ActivationResult", "Catalogue", "ConvscopeError", "LayerInfo", "LoadedModel", "Preprocessing",
    "activations", "as_loaded", "build_catalogue", "capture", "channel_grid", "frozen", "list_models",
    "load_image", "load_model", "overlay_heatmap", "predict", "recording", "sample_photos",
    "OcclusionResult", "ProbeDataset", "ProbeResult", "occlusion", "probe",
]

__version__ = "0.1.0"

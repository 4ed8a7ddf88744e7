"""convscope: open a convolutional network layer by layer and see what each layer and filter responds to.

Every method is one call that returns a Result: arrays and the values it was computed with, PIL
pictures (shown inline in Jupyter), ``.to_dict()`` and ``.save(folder)``.

Example:
    >>> import convscope
    >>> model = convscope.load_model()                      # EfficientNet-Lite0, ImageNet weights, offline
    >>> convscope.predict(model, "cat.jpg")[0]["name"]
    >>> res = convscope.activations(model, "cat.jpg")       # every conv layer after its activation
    >>> res.grid(res.layers[3])                             # a PIL image; shows inline in Jupyter
    >>> convscope.visualize_features(model, "blocks.3.1.bn1", range(8)).sheet()   # what 8 filters want to see
    >>> convscope.deconv(model, "cat.jpg", "blocks.3.0.bn3", method="guided").sheet()
    >>> convscope.scan(model, convscope.SampleImages(), "blocks.2.1.bn3").figure("blocks.2.1.bn3", 3)
    >>> convscope.occlusion(model, "cat.jpg").sheet()       # occlusion maps (exact incremental inference)
    >>> print(convscope.probe(model).table())               # linear probes by depth, pretrained vs random
    >>> convscope.profile_model(model).plot()               # depth profile: dead channels, probes, projection trust
    >>> convscope.build_atlas(model, out="runs/atlas").index  # browsable pages (then: convscope serve runs/atlas)

Building blocks stay in their modules: :mod:`convscope.rectifiers` (backward rules),
:mod:`convscope.methods.deconv` (``project_units``, ``strongest_units``), :mod:`convscope.methods.scan`
(``TopK``), :mod:`convscope.methods.features` (objectives, parameterizations), :mod:`convscope.render`.
"""

from ._version import __version__
from .atlas import AtlasSettings, build_atlas
from .datasets import FolderImages, SampleImages, TensorImages
from .errors import ConvscopeError
from .hooks import capture, frozen, recording
from .images import load_image, sample_photos
from .layers import Catalogue, LayerInfo
from .methods.activations import ActivationResult, activations, predict
from .methods.deconv import DeconvResult, deconv
from .methods.features import FeatureResult, visualize, visualize_classes, visualize_features
from .methods.occlusion import OcclusionResult, occlusion
from .methods.probe import ProbeDataset, ProbeResult, probe
from .methods.profile import ProfileResult, profile_model
from .methods.scan import ScanResult, scan
from .models import LoadedModel, Preprocessing, as_loaded
from .sources import list_models, load_model

__all__ = [
    # models and layers
    "load_model", "as_loaded", "list_models", "LoadedModel", "Preprocessing", "Catalogue", "LayerInfo",
    # one call and one Result per method
    "predict", "activations", "ActivationResult",
    "visualize_features", "visualize_classes", "visualize", "FeatureResult",
    "deconv", "DeconvResult",
    "scan", "ScanResult", "FolderImages", "SampleImages", "TensorImages",
    "occlusion", "OcclusionResult",
    "probe", "ProbeResult", "ProbeDataset",
    "profile_model", "ProfileResult",
    "build_atlas", "AtlasSettings",
    # capture tools (hooks in context managers) and inputs
    "frozen", "recording", "capture", "load_image", "sample_photos",
    "ConvscopeError", "__version__",
]

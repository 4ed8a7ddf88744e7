"""The producers of the atlas, in the order a build runs them.

Before them the photos record (:func:`~convscope.atlas.stages.photos.build_photos`): the photos
as the model sees them, the top-5 predictions and the shallow-to-deep evolution strip of each.
Then, each writing files plus one record per layer:

* **activations**: each photo's channel grid and strongest-channel overlay, each visualised
  channel's heat map over each photo (one scale per channel, shared by the photos), and every
  channel's peak per photo (``silent`` = never above zero);
* **features**: the feature visualization of each visualised channel with its objective and
  ``dead`` flag;
* **scan**: the top-k images of each channel over a data set;
* **deconv**: projections beside their patches for the top-k units of each channel: the
  scan's, or the strongest unit on each photo when no scan was built.

After them, :func:`convscope.atlas.pages.render_site` writes the pages from the records alone.
"""

from __future__ import annotations

from ..context import Stage
from .activations import ActivationsStage
from .deconv import DeconvStage
from .features import FeaturesStage
from .photos import build_photos
from .scan import ScanStage

__all__ = ["STAGES", "STAGE_NAMES", "ActivationsStage", "DeconvStage", "FeaturesStage", "ScanStage",
           "build_photos"]

STAGES: tuple[Stage, ...] = (ActivationsStage(), FeaturesStage(), ScanStage(), DeconvStage())
STAGE_NAMES = tuple(stage.name for stage in STAGES)

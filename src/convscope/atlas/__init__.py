"""The atlas: a browsable, static HTML microscope of a model, built from cached stages.

Example:
    >>> import convscope
    >>> from convscope.atlas import AtlasSettings, build_atlas
    >>> build = build_atlas(convscope.load_model(), out="runs/atlas",
    ...                     settings=AtlasSettings(channels_per_layer=8, steps=128))
    >>> build.index                      # open it, or: convscope serve runs/atlas
"""

from .context import AtlasBuild, AtlasSettings, Stage
from .driver import build_atlas
from .pages import render_site
from .stages import STAGE_NAMES, STAGES

__all__ = ["AtlasBuild", "AtlasSettings", "STAGES", "STAGE_NAMES", "Stage", "build_atlas", "render_site"]

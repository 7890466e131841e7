"""AttnSeg networks behind one registry.

>>> from AttnSegLib import models
>>> models.names()
>>> net = models.build("rsanet", in_channels=4, num_classes=3, placement="101")
"""
from . import unet  # noqa: F401  (each import registers its architecture)
from . import difficulty_aware  # noqa: F401
from . import mda_unet  # noqa: F401
from . import dam_al  # noqa: F401
from . import cga_unet  # noqa: F401
from . import rsanet  # noqa: F401
from . import click_refiner  # noqa: F401
from .base import SegmentationNetwork, SegOutput
from .registry import UnknownArchitectureError, build, names, register_model, resolved_kwargs

__all__ = ["SegOutput", "SegmentationNetwork", "UnknownArchitectureError", "build", "names",
           "register_model", "resolved_kwargs"]

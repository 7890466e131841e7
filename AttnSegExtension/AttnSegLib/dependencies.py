"""What AttnSeg needs at run time beyond the Python that 3D Slicer ships, and which of it is missing.

Import-light on purpose (standard library only): the Slicer module checks this before it imports the
engine, which needs torch. In Slicer, torch is installed by the PyTorch extension (``PyTorchUtils``
picks the wheel that fits the GPU and driver); everything else with ``slicer.util.pip_install``.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class Requirement:
    module: str  # import name
    spec: str  # pip requirement


TORCH = Requirement("torch", "torch>=2.2")
PIP_REQUIREMENTS = (
    Requirement("monai", "monai>=1.4"),
    Requirement("safetensors", "safetensors>=0.4"),
    Requirement("SimpleITK", "SimpleITK>=2.3"),
    Requirement("scipy", "scipy>=1.10"),
)


def missing_requirements() -> list[Requirement]:
    """The requirements whose module cannot be imported, torch first when it is among them.

    Packages pip (a separate process) installed since the last look count: the import system's cached
    folder listings are dropped first (Slicer 5.6's ``slicer.util.pip_install`` does not drop them).
    """
    importlib.invalidate_caches()
    return [r for r in (TORCH, *PIP_REQUIREMENTS) if importlib.util.find_spec(r.module) is None]

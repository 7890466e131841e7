"""Model registry (timm style): architectures are registered by name and built with keyword args.

The same kwargs are stored in a model package's card, so a package rebuilds its network exactly.
"""
from __future__ import annotations

import inspect
from typing import Callable

from .base import SegmentationNetwork

_REGISTRY: dict[str, Callable[..., SegmentationNetwork]] = {}
_TASKS: dict[str, str] = {}  # architecture name -> "segmentation" or "refinement"


class UnknownArchitectureError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def register_model(name: str, task: str = "segmentation"):
    """Class decorator: ``@register_model("unet")``; ``task="refinement"`` for a network that corrects a
    segmentation from clicks (its input adds class and click channels, so it is no segmenter)."""

    def wrap(cls):
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} is registered twice")
        _REGISTRY[name] = cls
        _TASKS[name] = task
        cls.architecture_name = name
        return cls

    return wrap


def names(task: str | None = "segmentation") -> list[str]:
    """The registered architecture names of ``task`` (None: every task), sorted."""
    return sorted(name for name in _REGISTRY if task is None or _TASKS[name] == task)


def build(name: str, in_channels: int, num_classes: int, **kwargs) -> SegmentationNetwork:
    """Build architecture ``name`` for ``in_channels`` modalities and ``num_classes`` classes
    (background included)."""
    if name not in _REGISTRY:
        raise UnknownArchitectureError(
            f"unknown architecture {name!r}; known architectures: {', '.join(names(None))}"
        )
    if in_channels < 1 or num_classes < 2:
        raise ValueError(
            f"need at least 1 input channel and 2 classes, got in_channels={in_channels}, "
            f"num_classes={num_classes}"
        )
    return _REGISTRY[name](in_channels=in_channels, num_classes=num_classes, **kwargs)


def resolved_kwargs(name: str, **kwargs) -> dict:
    """Every constructor argument of architecture ``name`` besides ``in_channels`` and ``num_classes``,
    ``kwargs`` completed with the signature's defaults: two kwargs dicts build the same network exactly
    when their resolved kwargs are equal. Unknown names raise ``TypeError`` (the message names them)."""
    if name not in _REGISTRY:
        raise UnknownArchitectureError(f"unknown architecture {name!r}; known architectures: {', '.join(names(None))}")
    signature = inspect.signature(_REGISTRY[name])
    accepted = [p for p in signature.parameters if p not in ("in_channels", "num_classes")]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(f"{name} takes no argument(s) {', '.join(unknown)}; it takes: {', '.join(accepted)}")
    bound = signature.bind_partial(**kwargs)
    bound.apply_defaults()
    return {k: v for k, v in bound.arguments.items() if k in accepted}

"""The clicks of one result and their undo: the bookkeeping the Slicer panel and the web Refine step share.

A :class:`ClickHistory` holds the clicks applied to one result (those recorded before the session
first, then each new one) and, for the newest ``undo_steps`` of them, what the click replaced. The
arrays are the caller's (a front end's copy of the scene, kept between clicks) and are refined in
place: ``probabilities`` (C, D, H, W) float32, ``labels`` (D, H, W) uint8, ``uncertainty`` (D, H, W)
float32. A click can only change the box of :class:`~AttnSegLib.refine.Neighbourhood` around it, so an
undo step keeps that box only (about 26 bytes a voxel with 5 classes: 0.8 MB at 1 mm).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from .image import Geometry
from .refine import Click, ClickError, Neighbourhood, Refined, Refiner, click_voxel

UNDO_STEPS = 20  # clicks undo can take back, newest first


@dataclass
class UndoStep:
    """What one click replaced inside ``box`` (array slices, (D, H, W)): ``changed`` (d, h, w) bool, the
    voxels whose labels or maps it changed, and the ``labels``, ``probabilities`` (C, d, h, w) and
    ``uncertainty`` there before it. ``tag``: the front end's own note (e.g. the point that made it)."""

    click: Click
    box: tuple[slice, slice, slice]
    changed: np.ndarray
    labels: np.ndarray
    probabilities: np.ndarray
    uncertainty: np.ndarray
    tag: object = None

    def mask(self, shape) -> np.ndarray:
        """(D, H, W) bool of ``shape``: the voxels this click changed."""
        mask = np.zeros(shape, dtype=bool)
        mask[self.box] = self.changed
        return mask


class ClickHistory:
    """The clicks of one result, in order, with the undo steps of the newest ``undo_steps``.

    ``clicks``: those applied before (e.g. read back from the segmentation); they are the history every
    new click sees, and cannot be undone here.
    """

    def __init__(self, clicks: list[Click] = (), undo_steps: int = UNDO_STEPS):
        self.clicks: list[Click] = list(clicks)
        self._steps: deque[UndoStep] = deque(maxlen=undo_steps)

    @property
    def undo_steps(self) -> int:
        """How many clicks :meth:`undo` can take back."""
        return len(self._steps)

    def apply(self, refiner: Refiner, images: np.ndarray, probabilities: np.ndarray, labels: np.ndarray,
              uncertainty: np.ndarray, geometry: Geometry, click: Click, parts: np.ndarray | None = None,
              tag: object = None) -> tuple[Refined, UndoStep]:
        """Refine the arrays in place with ``click`` (seeing every earlier click), record it and keep its
        undo step. ``images`` (M, D, H, W); ``parts``: see :meth:`~AttnSegLib.refine.Refiner.refine`. A
        click outside the image raises :class:`~AttnSegLib.refine.ClickError` before anything changes."""
        voxel = click_voxel(click, geometry)
        box = Neighbourhood.around(voxel, np.asarray(geometry.spacing, dtype=float)[::-1], labels.shape).box
        before = labels[box].copy(), probabilities[(slice(None), *box)].copy(), uncertainty[box].copy()
        refined = refiner.refine(images, probabilities, geometry, [click], self.clicks, uncertainty, labels, parts,
                                 in_place=True)
        changed = refined.changed[box] | (refined.labels[box] != before[0])
        step = UndoStep(click, box, changed, *before, tag)
        self.clicks.append(click)
        self._steps.append(step)
        return refined, step

    def undo(self, probabilities: np.ndarray, labels: np.ndarray, uncertainty: np.ndarray) -> UndoStep:
        """Put back, in place, what the newest click changed (voxels it did not change keep what they hold
        now, e.g. the user's paint) and forget that click; returns its step. :class:`ClickError` when
        there is nothing to undo."""
        if not self._steps:
            raise ClickError("no click to undo")
        step = self._steps.pop()
        box, changed = step.box, step.changed
        labels[box] = np.where(changed, step.labels, labels[box])
        probabilities[(slice(None), *box)] = np.where(changed, step.probabilities, probabilities[(slice(None), *box)])
        uncertainty[box] = np.where(changed, step.uncertainty, uncertainty[box])
        self.clicks.pop()
        return step

"""Click refinement of an AttnSeg segmentation in the MRML scene (Slicer, trame-slicer, slicer-core).

:func:`refineSegmentation` reads what :class:`~AttnSegLib.slicer_logic.SceneLogic` put in the scene
(the input volumes, the ``probability.<class>`` and ``uncertainty`` map nodes, the segments as the user
left them), applies clicks with :class:`~AttnSegLib.refine.Refiner`, writes the refined labels, class
probabilities and uncertainty back into the same nodes, and appends the clicks to the segmentation's
``AttnSeg.Clicks`` attribute (a JSON list of ``{"position_lps": [x, y, z], "class": name}``, the form
``attnseg refine`` records), which ``exportCorrection`` saves in ``case.json``. Earlier clicks in that
attribute are the history each new click sees. The front ends (markups placement in the Slicer panel,
a refine mode in the web app) only turn a placed point into a :class:`~AttnSegLib.refine.Click`.
"""
from __future__ import annotations

import json

import numpy as np
import slicer
from vtkmodules.util import numpy_support
from vtkmodules.vtkCommonCore import reference as vtkReference

from .image import Image
from .maps import volume_name
from .mrml import imageFromVolumeNode, orientedMask
from .package import PackageError, load_package
from .refine import Click, ClickError, Refined, Refiner, class_index, class_parts, find_refinement_package
from .slicer_logic import ATTRIBUTE, CLASS_VALUE_TAG

CLICKS_ATTRIBUTE = ATTRIBUTE + "Clicks"


def recordedClicks(segmentationNode) -> list[Click]:
    """The clicks already applied to ``segmentationNode`` (its ``AttnSeg.Clicks`` attribute)."""
    names = [c["name"] for c in json.loads(segmentationNode.GetAttribute(ATTRIBUTE + "Classes"))]
    return [Click(tuple(float(v) for v in c["position_lps"]), class_index(c["class"], names))
            for c in json.loads(segmentationNode.GetAttribute(CLICKS_ATTRIBUTE) or "[]")]


def refinerFor(segmentationNode, method: str | None = None) -> Refiner:
    """The learned refiner when a refinement package matches the segmentation's model (and ``method``
    is None or ``learned``); else the random walker (or the named ``method``)."""
    refinement = None
    if method in (None, "learned"):
        try:
            refinement = find_refinement_package(load_package(segmentationNode.GetAttribute(ATTRIBUTE + "Model")).card)
        except PackageError:
            refinement = None
    if method is None:
        method = "learned" if refinement is not None else "random_walker"
    return Refiner(method, refinement)


def refineSegmentation(logic, segmentationNode, clicks: list[Click], refiner: Refiner | None = None) -> Refined:
    """Apply ``clicks`` to ``segmentationNode`` (an AttnSeg segmentation of ``logic``'s scene) in place.

    Starts from the segments as they are now (the user's own edits included) and the probability and
    uncertainty maps; a click outside the image raises :class:`~AttnSegLib.refine.ClickError` and changes
    nothing. Returns the :class:`~AttnSegLib.refine.Refined` (its ``changed`` mask says what moved).
    """
    classes = json.loads(segmentationNode.GetAttribute(ATTRIBUTE + "Classes"))
    maps = logic.mapNodes(segmentationNode)
    probabilityNodes = [maps.get(f"probability.{volume_name(c['name'])}") for c in classes[1:]]
    if any(n is None for n in probabilityNodes):
        raise ClickError("a probability map of this segmentation was deleted; segment again to refine it")
    labels = logic.correctedLabels(segmentationNode)
    foreground = [imageFromVolumeNode(n).array.astype(np.float32) for n in probabilityNodes]
    background = np.clip(1.0 - np.sum(foreground, axis=0), 0.0, 1.0)
    probabilities = np.stack([background, *foreground])
    images = [imageFromVolumeNode(n) for n in logic.inputNodes(segmentationNode)]
    if any(img.array.shape != labels.array.shape for img in images):
        raise ClickError("the input volumes are not on the segmentation's grid (a region was segmented); "
                         "segment the whole volume to refine with clicks")
    uncertaintyNode = maps.get("uncertainty")
    uncertainty = None if uncertaintyNode is None else imageFromVolumeNode(uncertaintyNode).array
    refiner = refiner or refinerFor(segmentationNode)
    parts = None
    if refiner.learned is not None:
        try:
            parts = class_parts(classes, refiner.learned.class_names)
        except ClickError:  # classes the network was not trained on: the non-learned update serves them
            refiner = Refiner("random_walker")
    history = recordedClicks(segmentationNode)
    refined = refiner.refine(np.stack([img.array.astype(np.float32) for img in images]), probabilities,
                             labels.geometry, clicks, history, uncertainty, labels.array, parts)
    _writeLabels(segmentationNode, labels.with_array(refined.labels), refined.changed)
    for node, channel in zip(probabilityNodes, refined.probabilities[1:]):
        _writeVolume(node, channel)
    if uncertaintyNode is not None:
        _writeVolume(uncertaintyNode, refined.uncertainty)
    names = [c["name"] for c in classes]
    record = json.loads(segmentationNode.GetAttribute(CLICKS_ATTRIBUTE) or "[]")
    record += [{"position_lps": list(c.position_lps), "class": names[c.label]} for c in clicks]
    segmentationNode.SetAttribute(CLICKS_ATTRIBUTE, json.dumps(record))
    return refined


def _writeVolume(node, array: np.ndarray) -> None:
    """Replace the voxels of a scalar volume node (same shape) with ``array`` (float32)."""
    values = np.ascontiguousarray(array, dtype=np.float32).ravel()
    node.GetImageData().GetPointData().SetScalars(numpy_support.numpy_to_vtk(values, deep=True))
    node.GetImageData().Modified()
    node.Modified()


def _writeLabels(segmentationNode, labels: Image, changed: np.ndarray) -> None:
    """Each class segment replaced by its voxels of ``labels`` when anything ``changed``."""
    if not changed.any():
        return
    classes = {c["name"].lower(): int(c["value"]) for c in json.loads(segmentationNode.GetAttribute(ATTRIBUTE + "Classes"))}
    segmentation = segmentationNode.GetSegmentation()
    tagged = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segmentId = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segmentId)
        tag = vtkReference("")
        value = int(str(tag)) if segment.GetTag(CLASS_VALUE_TAG, tag) else classes.get(segment.GetName().lower())
        if value:
            tagged[value] = segmentId
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    for value, segmentId in tagged.items():  # whole masks: a partial extent loses a shared layer's other labels
        logic.SetBinaryLabelmapToSegment(orientedMask(labels.geometry, labels.array == value), segmentationNode,
                                         segmentId, logic.MODE_REPLACE)

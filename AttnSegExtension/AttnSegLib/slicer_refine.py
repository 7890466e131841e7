"""Click refinement of an AttnSeg segmentation in the MRML scene (Slicer, trame-slicer, slicer-core).

:func:`refineSegmentation` reads what :class:`~AttnSegLib.slicer_logic.SceneLogic` put in the scene
(the input volumes, the ``probability.<class>`` and ``uncertainty`` map nodes, the segments as the user
left them), applies clicks with :class:`~AttnSegLib.refine.Refiner`, writes the refined labels, class
probabilities and uncertainty back into the same nodes, and appends the clicks to the segmentation's
``AttnSeg.Clicks`` attribute (a JSON list of ``{"position_lps": [x, y, z], "class": name}``, the form
``attnseg refine`` records), which ``exportCorrection`` saves in ``case.json``. Earlier clicks in that
attribute are the history each new click sees. The front ends (markups placement in the Slicer panel,
a refine mode in the web app) only turn a placed point into a :class:`~AttnSegLib.refine.Click`.

:class:`ClickRefinement` is the Slicer panel's refinement of one segmentation, without GUI: per class one
markups point list for adding and one for removing (made on demand, named and coloured by the class,
referenced by the segmentation), placement into them through the scene's selection and interaction nodes
(as the Markups module's place widget does), each newly placed point refined at once (the lists are
observed), and a bounded undo stack. Reading and writing the nodes adds 0.016 s of CPU per point to the
engine's update (median of 20 on the shipped hippocampus crop, one thread), so a point is refined on the
scene's thread, not in the worker process.
"""
from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import slicer
from vtkmodules.util import numpy_support
from vtkmodules.vtkCommonCore import reference as vtkReference

from .errors import AttnSegError
from .image import Image
from .maps import volume_name
from .mrml import classColor, imageFromVolumeNode, orientedMask
from .package import PackageError, load_package
from .refine import Click, ClickError, Refined, Refiner, class_index, class_parts, find_refinement_package
from .slicer_logic import ATTRIBUTE, CLASS_VALUE_TAG, REF_SEGMENTATION

CLICKS_ATTRIBUTE = ATTRIBUTE + "Clicks"
REF_POINT_LIST = "AttnSegClickPoints"       # segmentation -> its click point lists
POINT_CLASS_ATTRIBUTE = ATTRIBUTE + "ClickClass"    # a point list's class name
POINT_ACTION_ATTRIBUTE = ATTRIBUTE + "ClickAction"  # a point list's action: ADD or REMOVE
ADD, REMOVE = "add", "remove"
ACTIONS = (ADD, REMOVE)
GLYPHS = {ADD: "ThickCross2D", REMOVE: "Dash2D"}  # "+" and "-" in the views, in the class's colour
UNDO_STEPS = 20  # clicks Undo can take back, newest first


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
    return _refine(logic, segmentationNode, clicks, refiner)[0]


@dataclass
class _Before:
    """What a refinement read before it wrote: the labels, the (C, D, H, W) probabilities (background
    first), the uncertainty (None without its node) and the clicks attribute."""

    labels: np.ndarray
    probabilities: np.ndarray
    uncertainty: np.ndarray | None
    clicks: str | None


@dataclass
class RefinementInputs:
    """What a refinement reads from the scene: ``classes`` (the result's class list), ``images``
    (M, D, H, W) float32, ``labels`` (an Image of (D, H, W) class values as the segments are now),
    ``probabilities`` (C, D, H, W) float32 (background = 1 - the classes' maps), and the nodes they are
    written back to: ``probabilityNodes`` (one per foreground class), ``uncertaintyNode`` (None when
    its map was deleted)."""

    classes: list[dict]
    images: np.ndarray
    labels: Image
    probabilities: np.ndarray
    probabilityNodes: list
    uncertaintyNode: object


def readRefinementInputs(logic, segmentationNode) -> RefinementInputs:
    """Copy a refinement's inputs out of the scene; a deleted probability map or inputs off the
    segmentation's grid raise :class:`~AttnSegLib.refine.ClickError` (one line, with the fix)."""
    classes = json.loads(segmentationNode.GetAttribute(ATTRIBUTE + "Classes"))
    probabilityNodes = _probabilityNodes(logic, segmentationNode)
    labels = logic.correctedLabels(segmentationNode)
    images = [imageFromVolumeNode(n) for n in logic.inputNodes(segmentationNode)]
    if any(img.array.shape != labels.array.shape for img in images):
        raise ClickError("the input volumes are not on the segmentation's grid (a region was segmented); "
                         "segment the whole volume to refine with clicks")
    foreground = [imageFromVolumeNode(n).array.astype(np.float32) for n in probabilityNodes]
    background = np.clip(1.0 - np.sum(foreground, axis=0), 0.0, 1.0)
    return RefinementInputs(classes, np.stack([img.array.astype(np.float32, copy=False) for img in images]),
                            labels, np.stack([background, *foreground]), probabilityNodes,
                            logic.mapNodes(segmentationNode).get("uncertainty"))


def _refine(logic, segmentationNode, clicks: list[Click], refiner: Refiner | None) -> tuple[Refined, _Before]:
    """:func:`refineSegmentation`, also returning what the nodes held before."""
    inputs = readRefinementInputs(logic, segmentationNode)
    classes, labels, probabilities = inputs.classes, inputs.labels, inputs.probabilities
    probabilityNodes, uncertaintyNode = inputs.probabilityNodes, inputs.uncertaintyNode
    uncertainty = None if uncertaintyNode is None else imageFromVolumeNode(uncertaintyNode).array
    refiner = refiner or refinerFor(segmentationNode)
    parts = None
    if refiner.learned is not None:
        try:
            parts = class_parts(classes, refiner.learned.class_names)
        except ClickError:  # classes the network was not trained on: the non-learned update serves them
            refiner = Refiner("random_walker")
    history = recordedClicks(segmentationNode)
    refined = refiner.refine(inputs.images, probabilities,
                             labels.geometry, clicks, history, uncertainty, labels.array, parts)
    writeLabels(segmentationNode, labels.with_array(refined.labels), refined.changed)
    for node, channel in zip(probabilityNodes, refined.probabilities[1:]):
        _writeVolume(node, channel)
    if uncertaintyNode is not None:
        _writeVolume(uncertaintyNode, refined.uncertainty)
    names = [c["name"] for c in classes]
    recorded = segmentationNode.GetAttribute(CLICKS_ATTRIBUTE)
    record = json.loads(recorded or "[]")
    record += [{"position_lps": list(c.position_lps), "class": names[c.label]} for c in clicks]
    segmentationNode.SetAttribute(CLICKS_ATTRIBUTE, json.dumps(record))
    return refined, _Before(labels.array, probabilities, uncertainty, recorded)


def _writeVolume(node, array: np.ndarray) -> None:
    """Replace the voxels of a scalar volume node (same shape) with ``array`` (float32)."""
    values = np.ascontiguousarray(array, dtype=np.float32).ravel()
    node.GetImageData().GetPointData().SetScalars(numpy_support.numpy_to_vtk(values, deep=True))
    node.GetImageData().Modified()
    node.Modified()


def _probabilityNodes(logic, segmentationNode) -> list:
    """The ``probability.<class>`` map nodes of a segmentation, one per foreground class."""
    classes = json.loads(segmentationNode.GetAttribute(ATTRIBUTE + "Classes"))
    maps = logic.mapNodes(segmentationNode)
    nodes = [maps.get(f"probability.{volume_name(c['name'])}") for c in classes[1:]]
    if any(n is None for n in nodes):
        raise ClickError("a probability map of this segmentation was deleted; segment again to refine it")
    return nodes


def pasteVolume(node, box: tuple[slice, slice, slice], values: np.ndarray) -> None:
    """Write ``values`` into the ``box`` (array slices, (D, H, W) order) of a scalar volume node."""
    imageData = node.GetImageData()
    scalars = imageData.GetPointData().GetScalars()
    numpy_support.vtk_to_numpy(scalars).reshape(tuple(reversed(imageData.GetDimensions())))[box] = values
    scalars.Modified()
    imageData.Modified()
    node.Modified()


def writeLabels(segmentationNode, labels: Image, changed: np.ndarray) -> None:
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


# -- the Slicer panel's click refinement -----------------------------------------------------------
@dataclass(frozen=True)
class ClickReport:
    """What one placed point did: its class name and action (:data:`ADD` or :data:`REMOVE`), position
    (mm, LPS), the voxels whose label or maps changed, the seconds from placement to updated nodes, and
    ``error`` (the one-line reason) when it was refused and removed."""

    className: str
    action: str
    positionLPS: tuple[float, float, float]
    changedVoxels: int = 0
    seconds: float = 0.0
    error: str | None = None


@dataclass
class _Step:
    """One click as Undo takes it back: the segmentation's labels, probabilities (foreground classes)
    and uncertainty over ``box`` (array slices) and its clicks attribute before the click, and the point."""

    box: tuple[slice, slice, slice]
    labels: np.ndarray
    probabilities: np.ndarray
    uncertainty: np.ndarray | None
    clicks: str | None
    listID: str
    pointID: str


class ClickRefinement:
    """Click refinement of one AttnSeg segmentation through markups point lists, without GUI.

    :meth:`pointList` makes (on first use) or finds the list of a class and action; :meth:`startPlacing`
    puts the views in persistent place mode into it. Every point placed in one of the lists (its position
    defined, as Slicer's placement and ``AddControlPointWorld`` do) is refined at once: an ``add`` point
    is a click of its class, a ``remove`` point a ``background`` click. The point is then locked (moving
    it would no longer match what it did); a point the refinement refuses (outside the image) is removed.
    Each refinement is reported to ``onReport`` (a callable taking a :class:`ClickReport`) and kept for
    :meth:`undo`, at most ``undoSteps`` of them.
    """

    def __init__(self, logic, segmentationNode, refiner: Refiner | None = None, undoSteps: int = UNDO_STEPS):
        self.logic = logic
        self.segmentationNode = segmentationNode
        self.onReport = None
        self.lastReport: ClickReport | None = None
        self._refiner = refiner
        self._steps: deque[_Step] = deque(maxlen=undoSteps)
        self._observations: dict[str, tuple[object, int]] = {}
        for listNode in self.pointLists():
            self._observe(listNode)

    # -- the point lists ----------------------------------------------------------------------
    @property
    def classNames(self) -> list[str]:
        """The segmentation's class names, background excluded: what a point list can be for."""
        return [c["name"] for c in self._classes()[1:]]

    def _classes(self) -> list[dict]:
        return json.loads(self.segmentationNode.GetAttribute(ATTRIBUTE + "Classes"))

    def pointLists(self) -> list:
        """The segmentation's click point lists (every class and action made so far)."""
        node = self.segmentationNode
        return [n for n in (node.GetNthNodeReference(REF_POINT_LIST, i)
                            for i in range(node.GetNumberOfNodeReferences(REF_POINT_LIST))) if n is not None]

    def pointList(self, className: str, action: str = ADD):
        """The markups point list of ``className`` for ``action`` (:data:`ADD` or :data:`REMOVE`), made
        when missing: named "<class> <action>", drawn in the class's colour with a "+" or "-" glyph, and
        tied to the segmentation by node references both ways."""
        if action not in ACTIONS:
            raise ValueError(f"unknown click action {action!r}; choose one of {', '.join(ACTIONS)}")
        classes = self._classes()
        cls = classes[class_index(className, [c["name"] for c in classes])]
        if cls["value"] == 0:
            raise ClickError("background has no point list: place a remove point of the class to clear instead")
        for listNode in self.pointLists():
            if (listNode.GetAttribute(POINT_CLASS_ATTRIBUTE) == cls["name"]
                    and listNode.GetAttribute(POINT_ACTION_ATTRIBUTE) == action):
                return listNode
        scene = self.segmentationNode.GetScene()
        listNode = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode",
                                           scene.GenerateUniqueName(f"{cls['name']} {action}"))
        listNode.SetAttribute(POINT_CLASS_ATTRIBUTE, cls["name"])
        listNode.SetAttribute(POINT_ACTION_ATTRIBUTE, action)
        listNode.SetControlPointLabelFormat("+%d" if action == ADD else "-%d")
        listNode.CreateDefaultDisplayNodes()
        display = listNode.GetDisplayNode()
        color = classColor(cls)
        display.SetColor(*color)
        display.SetSelectedColor(*color)
        display.SetGlyphTypeFromString(GLYPHS[action])
        listNode.SetNodeReferenceID(REF_SEGMENTATION, self.segmentationNode.GetID())
        self.segmentationNode.AddNodeReferenceID(REF_POINT_LIST, listNode.GetID())
        self._observe(listNode)
        return listNode

    def _observe(self, listNode) -> None:
        if listNode.GetID() not in self._observations:
            tag = listNode.AddObserver(slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self._onPointDefined)
            self._observations[listNode.GetID()] = (listNode, tag)

    def close(self) -> None:
        """Stop observing the point lists (their points then no longer refine)."""
        for listNode, tag in self._observations.values():
            listNode.RemoveObserver(tag)
        self._observations.clear()

    # -- placing ------------------------------------------------------------------------------
    @property
    def interactionNode(self):
        """The scene's interaction node (its mode says whether the views place points)."""
        return self.segmentationNode.GetScene().GetNodeByID("vtkMRMLInteractionNodeSingleton")

    def _selectionNode(self):
        return self.segmentationNode.GetScene().GetNodeByID("vtkMRMLSelectionNodeSingleton")

    def startPlacing(self, className: str, action: str = ADD):
        """Put the views in persistent place mode into the point list of ``className`` and ``action``
        (as the Markups module's place widget does); returns the list."""
        listNode = self.pointList(className, action)
        selection, interaction = self._selectionNode(), self.interactionNode
        if selection is None or interaction is None:
            raise ClickError("this scene has no selection or interaction node to place points with")
        selection.SetReferenceActivePlaceNodeClassName(listNode.GetClassName())
        selection.SetReferenceActivePlaceNodeID(listNode.GetID())
        interaction.SetPlaceModePersistence(1)
        interaction.SetCurrentInteractionMode(slicer.vtkMRMLInteractionNode.Place)
        return listNode

    def stopPlacing(self) -> None:
        """Back to moving the views, when points are being placed into one of the lists."""
        if self.placing() is not None:
            self.interactionNode.SwitchToViewTransformMode()

    def placing(self) -> tuple[str, str] | None:
        """(class name, action) of the list points are being placed into, or None."""
        selection, interaction = self._selectionNode(), self.interactionNode
        if (selection is None or interaction is None
                or interaction.GetCurrentInteractionMode() != slicer.vtkMRMLInteractionNode.Place):
            return None
        for listNode in self.pointLists():
            if listNode.GetID() == selection.GetActivePlaceNodeID():
                return listNode.GetAttribute(POINT_CLASS_ATTRIBUTE), listNode.GetAttribute(POINT_ACTION_ATTRIBUTE)
        return None

    # -- refining -----------------------------------------------------------------------------
    def refiner(self) -> Refiner:
        """The update the clicks use (see :func:`refinerFor`), loaded on the first click."""
        if self._refiner is None:
            self._refiner = refinerFor(self.segmentationNode)
        return self._refiner

    def _onPointDefined(self, listNode, event) -> None:
        """The points of ``listNode`` defined and not yet used (unlocked) are refined, in their order."""
        new = [listNode.GetNthControlPointID(i) for i in range(listNode.GetNumberOfControlPoints())
               if listNode.GetNthControlPointPositionStatus(i) == slicer.vtkMRMLMarkupsNode.PositionDefined
               and not listNode.GetNthControlPointLocked(i)]
        for pointID in new:  # by ID: a refused point is removed, which moves the indices after it
            self._apply(listNode, pointID)

    def _apply(self, listNode, pointID: str) -> None:
        """Refine with the point ``pointID`` of ``listNode``, lock it and keep the undo step."""
        start = time.perf_counter()
        className = listNode.GetAttribute(POINT_CLASS_ATTRIBUTE)
        action = listNode.GetAttribute(POINT_ACTION_ATTRIBUTE)
        index = listNode.GetNthControlPointIndexByID(pointID)
        ras = [0.0, 0.0, 0.0]
        listNode.GetNthControlPointPositionWorld(index, ras)
        lps = (-ras[0], -ras[1], ras[2])
        label = 0 if action == REMOVE else class_index(className, [c["name"] for c in self._classes()])
        listNode.SetNthControlPointLocked(index, True)
        try:
            refined, before = _refine(self.logic, self.segmentationNode, [Click(lps, label)], self.refiner())
        except (AttnSegError, ValueError) as error:  # outside the image, a map deleted: the point goes
            listNode.RemoveNthControlPoint(listNode.GetNthControlPointIndexByID(pointID))
            self._report(ClickReport(className, action, lps, error=str(error)))
            return
        moved = refined.changed | (refined.labels != before.labels)
        box = _boundingBox(moved)
        self._steps.append(_Step(box, before.labels[box].copy(), before.probabilities[(slice(1, None),) + box].copy(),
                                 None if before.uncertainty is None else before.uncertainty[box].copy(),
                                 before.clicks, listNode.GetID(), pointID))
        self._report(ClickReport(className, action, lps, int(moved.sum()), time.perf_counter() - start))

    def _report(self, report: ClickReport) -> None:
        self.lastReport = report
        if self.onReport is not None:
            self.onReport(report)

    # -- undo ---------------------------------------------------------------------------------
    @property
    def undoSteps(self) -> int:
        """How many clicks :meth:`undo` can take back."""
        return len(self._steps)

    def undo(self) -> bool:
        """Take back the newest click: the labels, probabilities, uncertainty and clicks attribute as they
        were before it (voxel for voxel; edits elsewhere stay), and its point removed. False when there
        is nothing to undo."""
        if not self._steps:
            return False
        step = self._steps.pop()
        node = self.segmentationNode
        labels = self.logic.correctedLabels(node)
        restored = labels.array.copy()
        restored[step.box] = step.labels
        writeLabels(node, labels.with_array(restored), restored != labels.array)
        for probabilityNode, values in zip(_probabilityNodes(self.logic, node), step.probabilities):
            pasteVolume(probabilityNode, step.box, values)
        uncertaintyNode = self.logic.mapNodes(node).get("uncertainty")
        if uncertaintyNode is not None and step.uncertainty is not None:
            pasteVolume(uncertaintyNode, step.box, step.uncertainty)
        if step.clicks is None:
            node.RemoveAttribute(CLICKS_ATTRIBUTE)
        else:
            node.SetAttribute(CLICKS_ATTRIBUTE, step.clicks)
        listNode = node.GetScene().GetNodeByID(step.listID)
        if listNode is not None and listNode.GetNthControlPointIndexByID(step.pointID) >= 0:
            listNode.RemoveNthControlPoint(listNode.GetNthControlPointIndexByID(step.pointID))
        return True


def _boundingBox(mask: np.ndarray) -> tuple[slice, slice, slice]:
    """The smallest box (array slices) holding every True voxel of ``mask``; empty when there is none."""
    if not mask.any():
        return (slice(0, 0),) * mask.ndim
    found = np.argwhere(mask)
    return tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(found.min(axis=0), found.max(axis=0)))

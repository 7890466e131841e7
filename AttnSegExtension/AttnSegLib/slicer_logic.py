"""AttnSeg's MRML logic: volume nodes in; a segmentation, map volumes, review and export out.

Runs wherever an MRML scene exists: 3D Slicer (``slicer.mrmlScene``), trame-slicer (``SlicerApp().scene``)
and plain slicer-core (:func:`newScene`). It never imports Qt and never draws; front ends call it and draw.

Threading: MRML is read and written only by :meth:`SceneLogic.prepare` and :meth:`SceneLogic.addResult`,
on the thread that owns the scene. The network touches no MRML. In 3D Slicer it runs in a worker process
(:class:`AttnSegLib.worker_client.WorkerTask`: Slicer's PythonQt keeps the GIL while Qt idles, so a
Python thread there would starve); where threads run freely (the web app, scripts),
:class:`~AttnSegLib.segmentation_task.SegmentationTask` runs the job on a thread. Both are polled from the
UI thread.

The work is split by job: :mod:`AttnSegLib.mrml` converts nodes to and from engine images,
:mod:`AttnSegLib.segmentation_task` runs a job off the scene's thread, :mod:`AttnSegLib.outputs` says what a
run produces (the map nodes made here), :mod:`AttnSegLib.corrected_case` writes the training case.

Supported Slicer versions: 5.6 to 5.12 (Python 3.9 in 5.6 and 5.8, so this package keeps to 3.9 syntax
and library calls). Every Slicer call here exists in 5.6.2, 5.8.1, 5.10.0 and 5.12.3:
``Testing/test_slicer_api.py`` checks them against the method lists extracted from each release's headers.

What is stored in the scene (and so saved with it):

* segmentation node attributes ``AttnSeg.*``: model name, weights sha256, architecture, device, versions,
  classes, modalities and the full provenance (json);
* node references from the segmentation: ``AttnSegInput`` (one per modality, in the card's order),
  ``AttnSegMap`` (every map volume), ``AttnSegReviewMap`` (the review map: the map doubtful regions are ranked
  by; scenes saved by earlier versions name it ``AttnSegDifficulty``, still read) and ``AttnSegModelLabel``
  (the model's untouched label map, hidden); each map refers back through
  ``AttnSegSegmentation``;
* segments carry the tag ``AttnSeg.ClassValue``; map volumes the attributes ``AttnSeg.MapName``,
  ``AttnSeg.MapMeaning``, ``AttnSeg.MapUnit``, ``AttnSeg.MapDetection`` (how well it finds errors, from the
  card) and ``AttnSeg.MapInformation`` (what the card measured of it, :func:`AttnSegLib.outputs.information_note`);
  the "Doubtful regions" segment (Segment Editor mask, see
  :meth:`SceneLogic.restrictEditingToDoubtfulVoxels`) has the ID ``DOUBTFUL_SEGMENT_ID`` and is no class.

Results come back on the first input's grid, in world coordinates (see :mod:`AttnSegLib.mrml`).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import slicer
from vtkmodules.vtkCommonCore import reference as vtkReference, vtkStringArray

from . import __version__
from .corrected_case import difference, safe_case_name, write_case
from .errors import AttnSegError, InputError
from .image import Image, label_dtype
from .inference import Cancelled, Predictor, Result, resolve_device
from .localise import localise_targets, needs_localisation
from .maps import volume_name
from .mrml import (INFERNO_ANCHORS, arrayToMatrix, classColor, colorScale, defaultScene, imageFromVolumeNode,
                   loadVolume, matrixToArray, orientedMask, roiBoxFromNode, roiNodeFromBox, segmentEditorNode,
                   setSegmentTerminology, terminologyEntry, volumeGeometry, volumeNodeFromImage)
from .outputs import TRANSPARENT_BELOW, OutputMap, class_volumes_ml, output_maps
from .package import ModelPackage, available_packages, default_package_name, load_package
from .review import MIN_VOLUME_ML, Region, doubtful_regions, editable_mask
from .segmentation_task import SegmentationJob

__all__ = ["SceneLogic", "Cancelled", "CorrectionError", "DoubtfulRegion", "MapLegend", "SegmentationResult"]

ATTRIBUTE = "AttnSeg."
REF_INPUT = "AttnSegInput"
REF_MAP = "AttnSegMap"
REF_REVIEW_MAP = "AttnSegReviewMap"
REF_REVIEW_MAP_BEFORE = "AttnSegDifficulty"  # the same reference in scenes saved by earlier versions
REF_MODEL_LABEL = "AttnSegModelLabel"
REF_SEGMENTATION = "AttnSegSegmentation"
CLASS_VALUE_TAG = "AttnSeg.ClassValue"
COLOR_TABLE_NAME = "AttnSeg inferno"
DOUBTFUL_SEGMENT_ID = "attnseg_doubtful_regions"
DOUBTFUL_SEGMENT_NAME = "Doubtful regions"


class CorrectionError(AttnSegError, ValueError):
    """A segmentation cannot be exported as a training case; the message names the problem and the fix."""


# -- results and review ----------------------------------------------------------------------------
@dataclass
class SegmentationResult:
    """What :meth:`SceneLogic.segment` added to the scene.

    ``mapNodes``: map name -> scalar volume node, named as :func:`AttnSegLib.outputs.output_maps` names
    them: ``probability.<class>`` per foreground class, ``uncertainty``, and the model's own maps
    (``difficulty``, ``spatial_attention.level1``...). ``classVolumesMl``: foreground class -> ml of the
    model's label map (:func:`AttnSegLib.outputs.class_volumes_ml`).
    """

    segmentationNode: object
    mapNodes: dict[str, object]
    modelLabelNode: object
    reviewMapName: str
    inputNodes: list
    notices: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    classes: list[dict] = field(default_factory=list)  # what each label value means (the engine Result's)
    classVolumesMl: dict[str, float] = field(default_factory=dict)

    @property
    def reviewMapNode(self):
        return self.mapNodes[self.reviewMapName]


@dataclass(frozen=True)
class DoubtfulRegion:
    """One stop of the review: ``region`` (from :func:`AttnSegLib.review.doubtful_regions`), its place
    ``index`` among ``count`` regions (0 = the most doubtful), and its marker, a point inside the
    region, in world RAS (mm)."""

    index: int
    count: int
    region: Region

    @property
    def markerRAS(self) -> tuple[float, float, float]:
        return self.region.marker_ras


@dataclass(frozen=True)
class MapLegend:
    """What a front end needs to draw a map's legend: the values at the ``first`` and the ``last`` colour
    (high to low for a map high where the segmentation is sure), the colour scale as (position in
    [0, 1], (r, g, b) 0-255) stops (the map is not drawn in the first ``TRANSPARENT_BELOW`` of it:
    :func:`AttnSegLib.outputs.hidden`), and how well the map finds errors (its card's score; maps that
    do not find them are called research maps; "" where the card has no score). ``unit``: what its
    values are; ``information``: what its card measured of it on the validation cases
    (:func:`AttnSegLib.outputs.information_note`); each "" where the card says nothing."""

    name: str
    meaning: str
    first: float
    last: float
    stops: tuple[tuple[float, tuple[int, int, int]], ...]
    detection: str = ""
    unit: str = ""
    information: str = ""


# -- the logic -------------------------------------------------------------------------------------
class SceneLogic:
    """Segment, review and export in an MRML scene; see the module docstring for what it stores."""

    def __init__(self, scene=None, workerCommand: list[str] | None = None, workerEnvironment: dict | None = None):
        """``workerCommand``/``workerEnvironment``: how :meth:`startTask` starts the worker process
        (default: this Python, see :func:`AttnSegLib.worker_client.workerCommand`); Slicer passes its
        ``PythonSlicer`` and startup environment."""
        self._scene = scene
        self.workerCommand, self.workerEnvironment = workerCommand, workerEnvironment
        self._worker = None
        self._packages: dict[str, ModelPackage] = {}
        self._predictors: dict[tuple[str, str], Predictor] = {}
        self._regionCache: dict[tuple, list[Region]] = {}
        self._clickRefinements: dict[str, object] = {}
        self.activeSegmentationNode = None

    @property
    def scene(self):
        return self._scene if self._scene is not None else defaultScene()

    def loadVolume(self, path: str | os.PathLike, name: str | None = None):
        return loadVolume(path, self.scene, name)

    # -- models ---------------------------------------------------------------------------------
    @staticmethod
    def availableModels() -> list[str]:
        """Names of the installed model packages (see :func:`AttnSegLib.package.search_dirs`)."""
        return [p.stem if p.suffix == ".zip" else p.name for p in available_packages()]

    @staticmethod
    def defaultModelName() -> str:
        return default_package_name()

    def loadModel(self, model: ModelPackage | str | os.PathLike | None = None) -> ModelPackage:
        """A validated package: given, by name or path, or the default one; loaded once per logic."""
        if isinstance(model, ModelPackage):
            return model
        key = str(model if model is not None else default_package_name())
        if key not in self._packages:
            self._packages[key] = load_package(key)
        return self._packages[key]

    def guessInputVolumes(self, model=None) -> list:
        """One scalar volume node (or None) per modality of the model, matched by the modality's name
        appearing in the node's name (case-insensitive); a single-modality model takes the only or
        the first volume. A node is used once."""
        modalities = self.loadModel(model).modalities
        volumes = [n for n in self._nodesByClass("vtkMRMLScalarVolumeNode")
                   if not n.IsA("vtkMRMLLabelMapVolumeNode") and not n.GetHideFromEditors()
                   and n.GetAttribute(ATTRIBUTE + "MapName") is None]
        chosen: list = []
        for modality in modalities:
            token = modality["name"].lower()
            match = next((v for v in volumes if token in v.GetName().lower() and v not in chosen), None)
            chosen.append(match)
        if len(modalities) == 1 and chosen[0] is None and volumes:
            chosen[0] = volumes[0]
        return chosen

    # -- segment --------------------------------------------------------------------------------
    def prepare(self, volumeNodes: list, model=None, device: str = "auto", inProcess: bool = True,
                roiNode=None) -> SegmentationJob:
        """Check the inputs against the model card and copy them out of MRML (call on the scene's thread).
        ``inProcess``: also build the network here, for :meth:`SegmentationJob.run` in this process
        (False for :meth:`startTask`, whose worker builds it). ``roiNode``: a markups ROI to segment inside
        (default: the whole volume, localised by the engine when it is much larger than the model's
        training field of view); one :meth:`localisationROIs` placed keeps its head's size factor (its
        ``SizeFactor`` attribute, however the user moved or resized it) and is sampled size-normalised as the
        localised crops are; one drawn by hand is cut at the scan's own size."""
        package = self.loadModel(model)
        names = package.card.modality_names
        nodes = list(volumeNodes)
        if len(nodes) != len(names) or any(n is None for n in nodes):
            raise InputError(f"model {package.name!r} needs {len(names)} input volume(s), one per modality "
                             f"({', '.join(names)}); got {sum(n is not None for n in nodes)}")
        images = [imageFromVolumeNode(n) for n in nodes]
        sizeFactor = roiNode.GetAttribute(ATTRIBUTE + "SizeFactor") if roiNode is not None else None
        job = SegmentationJob(package, images, [n.GetID() for n in nodes], device,
                              roi=roiBoxFromNode(roiNode) if roiNode is not None else None,
                              size_factor=float(sizeFactor) if sizeFactor else None)
        if inProcess:
            key = (f"{package.path}:{package.sha256}", str(resolve_device(device)))
            if key not in self._predictors:
                self._predictors[key] = Predictor(package, device=device)
            job.predictor = self._predictors[key]
        return job

    def needsLocalisation(self, volumeNode, model=None) -> bool:
        """True when ``model``'s card says how to localise its structures and ``volumeNode`` is much larger
        than the field of view the model was trained on: without an ROI the engine localises it, and
        :meth:`localisationROIs` shows where beforehand."""
        if volumeNode is None or volumeNode.GetImageData() is None:
            return False
        return needs_localisation(volumeGeometry(volumeNode), self.loadModel(model).card)

    def localisationROIs(self, volumeNode, model=None) -> list:
        """Register the MNI152 template to ``volumeNode`` as the engine does before segmenting a whole head,
        and add one markups ROI node per target of ``model``'s card (e.g. "Left hippocampus ROI") where
        the engine would crop it, with the target's name (attribute ``Target``) and the head's size factor
        (``SizeFactor``, :attr:`~AttnSegLib.localise.Registration.size_factor`); the user may move one and
        segment inside it (``roiNode``), size-normalised as the engine's crop. A failed registration raises
        :class:`~AttnSegLib.localise.LocalisationError` and adds nothing."""
        registration, placed = localise_targets(imageFromVolumeNode(volumeNode), self.loadModel(model).card)
        nodes = []
        for target, box in placed:
            node = roiNodeFromBox(box, self.scene, f"{target.side} {target.structure} ROI")
            node.SetAttribute(ATTRIBUTE + "Target", target.name)
            node.SetAttribute(ATTRIBUTE + "SizeFactor", repr(registration.size_factor))
            nodes.append(node)
        return nodes

    def startTask(self, job: SegmentationJob):
        """Run ``job`` in the worker process (started on first use and kept, with its model, between
        runs); poll the returned :class:`~AttnSegLib.worker_client.WorkerTask` and hand its ``result()``
        to :meth:`addResult`."""
        from .worker_client import WorkerProcess, WorkerTask

        if self._worker is None:
            self._worker = WorkerProcess(self.workerCommand, self.workerEnvironment)
        return WorkerTask(self._worker, job).start()

    def shutdownWorker(self) -> None:
        """Stop the worker process (a running job is cancelled); the next :meth:`startTask` starts one."""
        if self._worker is not None:
            self._worker.shutdown()
            self._worker = None

    def segment(self, volumeNodes: list, model=None, device: str = "auto", progress=None,
                cancel=None, roiNode=None) -> SegmentationResult:
        """Segment ``volumeNodes`` (one per modality, in the card's order) into a new segmentation node.

        ``model``: package, name or path (default: the default package). ``progress(fraction, eta, stage)``
        and ``cancel`` (``.is_set()``) as in :meth:`AttnSegLib.inference.Predictor.predict`; a cancelled
        run raises :class:`Cancelled` and adds nothing to the scene.
        """
        job = self.prepare(volumeNodes, model, device, roiNode=roiNode)
        return self.addResult(job, job.run(progress=progress, cancel=cancel))

    def addResult(self, job: SegmentationJob, result: Result) -> SegmentationResult:
        """Add a prediction to the scene: always a new segmentation node, its maps and references."""
        steps = self.addResultSteps(job, result)
        while True:
            try:
                next(steps)
            except StopIteration as finished:
                return finished.value

    def addResultSteps(self, job: SegmentationJob, result: Result):
        """:meth:`addResult` one node at a time: a generator that yields the name of what it just added
        and returns the :class:`SegmentationResult`. A UI advances it from its timer, so that on a
        whole-head volume the main thread is never held for all the nodes at once."""
        scene = self.scene
        package = job.package
        inputs = [scene.GetNodeByID(i) for i in job.inputNodeIDs]
        if any(n is None for n in inputs):
            raise InputError("an input volume was removed from the scene while segmenting; segment again")
        baseName = f"{inputs[0].GetName()} {package.name}"
        modelLabel = volumeNodeFromImage(result.labels, scene, f"{baseName} model output",
                                         "vtkMRMLLabelMapVolumeNode")
        modelLabel.SetHideFromEditors(True)
        yield "model output"
        segmentation = self._newSegmentationNode(scene.GenerateUniqueName(baseName), result.labels,
                                                 result.classes, modelLabel)
        self._storeProvenance(segmentation, package, result, inputs)
        segmentation.SetNodeReferenceID(REF_MODEL_LABEL, modelLabel.GetID())
        for node in inputs:
            segmentation.AddNodeReferenceID(REF_INPUT, node.GetID())
        yield "segmentation"
        mapNodes = {}
        colorTable = self._colorTable()
        for output in output_maps(result, package.card):
            mapNodes[output.name] = self._addMapNode(segmentation, output, colorTable)
            yield output.name
        segmentation.SetNodeReferenceID(REF_REVIEW_MAP, mapNodes[result.review_map_name].GetID())
        self.activeSegmentationNode = segmentation
        return SegmentationResult(segmentation, mapNodes, modelLabel, result.review_map_name, inputs,
                                  list(result.notices), dict(result.timings), dict(result.provenance),
                                  list(result.classes), class_volumes_ml(result.labels, result.classes))

    def _newSegmentationNode(self, name: str, labels: Image, classes: list[dict], reference):
        segmentationNode = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(reference)
        segmentation = segmentationNode.GetSegmentation()
        labelmapName = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
        segmentation.SetSourceRepresentationName(labelmapName)
        # One labelmap holding the class values, shared by every segment (each reads its own label
        # value): the layout Slicer's own collapsing makes, without a pass over the volume per class.
        shared = orientedMask(labels.geometry, labels.array)
        for cls in classes[1:]:
            segment = slicer.vtkSegment()
            segment.SetName(cls["name"])
            segment.SetColor(*classColor(cls))
            segment.SetLabelValue(int(cls["value"]))
            segment.SetTag(CLASS_VALUE_TAG, str(cls["value"]))
            setSegmentTerminology(segment, terminologyEntry(cls))
            segment.AddRepresentation(labelmapName, shared)
            segmentation.AddSegment(segment, volume_name(cls["name"]) or f"class_{cls['value']}")
        return segmentationNode

    @staticmethod
    def _storeProvenance(segmentation, package: ModelPackage, result: Result, inputs: list) -> None:
        provenance = result.provenance
        attributes = {
            "Model": package.name,
            "ModelSha256": package.sha256,
            "Architecture": package.card.architecture,
            "Device": provenance.get("device", ""),
            "Versions": json.dumps(provenance.get("versions", {}), sort_keys=True),
            "Classes": json.dumps([{"value": c["value"], "name": c["name"]} for c in result.classes]),
            "Modalities": json.dumps(package.card.modality_names),
            "ReviewMap": result.review_map_name,
            "Provenance": json.dumps(provenance, sort_keys=True, default=str),
            "Created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        for key, value in attributes.items():
            segmentation.SetAttribute(ATTRIBUTE + key, str(value))

    def _addMapNode(self, segmentation, output: OutputMap, colorTable):
        """A map volume node with its own display node: window fixed before the image is attached, so
        Slicer computes no automatic window/level (a histogram of the whole volume). A display range
        running high to low (a confidence) is a negative window, which Slicer's window/level filter
        inverts (VTK's vtkImageMapToWindowLevelColors up to 5.10, vtkImageMapToWindowLevelAddon from 5.12)."""
        scene = self.scene
        display = scene.AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode")
        display.SetAutoWindowLevel(False)
        display.SetWindowLevelMinMax(*output.display_range)
        display.SetAndObserveColorNodeID(colorTable.GetID())
        image = output.image
        node = volumeNodeFromImage(image.with_array(image.array.astype(np.float32, copy=False)), scene,
                                   f"{segmentation.GetName()} {output.name}", displayNode=display)
        node.SetAttribute(ATTRIBUTE + "MapName", output.name)
        node.SetAttribute(ATTRIBUTE + "MapMeaning", output.meaning)
        node.SetAttribute(ATTRIBUTE + "MapDetection", output.detection)
        node.SetAttribute(ATTRIBUTE + "MapUnit", output.unit or "")
        node.SetAttribute(ATTRIBUTE + "MapInformation", output.information)
        node.SetNodeReferenceID(REF_SEGMENTATION, segmentation.GetID())
        segmentation.AddNodeReferenceID(REF_MAP, node.GetID())
        return node

    def _colorTable(self):
        """The scene's AttnSeg colour table (created once per scene): inferno, with the entries of the
        lowest ``TRANSPARENT_BELOW`` of the range fully transparent (Slicer's slice views AND the table's
        alpha with the display threshold, so those voxels show the anatomy underneath)."""
        kind = f"inferno, transparent below {TRANSPARENT_BELOW}"
        for node in self._nodesByClass("vtkMRMLColorTableNode"):
            if node.GetName() == COLOR_TABLE_NAME and node.GetAttribute(ATTRIBUTE + "ColorScale") == kind:
                return node
        table = self.scene.AddNewNodeByClass("vtkMRMLColorTableNode", COLOR_TABLE_NAME)
        table.SetTypeToUser()
        table.SetAttribute(ATTRIBUTE + "ColorScale", kind)
        colors = colorScale(256)
        table.SetNumberOfColors(len(colors))
        for index, (r, g, b) in enumerate(colors):
            position = index / (len(colors) - 1)
            table.SetColor(index, f"{position:.3f}", r, g, b, 0.0 if position < TRANSPARENT_BELOW else 1.0)
        return table

    # -- nodes of a result ----------------------------------------------------------------------
    def _nodesByClass(self, className: str) -> list:
        scene = self.scene
        return [scene.GetNthNodeByClass(i, className) for i in range(scene.GetNumberOfNodesByClass(className))]

    @staticmethod
    def _referenced(node, role: str) -> list:
        return [node.GetNthNodeReference(role, i) for i in range(node.GetNumberOfNodeReferences(role))]

    @staticmethod
    def isAttnSegSegmentation(node) -> bool:
        """True for a segmentation node AttnSeg made (it carries the model's provenance)."""
        return node is not None and node.GetAttribute(ATTRIBUTE + "Model") is not None

    def _resolve(self, segmentationNode):
        node = segmentationNode if segmentationNode is not None else self.activeSegmentationNode
        if not self.isAttnSegSegmentation(node):
            raise InputError("no AttnSeg segmentation selected; segment first or pick one AttnSeg created")
        return node

    def inputNodes(self, segmentationNode=None) -> list:
        return self._referenced(self._resolve(segmentationNode), REF_INPUT)

    def mapNodes(self, segmentationNode=None) -> dict[str, object]:
        """Map name -> map volume node of an AttnSeg segmentation (in the order they were made)."""
        nodes = self._referenced(self._resolve(segmentationNode), REF_MAP)
        return {n.GetAttribute(ATTRIBUTE + "MapName"): n for n in nodes if n is not None}

    def reviewMapNode(self, segmentationNode=None):
        """The map doubtful regions are ranked by (also in scenes saved with the earlier reference name)."""
        segmentation = self._resolve(segmentationNode)
        node = (segmentation.GetNodeReference(REF_REVIEW_MAP)
                or segmentation.GetNodeReference(REF_REVIEW_MAP_BEFORE))
        if node is None:
            raise InputError("the review map of this segmentation was deleted; segment again to review it")
        return node

    def reviewMapName(self, segmentationNode=None) -> str:
        """The name of the review map (``reviewMapNode``), e.g. ``uncertainty``, as the page names it."""
        segmentation = self._resolve(segmentationNode)
        return (segmentation.GetAttribute(ATTRIBUTE + "ReviewMap")
                or segmentation.GetAttribute(ATTRIBUTE + "DifficultyMap") or "review map")

    def modelLabelNode(self, segmentationNode=None):
        return self._resolve(segmentationNode).GetNodeReference(REF_MODEL_LABEL)

    # -- showing a map --------------------------------------------------------------------------
    def showMap(self, mapNode, opacity: float = 0.5, backgroundNode=None) -> None:
        """Show ``mapNode`` as the foreground layer of every slice view at ``opacity`` (``None``: hide
        the foreground). ``backgroundNode`` (default: the map's first input volume) becomes the
        background where it is not one already."""
        if mapNode is not None and backgroundNode is None:
            segmentation = mapNode.GetNodeReference(REF_SEGMENTATION)
            inputs = self._referenced(segmentation, REF_INPUT) if segmentation is not None else []
            backgroundNode = inputs[0] if inputs else None
        for composite in self._nodesByClass("vtkMRMLSliceCompositeNode"):
            composite.SetForegroundVolumeID(mapNode.GetID() if mapNode is not None else None)
            composite.SetForegroundOpacity(float(opacity))
            if backgroundNode is not None:
                composite.SetBackgroundVolumeID(backgroundNode.GetID())

    @staticmethod
    def mapLegend(mapNode) -> MapLegend:
        display = mapNode.GetDisplayNode()
        first, last = display.GetWindowLevelMin(), display.GetWindowLevelMax()  # a negative window runs high to low
        anchors = INFERNO_ANCHORS
        stops = tuple((i / (len(anchors) - 1), tuple(int(c) for c in rgb)) for i, rgb in enumerate(anchors))
        return MapLegend(mapNode.GetAttribute(ATTRIBUTE + "MapName") or mapNode.GetName(),
                         mapNode.GetAttribute(ATTRIBUTE + "MapMeaning") or "", float(first), float(last), stops,
                         mapNode.GetAttribute(ATTRIBUTE + "MapDetection") or "",
                         mapNode.GetAttribute(ATTRIBUTE + "MapUnit") or "",
                         mapNode.GetAttribute(ATTRIBUTE + "MapInformation") or "")

    # -- review ---------------------------------------------------------------------------------
    def doubtfulRegions(self, segmentationNode=None, threshold: float = 0.5,
                        minimumVolumeMl: float = MIN_VOLUME_ML) -> list[Region]:
        """Every region where the review map (``reviewMapNode``) is >= ``threshold`` and at least
        ``minimumVolumeMl`` large, nearby fragments merged, most doubtful first (see
        :mod:`AttnSegLib.review`)."""
        reviewMap = self.reviewMapNode(segmentationNode)
        key = (reviewMap.GetID(), reviewMap.GetImageData().GetMTime(), float(threshold), float(minimumVolumeMl))
        if key not in self._regionCache:
            self._regionCache = {key: doubtful_regions(imageFromVolumeNode(reviewMap), threshold,
                                                       min_volume_ml=minimumVolumeMl)}
        return self._regionCache[key]

    def nextDoubtfulRegion(self, segmentationNode=None, threshold: float = 0.5) -> DoubtfulRegion | None:
        """The next region of the review (wrapping round), or None when none reaches ``threshold``.
        The position is stored on the segmentation node, so it survives saving the scene."""
        return self._step(segmentationNode, threshold, +1)

    def previousDoubtfulRegion(self, segmentationNode=None, threshold: float = 0.5) -> DoubtfulRegion | None:
        return self._step(segmentationNode, threshold, -1)

    def _step(self, segmentationNode, threshold: float, step: int) -> DoubtfulRegion | None:
        node = self._resolve(segmentationNode)
        regions = self.doubtfulRegions(node, threshold)
        if not regions:
            return None
        same = node.GetAttribute(ATTRIBUTE + "ReviewThreshold") == repr(float(threshold))
        current = int(node.GetAttribute(ATTRIBUTE + "ReviewIndex") or -1) if same else -1
        if current < 0:
            index = 0 if step > 0 else len(regions) - 1
        else:
            index = (current + step) % len(regions)
        return self.goToDoubtfulRegion(node, threshold, index)

    def goToDoubtfulRegion(self, segmentationNode=None, threshold: float = 0.5, index: int = 0) -> DoubtfulRegion | None:
        """Region ``index`` (0 = the most doubtful) at ``threshold``, made the review's current stop (Next
        and Previous go on from it); None when there is no such region."""
        node = self._resolve(segmentationNode)
        regions = self.doubtfulRegions(node, threshold)
        if not 0 <= index < len(regions):
            return None
        node.SetAttribute(ATTRIBUTE + "ReviewThreshold", repr(float(threshold)))
        node.SetAttribute(ATTRIBUTE + "ReviewIndex", str(index))
        return DoubtfulRegion(index, len(regions), regions[index])

    def centerSliceViews(self, ras, volumeNode=None) -> None:
        """Move every slice view so that it passes through, and is centred on, the RAS point.

        With ``volumeNode``, a view is centred on the point only as far as that leaves no empty space
        (outside the volume) in it: along each in-plane axis the centre is moved back toward the
        volume until the view's field of view lies inside the volume's extent, or, when the volume is
        narrower than the view, the view is centred on the volume. The point stays in view either way.
        """
        bounds = [0.0] * 6
        if volumeNode is not None:
            volumeNode.GetRASBounds(bounds)
        corners = np.array([[x, y, z] for x in bounds[0:2] for y in bounds[2:4] for z in bounds[4:6]])
        for sliceNode in self._nodesByClass("vtkMRMLSliceNode"):
            sliceNode.JumpSliceByCentering(*(float(v) for v in ras))
            if volumeNode is not None:
                self._keepVolumeInView(sliceNode, np.asarray(ras, dtype=float), corners)

    @staticmethod
    def _keepVolumeInView(sliceNode, ras: np.ndarray, corners: np.ndarray) -> None:
        """Shift ``sliceNode`` (centred on ``ras``) in its plane so that its field of view shows as much of
        the box with RAS ``corners`` (8, 3) as it can hold (see :meth:`centerSliceViews`)."""
        sliceToRAS = matrixToArray(sliceNode.GetSliceToRAS())
        axes = sliceToRAS[:3, :2] / np.linalg.norm(sliceToRAS[:3, :2], axis=0)  # in-plane x and y in RAS
        extent = (corners - ras) @ axes  # (8, 2): the volume's corners in the view's plane, the point at 0
        low, high = extent.min(axis=0), extent.max(axis=0)
        half = np.asarray(sliceNode.GetFieldOfView()[:2], dtype=float) / 2
        shift = np.where(high - low >= 2 * half, np.clip(0.0, low + half, high - half), (low + high) / 2)
        if not shift.any():
            return
        sliceToRAS[:3, 3] = ras + axes @ shift
        sliceNode.GetSliceToRAS().DeepCopy(arrayToMatrix(sliceToRAS))
        sliceNode.UpdateMatrices()

    def markPoint(self, ras) -> None:
        """Mark the RAS point in every slice view with the scene's crosshair (a small cross), as a
        region's marker: the point review stepping centred the views on."""
        crosshair = self.scene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
        if crosshair is None:
            crosshair = slicer.vtkMRMLCrosshairNode()
            crosshair.SetSingletonTag("default")
            crosshair = self.scene.AddNode(crosshair)
        crosshair.SetCrosshairRAS(*(float(v) for v in ras))
        crosshair.SetCrosshairMode(slicer.vtkMRMLCrosshairNode.ShowSmallBasic)

    # -- correcting -----------------------------------------------------------------------------
    def clickRefinement(self, segmentationNode=None):
        """The click refinement of an AttnSeg segmentation (markups point lists refined as they are
        placed, with undo: :class:`AttnSegLib.slicer_refine.ClickRefinement`), made on first use and
        kept, so its undo steps last as long as the node."""
        from .slicer_refine import ClickRefinement  # it builds on this module

        node = self._resolve(segmentationNode)
        refinement = self._clickRefinements.get(node.GetID())
        if refinement is None or refinement.segmentationNode is not node:  # IDs come back after a scene clear
            refinement = self._clickRefinements[node.GetID()] = ClickRefinement(self, node)
        return refinement

    def segmentEditorNode(self):
        """The Segment Editor module's parameter node (singleton tag ``SegmentEditor``), made if absent
        (:func:`AttnSegLib.mrml.segmentEditorNode`)."""
        return segmentEditorNode(self.scene)

    def restrictEditingToDoubtfulVoxels(self, segmentationNode=None, threshold: float = 0.5,
                                        segmentEditorNode=None) -> None:
        """Let Segment Editor effects change only voxels where the review map is >= ``threshold`` and
        the ``review.EDIT_MARGIN_MM`` around them (:func:`~.review.editable_mask`: errors lie beside the doubt).

        Those voxels become a hidden segment, "Doubtful regions", and the editor's editable area
        is "inside" that one segment (``EditAllowedInsideSingleSegment``). The editor then overwrites
        visible segments only, so painting a class never erodes the hidden mask. The source volume and
        the intensity mask stay as the user set them; the editable area and overwrite mode the user had
        are stored on the editor node and given back by :meth:`allowEditingEverywhere`.
        """
        node = self._resolve(segmentationNode)
        self._setDoubtfulSegment(node, threshold)
        editor = segmentEditorNode if segmentEditorNode is not None else self.segmentEditorNode()
        if editor.GetAttribute(ATTRIBUTE + "SavedMaskMode") is None:
            editor.SetAttribute(ATTRIBUTE + "SavedMaskMode", str(editor.GetMaskMode()))
            editor.SetAttribute(ATTRIBUTE + "SavedMaskSegmentID", editor.GetMaskSegmentID() or "")
            editor.SetAttribute(ATTRIBUTE + "SavedOverwriteMode", str(editor.GetOverwriteMode()))
        editor.SetAndObserveSegmentationNode(node)
        editor.SetMaskSegmentID(DOUBTFUL_SEGMENT_ID)
        editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
        editor.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteVisibleSegments)
        if editor.GetSelectedSegmentID() in (None, "", DOUBTFUL_SEGMENT_ID):
            segmentation = node.GetSegmentation()
            editor.SetSelectedSegmentID(segmentation.GetNthSegmentID(0) if segmentation.GetNumberOfSegments() else None)

    def allowEditingEverywhere(self, segmentationNode=None, segmentEditorNode=None) -> None:
        """Undo :meth:`restrictEditingToDoubtfulVoxels`: the user's editable area and overwrite mode come
        back and the "Doubtful regions" segment is removed."""
        node = self._resolve(segmentationNode)
        editor = segmentEditorNode if segmentEditorNode is not None else self.segmentEditorNode()
        saved = editor.GetAttribute(ATTRIBUTE + "SavedMaskMode")
        if saved is not None:
            editor.SetMaskMode(int(saved))
            editor.SetMaskSegmentID(editor.GetAttribute(ATTRIBUTE + "SavedMaskSegmentID") or None)
            editor.SetOverwriteMode(int(editor.GetAttribute(ATTRIBUTE + "SavedOverwriteMode")))
            for key in ("SavedMaskMode", "SavedMaskSegmentID", "SavedOverwriteMode"):
                editor.RemoveAttribute(ATTRIBUTE + key)
        segmentation = node.GetSegmentation()
        if segmentation.GetSegment(DOUBTFUL_SEGMENT_ID) is not None:
            segmentation.RemoveSegment(DOUBTFUL_SEGMENT_ID)

    def _setDoubtfulSegment(self, node, threshold: float) -> None:
        """(Re)make the hidden "Doubtful regions" segment: review map >= ``threshold`` grown by
        ``review.EDIT_MARGIN_MM``, on the map's grid."""
        reviewMap = imageFromVolumeNode(self.reviewMapNode(node))
        segmentation = node.GetSegmentation()
        if segmentation.GetSegment(DOUBTFUL_SEGMENT_ID) is not None:
            segmentation.RemoveSegment(DOUBTFUL_SEGMENT_ID)
        segment = slicer.vtkSegment()
        segment.SetName(DOUBTFUL_SEGMENT_NAME)
        segment.SetColor(1.0, 1.0, 1.0)
        segment.SetTag(ATTRIBUTE + "DoubtThreshold", repr(float(threshold)))
        segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(),
                                  orientedMask(reviewMap.geometry, editable_mask(reviewMap, threshold)))
        segmentation.AddSegment(segment, DOUBTFUL_SEGMENT_ID)
        display = node.GetDisplayNode()
        if display is not None:
            display.SetSegmentVisibility(DOUBTFUL_SEGMENT_ID, False)

    def correctedLabels(self, segmentationNode=None) -> Image:
        """The segmentation as it is now, as class values on the model output's grid (of
        :func:`~.image.label_dtype`: uint16 beyond 256 classes).

        Segments count by their ``AttnSeg.ClassValue`` tag, or by a name equal to a class name (for
        segments the user added); any other segment is an error, since training could not use it.
        """
        node = self._resolve(segmentationNode)
        reference = self.modelLabelNode(node)
        if reference is None:
            raise CorrectionError("the model output of this segmentation was deleted; segment again to export")
        classes = {c["name"].lower(): int(c["value"])
                   for c in json.loads(node.GetAttribute(ATTRIBUTE + "Classes"))}
        dtype = label_dtype(max(classes.values(), default=0) + 1)
        segmentation = node.GetSegmentation()
        ids, values = vtkStringArray(), []
        for index in range(segmentation.GetNumberOfSegments()):
            segmentId = segmentation.GetNthSegmentID(index)
            if segmentId == DOUBTFUL_SEGMENT_ID:  # the editing mask, not a class
                continue
            segment = segmentation.GetSegment(segmentId)
            tag = vtkReference("")
            value = int(str(tag)) if segment.GetTag(CLASS_VALUE_TAG, tag) else classes.get(segment.GetName().lower())
            if value is None or value == 0:
                names = ", ".join(n for n, v in classes.items() if v)
                raise CorrectionError(f"segment {segment.GetName()!r} is not one of the model's classes ({names}); "
                                      "rename it to one of them, or delete it, before saving the correction")
            ids.InsertNextValue(segmentId)
            values.append(value)
        scene = self.scene
        before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "AttnSeg export")
        try:
            if values and not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                    node, ids, labelmap, reference, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY):
                raise CorrectionError(f"Slicer could not export segmentation {node.GetName()!r} to a label map")
            grid = imageFromVolumeNode(reference)
            if not values:
                return grid.with_array(np.zeros_like(grid.array, dtype=dtype))
            exported = imageFromVolumeNode(labelmap)
        finally:  # the temporary label map, and the display node and colour table Slicer made for it
            added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
            for temporary in [n for n in added if n.GetID() not in before]:
                scene.RemoveNode(temporary)
        if exported.array.shape != grid.array.shape:
            raise CorrectionError(f"exported label map {exported.array.shape} is not on the model output grid "
                                  f"{grid.array.shape}")
        lookup = np.zeros(len(values) + 1, dtype=dtype)
        lookup[1:] = values
        return grid.with_array(lookup[exported.array.astype(np.int64)])

    def correctedVoxelCount(self, segmentationNode=None) -> int:
        """How many voxels the user's corrections changed: the segmentation against the model's own labels."""
        modelLabel = self.modelLabelNode(segmentationNode)
        if modelLabel is None:
            return 0
        return int((self.correctedLabels(segmentationNode).array != imageFromVolumeNode(modelLabel).array).sum())

    def exportCorrection(self, segmentationNode=None, outputDir: str | os.PathLike = ".",
                         caseName: str | None = None, overwrite: bool = False) -> Path:
        """Write the corrected case in the layout ``training/`` reads (layout ``corrected``, see
        :mod:`AttnSegLib.corrected_case`): the inputs, the corrected and the model's labels, their difference,
        the review map and ``case.json`` (model name and hash, class names, provenance, refinement clicks,
        attribute ``Clicks``).

        An existing case is replaced only with ``overwrite=True`` (else :class:`FileExistsError`). Returns the
        case folder.
        """
        node = self._resolve(segmentationNode)
        inputs = self.inputNodes(node)
        if not inputs or any(n is None for n in inputs):
            raise CorrectionError("an input volume of this segmentation was deleted; reload it and segment again")
        label = self.correctedLabels(node)
        modelLabel = imageFromVolumeNode(self.modelLabelNode(node))
        case = safe_case_name(caseName or inputs[0].GetName())
        record = self._caseRecord(node, case, inputs, label, difference(label, modelLabel))
        return write_case(Path(outputDir) / case, [imageFromVolumeNode(v) for v in inputs], label, modelLabel,
                          imageFromVolumeNode(self.reviewMapNode(node)), record, overwrite)

    def _caseRecord(self, node, case: str, inputs: list, label: Image, difference: np.ndarray) -> dict:
        classes = json.loads(node.GetAttribute(ATTRIBUTE + "Classes"))
        voxel = label.geometry.voxel_volume_ml
        return {
            "case": case,
            "model_name": node.GetAttribute(ATTRIBUTE + "Model"),
            "model_sha256": node.GetAttribute(ATTRIBUTE + "ModelSha256"),
            "architecture": node.GetAttribute(ATTRIBUTE + "Architecture"),
            "class_names": [c["name"] for c in classes],
            "classes": classes,
            "modalities": json.loads(node.GetAttribute(ATTRIBUTE + "Modalities")),
            "input_volumes": [n.GetName() for n in inputs],
            "review_map": self.reviewMapName(node),
            "changed_voxels": int(difference.sum()),
            "changed_ml": round(float(difference.sum()) * voxel, 4),
            "class_volumes_ml": class_volumes_ml(label, classes),
            "provenance": json.loads(node.GetAttribute(ATTRIBUTE + "Provenance") or "{}"),
            # refinement clicks ({"position_lps": [x, y, z], "class": name}), set by whoever applies them
            "clicks": json.loads(node.GetAttribute(ATTRIBUTE + "Clicks") or "[]"),
            "exported_by": f"AttnSeg {__version__}",
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

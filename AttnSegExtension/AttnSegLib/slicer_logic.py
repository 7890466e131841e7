"""AttnSeg's MRML logic: volume nodes in; a segmentation, map volumes, review and export out.

Runs wherever an MRML scene exists: 3D Slicer (``slicer.mrmlScene``), trame-slicer (``SlicerApp().scene``)
and plain slicer-core (:func:`newScene`). It never imports Qt and never draws; front ends call it and draw.

Threading: MRML is read and written only by :meth:`AttnSegLogic.prepare` and :meth:`AttnSegLogic.addResult`,
on the thread that owns the scene. The network touches no MRML. In 3D Slicer it runs in a worker process
(:class:`AttnSegLib.worker_client.WorkerTask`: Slicer's PythonQt keeps the GIL while Qt idles, so a
Python thread there would starve); where threads run freely (the web app, scripts),
:class:`SegmentationTask` runs :meth:`SegmentationJob.run` on a thread. Both are polled from the UI thread.

Supported Slicer versions: 5.6 to 5.12 (Python 3.9 in 5.6 and 5.8, so this package keeps to 3.9 syntax
and library calls). Every Slicer call here exists in 5.6: ``Testing/test_slicer_api.py`` checks them
against the method list extracted from Slicer 5.6.2's headers.

What is stored in the scene (and so saved with it):

* segmentation node attributes ``AttnSeg.*``: model name, weights sha256, architecture, device, versions,
  classes, modalities and the full provenance (json);
* node references from the segmentation: ``AttnSegInput`` (one per modality, in the card's order),
  ``AttnSegMap`` (every map volume), ``AttnSegDifficulty`` (the review map: the map doubtful regions are ranked by) and
  ``AttnSegModelLabel`` (the model's untouched label map, hidden); each map refers back through
  ``AttnSegSegmentation``;
* segments carry the tag ``AttnSeg.ClassValue``; map volumes the attributes ``AttnSeg.MapName`` and
  ``AttnSeg.MapMeaning``; the "Doubtful regions" segment (Segment Editor mask, see
  :meth:`AttnSegLogic.restrictEditingToDoubtfulVoxels`) has the ID ``DOUBTFUL_SEGMENT_ID`` and is no class.

Geometry: a volume's IJK-to-RAS matrix (and its parent transform, when linear) is converted to the
engine's LPS :class:`~AttnSegLib.image.Geometry`, so any orientation and spacing is handled; results
come back on the first input's grid, in world coordinates.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import slicer
from vtkmodules.util import numpy_support
from vtkmodules.vtkCommonCore import reference as vtkReference, vtkStringArray
from vtkmodules.vtkCommonDataModel import vtkImageData
from vtkmodules.vtkCommonMath import vtkMatrix4x4

from . import __version__
from .image import Geometry, Image, ImageError, apply_umask, case_name, label_dtype, read_image, write_image
from .inference import Cancelled, Predictor, Result, resolve_device
from .localise import Box, localise_targets, needs_localisation
from .maps import volume_name
from .package import ModelPackage, available_packages, default_package_name, load_package
from .review import MIN_VOLUME_ML, Region, doubtful_regions

__all__ = ["AttnSegLogic", "Cancelled", "CorrectionError", "DoubtfulRegion", "MapLegend", "SegmentationJob",
           "SegmentationResult", "SegmentationTask", "colorScale", "imageFromVolumeNode", "loadVolume", "newScene",
           "roiBoxFromNode", "roiNodeFromBox", "setSegmentTerminology", "terminologyEntry", "volumeGeometry",
           "volumeNodeFromImage"]

ATTRIBUTE = "AttnSeg."
REF_INPUT = "AttnSegInput"
REF_MAP = "AttnSegMap"
REF_DIFFICULTY = "AttnSegDifficulty"
REF_MODEL_LABEL = "AttnSegModelLabel"
REF_SEGMENTATION = "AttnSegSegmentation"
CLASS_VALUE_TAG = "AttnSeg.ClassValue"
COLOR_TABLE_NAME = "AttnSeg inferno"
# Map values in the lowest 2 % of their display range are not drawn (alpha 0 in the colour table), so an
# overlay leaves the anatomy where the map is ~0 (most of the image) as it is.
TRANSPARENT_BELOW = 0.02
DOUBTFUL_SEGMENT_ID = "attnseg_doubtful_regions"
DOUBTFUL_SEGMENT_NAME = "Doubtful regions"

UNCERTAINTY_MEANING = ("normalised entropy of the class probabilities, in [0, 1]: 0 where the network is "
                       "certain, 1 where all classes are equally likely")
PROBABILITY_MEANING = "probability the network gives class {name!r}, in [0, 1]"
# Maps whose values are probabilities or fractions: shown on the fixed range [0, 1], so a colour
# means the same value in every case. Other maps are shown on their own robust range.
UNIT_RANGE_MAPS = ("uncertainty", "difficulty", "confidence")

# Perceptually uniform "inferno" colour scale (matplotlib), sampled at 17 equally spaced points.
INFERNO_ANCHORS = ((0, 0, 4), (11, 7, 36), (33, 12, 74), (61, 9, 101), (87, 16, 110), (113, 25, 110),
                   (138, 34, 106), (163, 44, 97), (188, 55, 84), (210, 70, 68), (228, 90, 49), (241, 115, 29),
                   (249, 142, 9), (252, 172, 17), (249, 203, 53), (242, 234, 105), (252, 255, 164))

# Slicer's generic entry, used for a class whose card gives no terminology.
GENERIC_TERMINOLOGY = {"category": ("SCT", "85756007", "Tissue"), "type": ("SCT", "85756007", "Tissue")}
TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"


class CorrectionError(ValueError):
    """A segmentation cannot be exported as a training case; the message names the problem and the fix."""


# -- scene -----------------------------------------------------------------------------------------
def newScene():
    """A scene for plain slicer-core, set up as 3D Slicer sets up its own.

    Adds the default colour tables and registers the segmentations module logic (its binary-labelmap
    converter rules). The logics are kept on the scene object so they live as long as it does.
    3D Slicer and trame-slicer already provide such a scene (``slicer.mrmlScene``, ``SlicerApp().scene``).
    """
    scene = slicer.vtkMRMLScene()
    application = slicer.vtkSlicerApplicationLogic()
    application.SetMRMLScene(scene)
    application.GetColorLogic().SetMRMLScene(scene)
    application.GetColorLogic().AddDefaultColorNodes()
    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations.SetMRMLScene(scene)
    segmentations.SetMRMLApplicationLogic(application)
    scene.attnsegLogics = (application, segmentations)
    return scene


def _defaultScene():
    scene = getattr(slicer, "mrmlScene", None)
    if scene is None:
        raise RuntimeError("no MRML scene: outside 3D Slicer pass one, e.g. AttnSegLogic(newScene()) on "
                           "slicer-core or AttnSegLogic(SlicerApp().scene) in trame-slicer")
    return scene


# -- volume nodes <-> engine images ----------------------------------------------------------------
def matrixToArray(matrix: vtkMatrix4x4) -> np.ndarray:
    """vtkMatrix4x4 -> (4, 4) numpy array."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def arrayToMatrix(array: np.ndarray) -> vtkMatrix4x4:
    """(4, 4) numpy array -> vtkMatrix4x4."""
    matrix = vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def _ijkToWorldRas(node) -> np.ndarray:
    """4x4 IJK -> world RAS of a volume node, through its parent transform when that is linear."""
    matrix = vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    ijkToRas = matrixToArray(matrix)
    parent = node.GetParentTransformNode()
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise ImageError(f"volume {node.GetName()!r} is under a non-linear transform; harden the transform "
                             "(Data module, right-click > Harden transform) and segment again")
        toWorld = vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(toWorld)
        ijkToRas = matrixToArray(toWorld) @ ijkToRas
    return ijkToRas


def imageFromVolumeNode(node) -> Image:
    """An engine :class:`Image` (copied array, LPS geometry in world coordinates) from a scalar volume node."""
    imageData = node.GetImageData() if node is not None else None
    if imageData is None or imageData.GetPointData().GetScalars() is None:
        name = node.GetName() if node is not None else "None"
        raise ImageError(f"volume {name!r} holds no image data; load a volume first")
    scalars = imageData.GetPointData().GetScalars()
    if scalars.GetNumberOfComponents() != 1:
        raise ImageError(f"volume {node.GetName()!r} has {scalars.GetNumberOfComponents()} components per voxel; "
                         "AttnSeg needs one scalar volume per modality (split colour or vector volumes first)")
    size = imageData.GetDimensions()
    array = np.array(numpy_support.vtk_to_numpy(scalars)).reshape(tuple(reversed(size)))
    return Image(array, Geometry.from_ijk_to_ras(_ijkToWorldRas(node), size))


def volumeNodeFromImage(image: Image, scene, name: str, className: str = "vtkMRMLScalarVolumeNode",
                        displayNode=None):
    """A new volume node in ``scene`` holding a copy of a (D, H, W) ``image`` with its geometry
    (and ``displayNode``, observed before the image is attached, when given)."""
    if image.array.ndim != 3:
        raise ImageError(f"{name}: expected a (D, H, W) image, got shape {image.array.shape}")
    imageData = vtkImageData()
    imageData.SetDimensions(*image.geometry.size)
    array = np.ascontiguousarray(image.array)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    imageData.GetPointData().SetScalars(numpy_support.numpy_to_vtk(array.ravel(), deep=True))
    node = scene.AddNewNodeByClass(className, scene.GenerateUniqueName(name))
    node.SetIJKToRASMatrix(arrayToMatrix(image.geometry.ijk_to_ras()))
    if displayNode is not None:
        node.SetAndObserveDisplayNodeID(displayNode.GetID())
    node.SetAndObserveImageData(imageData)
    return node


def _orientedMask(geometry: Geometry, mask: np.ndarray):
    """A labelmap (``vtkOrientedImageData``, uint8, or uint16 for label values beyond 255) of a (D, H, W)
    ``mask`` (or label values) on ``geometry``."""
    oriented = slicer.vtkOrientedImageData()
    oriented.SetDimensions(*geometry.size)
    oriented.SetImageToWorldMatrix(arrayToMatrix(geometry.ijk_to_ras()))
    values = np.ascontiguousarray(mask, dtype=label_dtype(int(mask.max(initial=0)) + 1)).ravel()
    oriented.GetPointData().SetScalars(numpy_support.numpy_to_vtk(values, deep=True))
    return oriented


def volumeGeometry(node) -> Geometry:
    """The engine :class:`Geometry` of a volume node with image data (world coordinates), without copying
    its voxels."""
    imageData = node.GetImageData() if node is not None else None
    if imageData is None:
        raise ImageError(f"volume {node.GetName() if node is not None else 'None'!r} holds no image data; load a "
                         "volume first")
    return Geometry.from_ijk_to_ras(_ijkToWorldRas(node), imageData.GetDimensions())


def loadVolume(path: str | os.PathLike, scene=None, name: str | None = None):
    """Read a 3D image (NIfTI, NRRD, MHA, DICOM folder) into a new scalar volume node.

    Reading goes through the engine (SimpleITK), so the node's geometry is exactly what the command line
    and training see. ``scene`` defaults to ``slicer.mrmlScene``.
    """
    scene = scene if scene is not None else _defaultScene()
    node = volumeNodeFromImage(read_image(path), scene, name or case_name(path))
    node.CreateDefaultDisplayNodes()
    return node


def roiBoxFromNode(roiNode) -> Box:
    """A markups ROI node (world RAS, possibly rotated) as the engine's :class:`~AttnSegLib.localise.Box`
    (LPS mm)."""
    centre, size = [0.0] * 3, [0.0] * 3
    roiNode.GetCenterWorld(centre)
    roiNode.GetSizeWorld(size)
    rasToLps = np.diag([-1.0, -1.0, 1.0])
    axes = rasToLps @ matrixToArray(roiNode.GetObjectToWorldMatrix())[:3, :3]
    axes /= np.linalg.norm(axes, axis=0)
    box = Box.from_centre_size(rasToLps @ np.asarray(centre), size)
    return Box(box.centre, box.size, tuple(float(a) for a in axes.ravel()))


def roiNodeFromBox(box: Box, scene, name: str):
    """A new markups ROI node in ``scene`` covering the engine's ``box`` (LPS mm, possibly rotated); the
    inverse of :func:`roiBoxFromNode`."""
    lpsToRas = np.diag([-1.0, -1.0, 1.0])
    axes = lpsToRas @ box.axes_matrix  # columns: the box's axes in RAS
    if np.linalg.det(axes) < 0:  # a box is its own mirror image: keep the ROI's frame right-handed
        axes[:, 0] = -axes[:, 0]
    objectToNode = np.eye(4)
    objectToNode[:3, :3] = axes
    objectToNode[:3, 3] = lpsToRas @ np.asarray(box.centre)
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", scene.GenerateUniqueName(name))
    node.SetAndObserveObjectToNodeMatrix(arrayToMatrix(objectToNode))  # the centre and the axes
    node.SetSize(*box.size)
    node.CreateDefaultDisplayNodes()
    return node


# -- colours and terminology -----------------------------------------------------------------------
def colorScale(count: int = 256) -> np.ndarray:
    """(count, 3) RGB in [0, 1]: the inferno scale, linearly interpolated between its anchors."""
    anchors = np.asarray(INFERNO_ANCHORS, dtype=float) / 255.0
    positions = np.linspace(0.0, 1.0, len(anchors))
    samples = np.linspace(0.0, 1.0, count)
    return np.stack([np.interp(samples, positions, anchors[:, c]) for c in range(3)], axis=1)


def _code(value) -> str:
    """A terminology code as Slicer serialises it: ``scheme^value^meaning`` (empty parts allowed)."""
    if not value:
        return "^^"
    if isinstance(value, dict):
        value = (value.get("scheme", ""), value.get("code", ""), value.get("meaning", ""))
    scheme, code, meaning = (str(v) for v in value)
    return f"{scheme}^{code}^{meaning}"


def terminologyEntry(cls: dict) -> str:
    """Slicer's serialised terminology entry for a card class.

    The card's ``terminology`` is either that string already, or a dict with ``category`` and ``type``
    (and optionally ``typeModifier``, ``region``, ``regionModifier``), each a ``[scheme, code, meaning]``
    triple or ``{"scheme", "code", "meaning"}``. Without one, Slicer's generic "Tissue" entry is used
    and the class name stays the segment name.
    """
    terminology = cls.get("terminology") or GENERIC_TERMINOLOGY
    if isinstance(terminology, str):
        return terminology
    return "~".join([TERMINOLOGY_CONTEXT, _code(terminology.get("category")), _code(terminology.get("type")),
                     _code(terminology.get("typeModifier")), ANATOMIC_CONTEXT, _code(terminology.get("region")),
                     _code(terminology.get("regionModifier"))])


def setSegmentTerminology(segment, entry: str) -> None:
    """Store a serialised terminology entry on a ``vtkSegment``.

    ``vtkSegment.SetTerminology`` exists only from Slicer 5.10; it stores the entry as the tag named by
    ``vtkSegment.GetTerminologyEntryTagName()`` ("TerminologyEntry"), which is what this does in every
    Slicer from 5.6 on, with the same 7-part ``~``-separated format.
    """
    segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), entry)


def _classColor(cls: dict) -> tuple[float, float, float]:
    fallback = ((230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0))
    rgb = cls.get("color") or fallback[(int(cls["value"]) - 1) % len(fallback)]
    return tuple(float(c) / 255.0 for c in rgb[:3])


# -- results and review ----------------------------------------------------------------------------
@dataclass
class SegmentationResult:
    """What :meth:`AttnSegLogic.segment` added to the scene.

    ``mapNodes``: map name -> scalar volume node: ``probability.<class>`` per foreground class,
    ``uncertainty``, and the model's own maps (``difficulty``, ``spatial_attention.level1``...).
    """

    segmentationNode: object
    mapNodes: dict[str, object]
    modelLabelNode: object
    difficultyName: str
    inputNodes: list
    notices: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    classes: list[dict] = field(default_factory=list)  # what each label value means (the engine Result's)

    @property
    def difficultyNode(self):
        return self.mapNodes[self.difficultyName]


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
    """What a front end needs to draw a map's legend: the value range shown from the first to the last
    colour, the colour scale as (position in [0, 1], (r, g, b) 0-255) stops, and the value below which
    the map is not drawn (transparent)."""

    name: str
    meaning: str
    minimum: float
    maximum: float
    stops: tuple[tuple[float, tuple[int, int, int]], ...]
    transparentBelow: float


# -- running the network ---------------------------------------------------------------------------
@dataclass
class SegmentationJob:
    """Inputs copied out of MRML by :meth:`AttnSegLogic.prepare`; :meth:`run` touches no MRML.

    ``images``: one (D, H, W) :class:`Image` per modality, in the card's order. ``predictor`` is made
    for runs in this process only; a worker process (:class:`~AttnSegLib.worker_client.WorkerTask`)
    builds its own from ``package`` and ``device``.
    """

    package: ModelPackage
    images: list[Image]
    inputNodeIDs: list[str]
    device: str = "auto"
    predictor: Predictor | None = None
    roi: Box | None = None

    def run(self, progress=None, cancel=None) -> Result:
        """The engine's prediction; ``progress(fraction, eta_seconds, stage)``; ``cancel.is_set()``
        makes it raise :class:`Cancelled`."""
        if self.predictor is None:
            raise RuntimeError("this job was prepared for the worker process (inProcess=False); "
                               "run it with AttnSegLogic.startTask")
        return self.predictor.predict(self.images, progress=progress, cancel=cancel, roi=self.roi)


class SegmentationTask:
    """Runs a :class:`SegmentationJob` on a worker thread; poll :attr:`progress` and :meth:`done` from
    the UI thread (Slicer: a QTimer; trame: the server loop), then hand :meth:`result` to
    :meth:`AttnSegLogic.addResult` on the UI thread."""

    def __init__(self, job: SegmentationJob):
        self.job = job
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._progress: tuple[float, float | None, str] = (0.0, None, "starting")
        self._result: Result | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="AttnSeg segmentation", daemon=True)

    def start(self) -> "SegmentationTask":
        self._thread.start()
        return self

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelRequested(self) -> bool:
        return self._cancel.is_set()

    @property
    def progress(self) -> tuple[float, float | None, str]:
        """(fraction done, ETA in seconds or None, stage)."""
        with self._lock:
            return self._progress

    def done(self) -> bool:
        return not self._thread.is_alive() and (self._result is not None or self._error is not None)

    def wait(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return self.done()

    def result(self) -> Result:
        """The prediction; re-raises the worker's error (:class:`Cancelled` when cancelled)."""
        if not self.done():
            raise RuntimeError("the segmentation is still running; poll done() first")
        if self._error is not None:
            raise self._error
        return self._result

    def _report(self, fraction: float, eta: float | None, stage: str) -> None:
        with self._lock:
            self._progress = (fraction, eta, stage)

    def _work(self) -> None:
        try:
            self._result = self.job.run(progress=self._report, cancel=self._cancel)
            self._report(1.0, 0.0, "done")
        except BaseException as error:  # handed to the UI thread by result()
            self._error = error


# -- the logic -------------------------------------------------------------------------------------
class AttnSegLogic:
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
        self.activeSegmentationNode = None

    @property
    def scene(self):
        return self._scene if self._scene is not None else _defaultScene()

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
        training field of view)."""
        package = self.loadModel(model)
        names = [m["name"] for m in package.modalities]
        nodes = list(volumeNodes)
        if len(nodes) != len(names) or any(n is None for n in nodes):
            raise ValueError(f"model {package.name!r} needs {len(names)} input volume(s), one per modality "
                             f"({', '.join(names)}); got {sum(n is not None for n in nodes)}")
        images = [imageFromVolumeNode(n) for n in nodes]
        job = SegmentationJob(package, images, [n.GetID() for n in nodes], device,
                              roi=roiBoxFromNode(roiNode) if roiNode is not None else None)
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
        the engine would crop it; the user may move one and segment inside it (``roiNode``). A failed
        registration raises :class:`~AttnSegLib.localise.LocalisationError` and adds nothing."""
        _, placed = localise_targets(imageFromVolumeNode(volumeNode), self.loadModel(model).card)
        nodes = []
        for target, box in placed:
            node = roiNodeFromBox(box, self.scene, f"{target.side} {target.structure} ROI")
            node.SetAttribute(ATTRIBUTE + "Target", target.name)
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
            raise ValueError("an input volume was removed from the scene while segmenting; segment again")
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
        for name, image, meaning in self._mapImages(result, package):
            mapNodes[name] = self._addMapNode(segmentation, name, image, meaning, colorTable)
            yield name
        segmentation.SetNodeReferenceID(REF_DIFFICULTY, mapNodes[result.difficulty_name].GetID())
        self.activeSegmentationNode = segmentation
        return SegmentationResult(segmentation, mapNodes, modelLabel, result.difficulty_name, inputs,
                                  list(result.notices), dict(result.timings), dict(result.provenance),
                                  list(result.classes))

    def _newSegmentationNode(self, name: str, labels: Image, classes: list[dict], reference):
        segmentationNode = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(reference)
        segmentation = segmentationNode.GetSegmentation()
        labelmapName = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
        segmentation.SetSourceRepresentationName(labelmapName)
        # One labelmap holding the class values, shared by every segment (each reads its own label
        # value): the layout Slicer's own collapsing makes, without a pass over the volume per class.
        shared = _orientedMask(labels.geometry, labels.array)
        for cls in classes[1:]:
            segment = slicer.vtkSegment()
            segment.SetName(cls["name"])
            segment.SetColor(*_classColor(cls))
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
            "Architecture": package.card["architecture"]["name"],
            "Device": provenance.get("device", ""),
            "Versions": json.dumps(provenance.get("versions", {}), sort_keys=True),
            "Classes": json.dumps([{"value": c["value"], "name": c["name"]} for c in result.classes]),
            "Modalities": json.dumps([m["name"] for m in package.modalities]),
            "DifficultyMap": result.difficulty_name,
            "Provenance": json.dumps(provenance, sort_keys=True, default=str),
            "Created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        for key, value in attributes.items():
            segmentation.SetAttribute(ATTRIBUTE + key, str(value))

    @staticmethod
    def _mapImages(result: Result, package: ModelPackage):
        """(name, (D, H, W) image, meaning) of every map: class probabilities, then the result's maps."""
        probabilities = result.probabilities
        for cls in result.classes[1:]:
            yield (f"probability.{volume_name(cls['name'])}", Image(probabilities.array[cls["value"]],
                                                                    probabilities.geometry),
                   PROBABILITY_MEANING.format(name=cls["name"]))
        for name, image in result.maps.items():
            meaning = UNCERTAINTY_MEANING if name == "uncertainty" else \
                package.maps.get(name.split(".")[0], {}).get("meaning", "")
            yield name, image, meaning

    def _addMapNode(self, segmentation, name: str, image: Image, meaning: str, colorTable):
        """A map volume node with its own display node: window fixed before the image is attached, so
        Slicer computes no automatic window/level (a histogram of the whole volume)."""
        scene = self.scene
        display = scene.AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode")
        display.SetAutoWindowLevel(False)
        display.SetWindowLevelMinMax(*self._displayRange(name, image.array))
        display.SetAndObserveColorNodeID(colorTable.GetID())
        node = volumeNodeFromImage(image.with_array(image.array.astype(np.float32, copy=False)), scene,
                                   f"{segmentation.GetName()} {name}", displayNode=display)
        node.SetAttribute(ATTRIBUTE + "MapName", name)
        node.SetAttribute(ATTRIBUTE + "MapMeaning", meaning)
        node.SetNodeReferenceID(REF_SEGMENTATION, segmentation.GetID())
        segmentation.AddNodeReferenceID(REF_MAP, node.GetID())
        return node

    @staticmethod
    def _displayRange(name: str, values: np.ndarray) -> tuple[float, float]:
        """[0, 1] for probabilities and the unit-range maps; else the 0.5-99.5 percentile range."""
        if name.startswith("probability.") or name.split(".")[0] in UNIT_RANGE_MAPS:
            return 0.0, 1.0
        low, high = (float(v) for v in np.percentile(values, [0.5, 99.5]))
        return (low, high) if high > low else (low, low + 1e-6)

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
            raise ValueError("no AttnSeg segmentation selected; segment first or pick one AttnSeg created")
        return node

    def inputNodes(self, segmentationNode=None) -> list:
        return self._referenced(self._resolve(segmentationNode), REF_INPUT)

    def mapNodes(self, segmentationNode=None) -> dict[str, object]:
        """Map name -> map volume node of an AttnSeg segmentation (in the order they were made)."""
        nodes = self._referenced(self._resolve(segmentationNode), REF_MAP)
        return {n.GetAttribute(ATTRIBUTE + "MapName"): n for n in nodes if n is not None}

    def difficultyNode(self, segmentationNode=None):
        node = self._resolve(segmentationNode).GetNodeReference(REF_DIFFICULTY)
        if node is None:
            raise ValueError("the review map of this segmentation was deleted; segment again to review it")
        return node

    def reviewMapName(self, segmentationNode=None) -> str:
        """The name of the review map (``difficultyNode``), e.g. ``uncertainty``, as the page names it."""
        return self._resolve(segmentationNode).GetAttribute(ATTRIBUTE + "DifficultyMap") or "review map"

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
        low, high = display.GetWindowLevelMin(), display.GetWindowLevelMax()
        anchors = INFERNO_ANCHORS
        stops = tuple((i / (len(anchors) - 1), tuple(int(c) for c in rgb)) for i, rgb in enumerate(anchors))
        return MapLegend(mapNode.GetAttribute(ATTRIBUTE + "MapName") or mapNode.GetName(),
                         mapNode.GetAttribute(ATTRIBUTE + "MapMeaning") or "", float(low), float(high), stops,
                         float(low + TRANSPARENT_BELOW * (high - low)))

    # -- review ---------------------------------------------------------------------------------
    def doubtfulRegions(self, segmentationNode=None, threshold: float = 0.5,
                        minimumVolumeMl: float = MIN_VOLUME_ML) -> list[Region]:
        """Every region where the review map (``difficultyNode``) is >= ``threshold`` and at least
        ``minimumVolumeMl`` large, nearby fragments merged, most doubtful first (see
        :mod:`AttnSegLib.review`)."""
        reviewMap = self.difficultyNode(segmentationNode)
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
        node.SetAttribute(ATTRIBUTE + "ReviewThreshold", repr(float(threshold)))
        node.SetAttribute(ATTRIBUTE + "ReviewIndex", str(index))
        return DoubtfulRegion(index, len(regions), regions[index])

    def centerSliceViews(self, ras) -> None:
        """Move every slice view so that it passes through, and is centred on, the RAS point."""
        for sliceNode in self._nodesByClass("vtkMRMLSliceNode"):
            sliceNode.JumpSliceByCentering(*(float(v) for v in ras))

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
    def segmentEditorNode(self):
        """The Segment Editor module's parameter node (singleton tag ``SegmentEditor``), made if absent."""
        scene = self.scene
        node = scene.GetSingletonNode("SegmentEditor", "vtkMRMLSegmentEditorNode")
        if node is None:
            node = slicer.vtkMRMLSegmentEditorNode()
            node.SetSingletonTag("SegmentEditor")
            node = scene.AddNode(node)
        return node

    def restrictEditingToDoubtfulVoxels(self, segmentationNode=None, threshold: float = 0.5,
                                        segmentEditorNode=None) -> None:
        """Let Segment Editor effects change only voxels where the review map is >= ``threshold``.

        The doubtful voxels become a hidden segment, "Doubtful regions", and the editor's editable area
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
        """(Re)make the hidden "Doubtful regions" segment: review map >= ``threshold``, on the map's grid."""
        difficulty = imageFromVolumeNode(self.difficultyNode(node))
        segmentation = node.GetSegmentation()
        if segmentation.GetSegment(DOUBTFUL_SEGMENT_ID) is not None:
            segmentation.RemoveSegment(DOUBTFUL_SEGMENT_ID)
        segment = slicer.vtkSegment()
        segment.SetName(DOUBTFUL_SEGMENT_NAME)
        segment.SetColor(1.0, 1.0, 1.0)
        segment.SetTag(ATTRIBUTE + "DoubtThreshold", repr(float(threshold)))
        segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(),
                                  _orientedMask(difficulty.geometry, difficulty.array >= threshold))
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
        """Write the corrected case in the layout ``training/`` reads (layout ``corrected``)::

            <outputDir>/<case>/image_0000.nii.gz ...   one per modality, in the card's order
                               label.nii.gz            the corrected segmentation (class values)
                               model_label.nii.gz      the model's own output
                               difference.nii.gz       1 where the correction differs from the model
                               review_map.nii.gz       the review map (the map doubtful regions are ranked by)
                               case.json               model name and hash, class names, provenance,
                                                       refinement clicks (attribute ``Clicks``)

        The case folder is written beside its final place and moved in whole. An existing case is
        replaced only with ``overwrite=True`` (else :class:`FileExistsError`). Returns the case folder.
        """
        node = self._resolve(segmentationNode)
        inputs = self.inputNodes(node)
        if not inputs or any(n is None for n in inputs):
            raise CorrectionError("an input volume of this segmentation was deleted; reload it and segment again")
        label = self.correctedLabels(node)
        modelLabel = imageFromVolumeNode(self.modelLabelNode(node))
        reviewMap = imageFromVolumeNode(self.difficultyNode(node))
        case = _safeCaseName(caseName or inputs[0].GetName())
        target = Path(outputDir) / case
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} already holds a case; choose another case name or overwrite it")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{case}.", dir=target.parent))
        try:
            for index, volume in enumerate(inputs):
                write_image(imageFromVolumeNode(volume), staging / f"image_{index:04d}.nii.gz")
            difference = (label.array != modelLabel.array).astype(np.uint8)
            write_image(label, staging / "label.nii.gz")
            write_image(modelLabel.with_array(modelLabel.array.astype(label.array.dtype)), staging / "model_label.nii.gz")
            write_image(label.with_array(difference), staging / "difference.nii.gz")
            write_image(reviewMap.with_array(reviewMap.array.astype(np.float32)), staging / "review_map.nii.gz")
            record = self._caseRecord(node, case, inputs, label, difference)
            (staging / "case.json").write_text(json.dumps(record, indent=2) + "\n")
            apply_umask(staging)  # mkdtemp makes it 0700: the case folder gets the user's usual mode
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    @staticmethod
    def _caseRecord(node, case: str, inputs: list, label: Image, difference: np.ndarray) -> dict:
        classes = json.loads(node.GetAttribute(ATTRIBUTE + "Classes"))
        voxel = label.geometry.voxel_volume_ml
        counts = np.bincount(label.array.ravel(), minlength=len(classes))
        return {
            "case": case,
            "model_name": node.GetAttribute(ATTRIBUTE + "Model"),
            "model_sha256": node.GetAttribute(ATTRIBUTE + "ModelSha256"),
            "architecture": node.GetAttribute(ATTRIBUTE + "Architecture"),
            "class_names": [c["name"] for c in classes],
            "classes": classes,
            "modalities": json.loads(node.GetAttribute(ATTRIBUTE + "Modalities")),
            "input_volumes": [n.GetName() for n in inputs],
            "difficulty_map": node.GetAttribute(ATTRIBUTE + "DifficultyMap"),
            "changed_voxels": int(difference.sum()),
            "changed_ml": round(float(difference.sum()) * voxel, 4),
            "class_volumes_ml": {c["name"]: round(float(counts[c["value"]]) * voxel, 4) for c in classes[1:]},
            "provenance": json.loads(node.GetAttribute(ATTRIBUTE + "Provenance") or "{}"),
            # refinement clicks ({"position_lps": [x, y, z], "class": name}), set by whoever applies them
            "clicks": json.loads(node.GetAttribute(ATTRIBUTE + "Clicks") or "[]"),
            "exported_by": f"AttnSeg {__version__}",
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }


def _safeCaseName(name: str) -> str:
    """A folder name from a node name: letters, digits, '.', '_' and '-' only."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return safe or "case"

"""MRML nodes <-> engine images: volume, label-map and ROI nodes converted to and from
:class:`~AttnSegLib.image.Image` and :class:`~AttnSegLib.localise.Box`, colour scales and segment
terminology, and a plain slicer-core scene set up as 3D Slicer sets up its own.

Geometry: a volume's IJK-to-RAS matrix (and its parent transform, when linear) is converted to the
engine's LPS :class:`~AttnSegLib.image.Geometry`, so any orientation and spacing is handled.
Every Slicer call here exists in every supported release, 5.6.2 to 5.12.3 (``Testing/test_slicer_api.py``).
"""
from __future__ import annotations

import os

import numpy as np
import slicer
from vtkmodules.util import numpy_support
from vtkmodules.vtkCommonDataModel import vtkImageData
from vtkmodules.vtkCommonMath import vtkMatrix4x4

from .image import Geometry, Image, ImageError, case_name, label_dtype, read_image, text_name
from .localise import Box

# Perceptually uniform "inferno" colour scale (matplotlib), sampled at 17 equally spaced points.
INFERNO_ANCHORS = ((0, 0, 4), (11, 7, 36), (33, 12, 74), (61, 9, 101), (87, 16, 110), (113, 25, 110),
                   (138, 34, 106), (163, 44, 97), (188, 55, 84), (210, 70, 68), (228, 90, 49), (241, 115, 29),
                   (249, 142, 9), (252, 172, 17), (249, 203, 53), (242, 234, 105), (252, 255, 164))

# Slicer's generic entry, used for a class whose card gives no terminology.
GENERIC_TERMINOLOGY = {"category": ("SCT", "85756007", "Tissue"), "type": ("SCT", "85756007", "Tissue")}
TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"


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


def segmentEditorNode(scene):
    """The Segment Editor module's parameter node of ``scene`` (singleton tag ``SegmentEditor``, as
    Modules/Scripted/SegmentEditor/SegmentEditor.py finds it from 5.6 to 5.12), made if absent. Needs no
    engine: the Slicer panel gives it to its editor before torch is installed."""
    node = scene.GetSingletonNode("SegmentEditor", "vtkMRMLSegmentEditorNode")
    if node is None:
        node = slicer.vtkMRMLSegmentEditorNode()
        node.SetSingletonTag("SegmentEditor")
        node = scene.AddNode(node)
    return node


def defaultScene():
    scene = getattr(slicer, "mrmlScene", None)
    if scene is None:
        raise RuntimeError("no MRML scene: outside 3D Slicer pass one, e.g. SceneLogic(newScene()) on "
                           "slicer-core or SceneLogic(SlicerApp().scene) in trame-slicer")
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
    node = scene.AddNewNodeByClass(className, scene.GenerateUniqueName(text_name(name)))
    node.SetIJKToRASMatrix(arrayToMatrix(image.geometry.ijk_to_ras()))
    if displayNode is not None:
        node.SetAndObserveDisplayNodeID(displayNode.GetID())
    node.SetAndObserveImageData(imageData)
    return node


def orientedMask(geometry: Geometry, mask: np.ndarray):
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
    scene = scene if scene is not None else defaultScene()
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


def classColor(cls: dict) -> tuple[float, float, float]:
    fallback = ((230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0))
    rgb = cls.get("color") or fallback[(int(cls["value"]) - 1) % len(fallback)]
    return tuple(float(c) / 255.0 for c in rgb[:3])

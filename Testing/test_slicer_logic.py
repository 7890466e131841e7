"""The Qt-free Slicer logic on real MRML (slicer-core, and trame-slicer's scene) with real volumes.

Plumbing tests use small untrained networks saved as real packages: their outputs are arbitrary but
deterministic, which is what geometry, references, review and export need. What a trained network must
get right is tested with the shipped default package.
"""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import torch
from vtkmodules.util import numpy_support
from vtkmodules.vtkCommonCore import reference as vtkReference
from vtkmodules.vtkCommonMath import vtkMatrix4x4

from AttnSegLib import models
from AttnSegLib.image import Geometry, Image, ImageError, read_image
from AttnSegLib.inference import Predictor
from AttnSegLib.metrics import evaluate_labels
from AttnSegLib.outputs import class_volumes_ml, information_note, map_meanings, negligible_uncertainty
from AttnSegLib.package import default_package, save_package
from AttnSegLib.mrml import arrayToMatrix, colorScale, imageFromVolumeNode, matrixToArray, newScene, volumeNodeFromImage
from AttnSegLib.review import editable_mask
from AttnSegLib.segmentation_task import SegmentationTask
from AttnSegLib.slicer_logic import (ATTRIBUTE, DOUBTFUL_SEGMENT_ID, REF_INPUT, REF_MAP, REF_REVIEW_MAP, REF_SEGMENTATION,
                                     Cancelled, CorrectionError, SceneLogic)
from AttnSegLib.screenshot import render_review
from conftest import REPO

SAMPLE_IMAGE = REPO / "Resources" / "SampleData" / "hippocampus_001_image.nii.gz"
SAMPLE_LABEL = REPO / "Resources" / "SampleData" / "hippocampus_001_label.nii.gz"
HIPPOCAMPUS_CLASSES = [
    {"value": 0, "name": "background", "color": [0, 0, 0]},
    {"value": 1, "name": "Anterior", "color": [230, 159, 0],
     "terminology": {"category": ["SCT", "123037004", "Anatomical Structure"],
                     "type": ["SCT", "5366008", "Hippocampus"]}},
    {"value": 2, "name": "Posterior", "color": [86, 180, 233]},
]
BRATS_CLASSES = [{"value": 0, "name": "background"}, {"value": 1, "name": "Necrosis"}, {"value": 2, "name": "Edema"},
                 {"value": 3, "name": "Non-enhancing"}, {"value": 4, "name": "Enhancing"}]


def _untrained_package(folder, architecture, kwargs, modalities, classes, name):
    torch.manual_seed(0)
    network = models.build(architecture, len(modalities), len(classes), **kwargs)
    card = {"name": name, "description": "untrained, for plumbing tests",
            "architecture": {"name": architecture, "kwargs": kwargs}, "modalities": modalities,
            "classes": classes, "patch_size_dhw": [16, 32, 16], "spacing_xyz_mm": [1.0, 1.0, 1.0],
            "orientation": "RAS", "inference": {"overlap": 0.25, "batch_size": 2},
            "maps": {k: {"meaning": v} for k, v in network.map_descriptions().items()}}
    return save_package(folder, card, network.state_dict())


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def plumbing_package(tmp_path_factory):
    """Untrained difficulty-aware network (learned difficulty and confidence maps), one T1 input."""
    return _untrained_package(tmp_path_factory.mktemp("packages") / "plumbing", "difficulty_aware",
                              {"base_features": 4, "depth": 3},
                              [{"name": "T1", "contrast": "T1-weighted MRI", "normalization": "zscore"}],
                              HIPPOCAMPUS_CLASSES, "plumbing")


@pytest.fixture(scope="session")
def two_modality_package(tmp_path_factory):
    return _untrained_package(tmp_path_factory.mktemp("packages") / "brats", "unet", {"features": [4, 8]},
                              [{"name": "Flair", "normalization": "zscore"},
                               {"name": "T1c", "normalization": "zscore"}],
                              BRATS_CLASSES, "plumbing_brats")


@pytest.fixture(scope="session")
def engine_result(plumbing_package):
    """The engine's own prediction on the sample, which the MRML path must reproduce."""
    return Predictor(plumbing_package, device="cpu").predict([read_image(SAMPLE_IMAGE)])


@pytest.fixture()
def scene():
    return newScene()


@pytest.fixture()
def logic(scene):
    return SceneLogic(scene)


@pytest.fixture()
def segmented(logic, plumbing_package):
    volume = logic.loadVolume(SAMPLE_IMAGE)
    return volume, logic.segment([volume], plumbing_package, device="cpu")


def _ijk_to_ras(node) -> np.ndarray:
    matrix = vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return matrixToArray(matrix)


def _on_grid(labels: Image, grid: Image) -> np.ndarray:
    """``labels`` resampled (nearest neighbour, through physical space) onto ``grid``'s voxels."""
    moved = sitk.Resample(labels.to_sitk(), grid.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(moved)


def _oriented(image: Image, mask: np.ndarray):
    oriented = slicer.vtkOrientedImageData()
    oriented.SetDimensions(*image.geometry.size)
    oriented.SetImageToWorldMatrix(arrayToMatrix(image.geometry.ijk_to_ras()))
    oriented.GetPointData().SetScalars(numpy_support.numpy_to_vtk(mask.astype(np.uint8).ravel(), deep=True))
    return oriented


def _paint(scene, segmentation, segment_id, mask_image: Image, source, remove=False, editor=None):
    """Change a segment as the Segment Editor does (vtkSlicerSegmentEditorLogic), masking included."""
    if editor is None:
        editor = slicer.vtkMRMLSegmentEditorNode()
        scene.AddNode(editor)
        editor.SetAndObserveSegmentationNode(segmentation)
        editor.SetAndObserveSourceVolumeNode(source)
    editor_logic = slicer.vtkSlicerSegmentEditorLogic()
    editor_logic.SetMRMLScene(scene)
    editor_logic.SetSegmentEditorNode(editor)
    editor.SetSelectedSegmentID(segment_id)
    mode = editor_logic.ModificationModeRemove if remove else editor_logic.ModificationModeAdd
    editor_logic.ModifySegmentByLabelmap(segmentation, segment_id, _oriented(mask_image, mask_image.array),
                                         mode, [0, -1, 0, -1, 0, -1], False, False)


def _box(shape, start, stop) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in zip(start, stop))] = True
    return mask


# -- volume nodes and geometry ---------------------------------------------------------------------
def test_loaded_volume_matches_the_file_voxel_for_voxel(logic):
    node = logic.loadVolume(SAMPLE_IMAGE)
    on_disk = read_image(SAMPLE_IMAGE)
    image = imageFromVolumeNode(node)
    np.testing.assert_array_equal(image.array, on_disk.array)
    assert image.geometry.same_grid(on_disk.geometry, tolerance=1e-9)
    np.testing.assert_allclose(_ijk_to_ras(node), on_disk.geometry.ijk_to_ras(), atol=1e-9)
    assert node.GetName() == "hippocampus_001_image" and node.GetDisplayNode() is not None


def test_oblique_anisotropic_geometry_round_trips_through_a_node(scene):
    angle = np.deg2rad(25)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    direction = rotation @ np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]])  # also permuted and flipped
    geometry = Geometry((7, 5, 3), (0.7, 1.3, 2.9), (12.5, -40.0, 7.25), tuple(direction.ravel()))
    image = Image(np.arange(105, dtype=np.int16).reshape(3, 5, 7), geometry)
    back = imageFromVolumeNode(volumeNodeFromImage(image, scene, "oblique"))
    np.testing.assert_array_equal(back.array, image.array)
    assert back.array.dtype == np.int16
    np.testing.assert_allclose(back.geometry.spacing, geometry.spacing, atol=1e-12)
    np.testing.assert_allclose(back.geometry.origin, geometry.origin, atol=1e-12)
    np.testing.assert_allclose(back.geometry.direction, geometry.direction, atol=1e-12)


def test_a_linear_parent_transform_moves_the_input_into_world_coordinates(logic, scene):
    node = logic.loadVolume(SAMPLE_IMAGE)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = vtkMatrix4x4()
    shift.SetElement(0, 3, 10.0)  # 10 mm to the right
    transform.SetMatrixTransformToParent(shift)
    node.SetAndObserveTransformNodeID(transform.GetID())
    local = read_image(SAMPLE_IMAGE).geometry
    world = imageFromVolumeNode(node).geometry
    np.testing.assert_allclose(np.subtract(world.origin, local.origin), [-10.0, 0.0, 0.0], atol=1e-9)  # LPS x = -R


def test_a_volume_without_image_data_is_refused_with_a_clear_message(scene):
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(ImageError, match="'empty' holds no image data"):
        imageFromVolumeNode(empty)


def test_default_scene_is_slicer_mrml_scene(monkeypatch, plumbing_package):
    monkeypatch.delattr(slicer, "mrmlScene", raising=False)
    with pytest.raises(RuntimeError, match="no MRML scene"):
        SceneLogic().scene
    scene = newScene()
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    logic = SceneLogic()
    volume = logic.loadVolume(SAMPLE_IMAGE)
    assert volume.GetScene() is scene
    assert logic.segment([volume], plumbing_package, device="cpu").segmentationNode.GetScene() is scene


# -- the segmentation node --------------------------------------------------------------------------
def test_segments_are_named_coloured_coded_and_match_the_engine(segmented, engine_result):
    volume, result = segmented
    segmentation = result.segmentationNode.GetSegmentation()
    segments = [segmentation.GetNthSegment(i) for i in range(segmentation.GetNumberOfSegments())]
    assert [s.GetName() for s in segments] == ["Anterior", "Posterior"]
    assert segmentation.GetNumberOfLayers() == 1 and [s.GetLabelValue() for s in segments] == [1, 2]
    np.testing.assert_allclose(segments[0].GetColor(), np.array([230, 159, 0]) / 255)
    tag = vtkReference("")  # the tag every Slicer from 5.6 reads; GetTerminology (5.10+) reads the same
    assert segments[0].GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), tag)
    assert str(tag) == segments[0].GetTerminology() and str(tag).count("~") == 6
    entry = slicer.vtkSlicerTerminologyEntry()
    assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(str(tag), entry)
    assert (entry.GetCategoryObject().GetCodeValue(), entry.GetTypeObject().GetCodeValue()) == ("123037004", "5366008")
    assert entry.GetTypeObject().GetCodingSchemeDesignator() == "SCT"
    assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(segments[1].GetTerminology(), entry)
    assert entry.GetTypeObject().GetCodeMeaning() == "Tissue"  # no code in the card: Slicer's generic entry

    logic_labels = SceneLogic(volume.GetScene()).correctedLabels(result.segmentationNode)
    np.testing.assert_array_equal(logic_labels.array, engine_result.labels.array)
    assert logic_labels.geometry.same_grid(read_image(SAMPLE_IMAGE).geometry)



def test_an_ensemble_package_segments_by_name_with_its_disagreement_map(logic):
    """The shipped ensemble card goes through the same logic as one network: a map node for its
    members' disagreement beside the uncertainty, and the segments of its classes."""
    volume = logic.loadVolume(SAMPLE_IMAGE)
    result = logic.segment([volume], "hippocampus_ensemble", device="cpu")
    assert {"uncertainty", "disagreement"} <= set(result.mapNodes) and result.reviewMapName == "uncertainty"
    disagreement = imageFromVolumeNode(result.mapNodes["disagreement"]).array
    assert disagreement.min() >= 0.0 and 0.0 < disagreement.max() <= 1.0
    assert result.segmentationNode.GetSegmentation().GetNumberOfSegments() == 2
    assert result.segmentationNode.GetAttribute(ATTRIBUTE + "Model") == "hippocampus_ensemble"
    assert result.segmentationNode.GetAttribute(ATTRIBUTE + "Architecture") == "ensemble"

def test_provenance_is_stored_on_the_segmentation_node(segmented, plumbing_package, scene):
    _, result = segmented
    node = result.segmentationNode
    assert SceneLogic.isAttnSegSegmentation(node)
    assert not SceneLogic.isAttnSegSegmentation(scene.AddNewNodeByClass("vtkMRMLSegmentationNode"))
    assert node.GetAttribute(ATTRIBUTE + "Model") == "plumbing"
    assert node.GetAttribute(ATTRIBUTE + "ModelSha256") == plumbing_package.sha256
    assert node.GetAttribute(ATTRIBUTE + "Architecture") == "difficulty_aware"
    assert node.GetAttribute(ATTRIBUTE + "Device") == "cpu"
    versions = json.loads(node.GetAttribute(ATTRIBUTE + "Versions"))
    assert versions["torch"] == torch.__version__ and versions["attnseg"]
    assert json.loads(node.GetAttribute(ATTRIBUTE + "Provenance"))["weights_sha256"] == plumbing_package.sha256


def test_map_nodes_have_references_colours_ranges_and_the_engine_values(segmented, engine_result, scene,
                                                                         plumbing_package):
    volume, result = segmented
    seg = result.segmentationNode
    assert list(result.mapNodes) == ["probability.anterior", "probability.posterior", "uncertainty", "confidence",
                                     "difficulty"]
    assert result.reviewMapName == "difficulty"
    assert seg.GetNodeReference(REF_REVIEW_MAP) is result.mapNodes["difficulty"]
    assert [seg.GetNthNodeReference(REF_MAP, i) for i in range(seg.GetNumberOfNodeReferences(REF_MAP))] == \
        list(result.mapNodes.values())
    assert seg.GetNodeReference(REF_INPUT) is volume
    engine = engine_result
    color_tables = set()
    for name, node in result.mapNodes.items():
        assert node.IsA("vtkMRMLScalarVolumeNode") and not node.IsA("vtkMRMLLabelMapVolumeNode")
        assert node.GetNodeReference(REF_SEGMENTATION) is seg
        np.testing.assert_allclose(_ijk_to_ras(node), _ijk_to_ras(volume), atol=1e-9)
        display = node.GetDisplayNode()
        color_tables.add(display.GetColorNodeID())
        values = imageFromVolumeNode(node).array
        if name.startswith("probability."):
            np.testing.assert_allclose(values, engine.probabilities.array[1 if name.endswith("anterior") else 2],
                                       atol=1e-6)
        else:
            np.testing.assert_allclose(values, engine.maps[name].array, atol=1e-6)
        if name in ("probability.anterior", "difficulty"):
            assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (0.0, 1.0)
        if name == "uncertainty":  # from the doubt of a label given 99 %
            assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == \
                pytest.approx((negligible_uncertainty(len(engine.classes)), 1.0), abs=1e-4)
        assert node.GetAttribute(ATTRIBUTE + "MapMeaning")
    # The names and meanings `attnseg segment` writes into report.json (the same description of a run).
    assert {name: node.GetAttribute(ATTRIBUTE + "MapMeaning") for name, node in result.mapNodes.items()} == \
        map_meanings(engine, plumbing_package.card)
    assert len(color_tables) == 1
    table = scene.GetNodeByID(color_tables.pop())
    assert table.GetNumberOfColors() == 256 and table.GetName() == "AttnSeg inferno"
    rgba = [0.0] * 4
    alphas = []
    for index in range(256):
        table.GetColor(index, rgba)
        alphas.append(rgba[3])
    assert alphas[:5] == [0.0] * 5 and set(alphas[6:]) == {1.0}  # below 2 % of the range: not drawn


def _overlay_rgba(node) -> np.ndarray:
    """(V, 4) uint8 RGBA of a map volume node's voxels through Slicer's own display pipeline
    (vtkMRMLScalarVolumeDisplayNode: window/level, colour table, alpha)."""
    display = node.GetDisplayNode()
    display.SetInputImageDataConnection(node.GetImageDataConnection())
    display.UpdateImageDataPipeline()
    producer = display.GetOutputImageDataConnection().GetProducer()
    producer.Update()
    return numpy_support.vtk_to_numpy(producer.GetOutputDataObject(0).GetPointData().GetScalars())


def test_a_map_overlay_is_transparent_where_the_map_is_near_zero(segmented):
    """Slicer's own display pipeline (vtkMRMLScalarVolumeDisplayNode: window/level, colour table, alpha)
    gives alpha 0 to voxels below 2 % of the displayed range, so the overlay leaves the anatomy there."""
    _, result = segmented
    node = result.mapNodes["probability.anterior"]
    rgba = _overlay_rgba(node)
    values = imageFromVolumeNode(node).array.ravel()
    assert rgba.shape[1] == 4
    low, high = values < 0.015, values > 0.03
    assert low.any() and high.any()
    assert (rgba[low, 3] == 0).all() and (rgba[high, 3] == 255).all()


def test_colour_scale_is_matplotlibs_inferno():
    from matplotlib import colormaps

    reference = colormaps["inferno"](np.linspace(0, 1, 256))[:, :3]
    assert np.abs(colorScale(256) - reference).max() < 0.03


# -- orientations, spacings, modalities -----------------------------------------------------------
@pytest.mark.parametrize("orientation", ["LPS", "PIR", "SAL"])
def test_a_reoriented_copy_gives_the_same_segmentation_in_physical_space(logic, scene, plumbing_package,
                                                                         engine_result, orientation):
    original = read_image(SAMPLE_IMAGE)
    reoriented = Image.from_sitk(sitk.DICOMOrient(original.to_sitk(), orientation))
    assert not reoriented.geometry.same_grid(original.geometry)
    result = logic.segment([volumeNodeFromImage(reoriented, scene, f"copy {orientation}")], plumbing_package,
                           device="cpu")
    labels = logic.correctedLabels(result.segmentationNode)
    assert labels.geometry.same_grid(reoriented.geometry)  # results live on the input's own grid
    np.testing.assert_array_equal(_on_grid(labels, engine_result.labels), engine_result.labels.array)
    difficulty = imageFromVolumeNode(result.reviewMapNode).to_sitk()
    expected = engine_result.maps["difficulty"]
    resampled = sitk.Resample(difficulty, expected.to_sitk(), sitk.Transform(), sitk.sitkLinear)
    np.testing.assert_allclose(sitk.GetArrayFromImage(resampled), expected.array, atol=1e-5)


def test_an_anisotropic_oblique_input_gets_results_on_its_own_grid(logic, scene, plumbing_package):
    image = read_image(SAMPLE_IMAGE)
    rotation = sitk.Euler3DTransform((0, 0, 0), 0.0, 0.0, np.deg2rad(15))
    reference = sitk.Image([35, 51, 18], sitk.sitkUInt8)
    reference.SetSpacing((1.0, 1.0, 2.0))
    reference.SetDirection(tuple(np.asarray(rotation.GetMatrix())))
    centre = image.geometry.ijk_to_lps() @ np.array([17, 25, 17, 1.0])
    reference.SetOrigin(tuple(centre[:3] - np.asarray(rotation.GetMatrix()).reshape(3, 3) @ [17, 25, 17]))
    oblique = Image.from_sitk(sitk.Resample(image.to_sitk(), reference, sitk.Transform(), sitk.sitkLinear, 0))
    node = volumeNodeFromImage(oblique, scene, "oblique")
    result = logic.segment([node], plumbing_package, device="cpu")
    labels = logic.correctedLabels(result.segmentationNode)
    assert labels.geometry.same_grid(oblique.geometry)
    for map_node in result.mapNodes.values():
        np.testing.assert_allclose(_ijk_to_ras(map_node), _ijk_to_ras(node), atol=1e-9)
    assert any("resampled" in n for n in result.notices)


def _brats_crop(path, start=(90, 90, 50), size=(48, 48, 48)) -> Image:
    return Image.from_sitk(sitk.RegionOfInterest(read_image(path).to_sitk(), list(size), list(start)))


def test_multimodal_input_one_node_per_modality(logic, scene, two_modality_package, data_dir):
    case = data_dir / "brats_sample" / "brats_2013_pat0003_1"
    t1c = volumeNodeFromImage(_brats_crop(case / "T1c_subtrMeanDivStd.nii.gz"), scene, "pat0003 T1c")
    flair = volumeNodeFromImage(_brats_crop(case / "Flair_subtrMeanDivStd.nii.gz"), scene, "pat0003 Flair")
    assert logic.guessInputVolumes(two_modality_package) == [flair, t1c]
    with pytest.raises(ValueError, match=r"needs 2 input volume\(s\), one per modality \(Flair, T1c\); got 1"):
        logic.segment([flair], two_modality_package, device="cpu")
    result = logic.segment([flair, t1c], two_modality_package, device="cpu")
    seg = result.segmentationNode
    assert [seg.GetNthNodeReference(REF_INPUT, i) for i in range(2)] == [flair, t1c]
    segmentation = seg.GetSegmentation()
    assert [segmentation.GetNthSegment(i).GetName() for i in range(4)] == \
        ["Necrosis", "Edema", "Non-enhancing", "Enhancing"]
    assert {n for n in result.mapNodes if n.startswith("probability.")} == \
        {"probability.necrosis", "probability.edema", "probability.non_enhancing", "probability.enhancing"}
    engine = Predictor(two_modality_package, device="cpu").predict([imageFromVolumeNode(flair),
                                                                     imageFromVolumeNode(t1c)])
    np.testing.assert_array_equal(logic.correctedLabels(seg).array, engine.labels.array)
    swapped = Predictor(two_modality_package, device="cpu").predict([imageFromVolumeNode(t1c),
                                                                      imageFromVolumeNode(flair)])
    assert not np.array_equal(swapped.probabilities.array, engine.probabilities.array)  # order matters


# -- runs never overwrite, and can be cancelled --------------------------------------------------
def test_every_run_makes_a_new_node_and_an_edited_segmentation_is_left_alone(logic, scene, segmented,
                                                                              plumbing_package):
    volume, first = segmented
    before = logic.correctedLabels(first.segmentationNode)
    block = _box(before.array.shape, (10, 20, 10), (20, 30, 20))
    _paint(scene, first.segmentationNode, "posterior", before.with_array(block), volume)
    edited = logic.correctedLabels(first.segmentationNode).array
    assert (edited[block] == 2).all() and not np.array_equal(edited, before.array)
    second = logic.segment([volume], plumbing_package, device="cpu")
    assert second.segmentationNode is not first.segmentationNode
    assert second.segmentationNode.GetName() != first.segmentationNode.GetName()
    np.testing.assert_array_equal(logic.correctedLabels(first.segmentationNode).array, edited)
    np.testing.assert_array_equal(logic.correctedLabels(second.segmentationNode).array, before.array)
    assert logic.activeSegmentationNode is second.segmentationNode
    # What the page asks about before replacing a result: the voxels the user changed.
    assert logic.correctedVoxelCount(second.segmentationNode) == 0
    assert logic.correctedVoxelCount(first.segmentationNode) >= int((before.array[block] != 2).sum()) > 0


def test_a_cancelled_run_adds_nothing_to_the_scene(logic, scene, plumbing_package):
    volume = logic.loadVolume(SAMPLE_IMAGE)
    nodes = scene.GetNumberOfNodes()
    cancel = threading.Event()
    with pytest.raises(Cancelled):
        logic.segment([volume], plumbing_package, device="cpu", progress=lambda *_: cancel.set(), cancel=cancel)
    assert scene.GetNumberOfNodes() == nodes


def test_a_task_runs_on_a_worker_thread_and_reports_progress(logic, scene, plumbing_package):
    volume = logic.loadVolume(SAMPLE_IMAGE)
    job = logic.prepare([volume], plumbing_package, device="cpu")
    seen, main = [], threading.get_ident()
    task = SegmentationTask(job)
    job_run = job.run
    job.run = lambda **kw: (seen.append(threading.get_ident()), job_run(**kw))[1]
    task.start()
    assert task.wait(120)
    assert seen and seen[0] != main
    assert task.progress == (1.0, 0.0, "done")
    result = logic.addResult(job, task.result())
    assert result.segmentationNode.GetScene() is scene


def test_a_cancelled_task_raises_cancelled_and_can_be_dropped(logic, scene, plumbing_package):
    volume = logic.loadVolume(SAMPLE_IMAGE)
    nodes = scene.GetNumberOfNodes()
    task = SegmentationTask(logic.prepare([volume], plumbing_package, device="cpu"))
    task.cancel()
    task.start()
    assert task.wait(120) and task.cancelRequested
    with pytest.raises(Cancelled):
        task.result()
    assert scene.GetNumberOfNodes() == nodes


# -- review -----------------------------------------------------------------------------------------
def test_doubtful_regions_are_ranked_and_stepped_through(logic, scene, segmented):
    volume, result = segmented
    seg = result.segmentationNode
    threshold = 0.7  # the untrained network's map: one region at 0.5, a dozen at 0.7
    regions = logic.doubtfulRegions(seg, threshold)
    assert len(regions) >= 3
    masses = [r.doubt_mass for r in regions]
    assert masses == sorted(masses, reverse=True)
    difficulty = imageFromVolumeNode(result.reviewMapNode)
    ijk_to_ras = _ijk_to_ras(volume)
    stops = [logic.nextDoubtfulRegion(seg, threshold) for _ in range(3)]
    assert [s.index for s in stops] == [0, 1, 2] and all(s.count == len(regions) for s in stops)
    assert logic.previousDoubtfulRegion(seg, threshold).index == 1
    for stop in stops:
        i, j, k = stop.region.marker_ijk
        np.testing.assert_allclose(stop.markerRAS, (ijk_to_ras @ [i, j, k, 1.0])[:3], atol=1e-4)
        assert difficulty.array[k, j, i] >= threshold  # the marker is a voxel of the region
        (i0, i1), (j0, j1), (k0, k1) = stop.region.bbox_ijk
        assert i0 <= i < i1 and j0 <= j < j1 and k0 <= k < k1
    assert seg.GetAttribute(ATTRIBUTE + "ReviewIndex") == "1"
    assert logic.previousDoubtfulRegion(seg, 0.8).index == len(logic.doubtfulRegions(seg, 0.8)) - 1  # new threshold
    assert logic.nextDoubtfulRegion(seg, 1.01) is None


def test_centring_moves_every_slice_view_to_the_region(logic, scene, segmented):
    _, result = segmented
    views = []
    for name in ("Red", "Green"):
        view = slicer.vtkMRMLSliceNode()
        view.SetLayoutName(name)
        views.append(scene.AddNode(view))
    stop = logic.nextDoubtfulRegion(result.segmentationNode)
    logic.centerSliceViews(stop.markerRAS)
    for view in views:
        matrix = view.GetSliceToRAS()
        np.testing.assert_allclose([matrix.GetElement(r, 3) for r in range(3)], stop.markerRAS, atol=1e-6)
    logic.markPoint(stop.markerRAS)
    crosshair = scene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
    np.testing.assert_allclose(crosshair.GetCrosshairRAS(), stop.markerRAS, atol=1e-6)
    assert crosshair.GetCrosshairMode() == slicer.vtkMRMLCrosshairNode.ShowSmallBasic


def test_going_to_a_region_keeps_the_views_full_of_the_volume(logic, scene, segmented):
    """Views fitted to the crop (as the web app and Slicer show a volume), then each region in turn: the
    marker is in every view and at most 40 % of a view lies outside the volume (centring on a marker near
    the crop's edge left half of the axial view black)."""
    volume, result = segmented
    bounds = [0.0] * 6
    volume.GetRASBounds(bounds)
    low, high = np.array(bounds[0::2]), np.array(bounds[1::2])
    views = {}
    for name, rotation, (u, v) in (("Red", [[-1, 0, 0], [0, 1, 0], [0, 0, 1]], (0, 1)),  # axial, as Slicer's
                                   ("Green", [[-1, 0, 0], [0, 0, 1], [0, 1, 0]], (0, 2)),  # coronal
                                   ("Yellow", [[0, 0, 1], [-1, 0, 0], [0, 1, 0]], (1, 2))):  # sagittal
        view = slicer.vtkMRMLSliceNode()
        view.SetLayoutName(name)
        view = scene.AddNode(view)
        sliceToRAS = np.eye(4)
        sliceToRAS[:3, :3] = rotation
        view.GetSliceToRAS().DeepCopy(arrayToMatrix(sliceToRAS))
        view.SetDimensions(400, 400, 1)
        side = float(max(high[u] - low[u], high[v] - low[v]))  # fitted: the longer side fills the view
        view.SetFieldOfView(side, side, 1.0)
        view.UpdateMatrices()
        views[view] = (u, v)
    regions = logic.doubtfulRegions(result.segmentationNode, 0.7)
    assert len(regions) >= 3
    filled = []
    for index in range(len(regions)):
        stop = logic.goToDoubtfulRegion(result.segmentationNode, 0.7, index)
        logic.centerSliceViews(stop.markerRAS, volume)
        for view, (u, v) in views.items():
            centre = np.array([view.GetSliceToRAS().GetElement(r, 3) for r in range(3)])
            assert centre[3 - u - v] == pytest.approx(stop.markerRAS[3 - u - v], abs=1e-6)  # through the marker
            half = np.array(view.GetFieldOfView()[:2]) / 2
            shown_low, shown_high = centre[[u, v]] - half, centre[[u, v]] + half
            assert np.all(np.abs(np.array(stop.markerRAS)[[u, v]] - centre[[u, v]]) <= half + 1e-6)
            inside = np.clip(np.minimum(shown_high, high[[u, v]]) - np.maximum(shown_low, low[[u, v]]), 0, None)
            filled.append(float(np.prod(inside) / np.prod(2 * half)))
            extent = high[[u, v]] - low[[u, v]]
            assert filled[-1] >= 0.6 or filled[-1] == pytest.approx(np.prod(extent) / np.prod(2 * half), rel=1e-6)


def test_show_map_sets_the_foreground_layer_of_every_slice_view(logic, scene, segmented):
    volume, result = segmented
    composites = [scene.AddNode(slicer.vtkMRMLSliceCompositeNode()) for _ in range(3)]
    uncertainty = result.mapNodes["uncertainty"]
    logic.showMap(uncertainty, opacity=0.4)
    for composite in composites:
        assert composite.GetForegroundVolumeID() == uncertainty.GetID()
        assert composite.GetBackgroundVolumeID() == volume.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.4)
    logic.showMap(None)
    assert all(c.GetForegroundVolumeID() is None for c in composites)
    legend = logic.mapLegend(uncertainty)
    assert (legend.name, legend.last) == ("uncertainty", 1.0)
    assert legend.first == pytest.approx(negligible_uncertainty(3), abs=1e-4)
    assert "entropy" in legend.meaning and legend.stops[0] == (0.0, (0, 0, 4))
    assert legend.stops[-1] == (1.0, (252, 255, 164))


def test_edit_only_doubtful_voxels_limits_painting_to_the_difficulty_threshold(logic, scene, segmented):
    """The editable area is the hidden "Doubtful regions" segment; the user's source volume and intensity
    mask are not touched, the mask survives painting, and switching off gives the user's settings back."""
    volume, result = segmented
    seg = result.segmentationNode
    threshold = 0.55
    editor = slicer.vtkMRMLSegmentEditorNode()
    scene.AddNode(editor)
    editor.SetAndObserveSourceVolumeNode(volume)
    editor.SetSourceVolumeIntensityMaskRange(-5.0, 700.0)  # the user's own settings
    editor.SetSourceVolumeIntensityMask(False)
    editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedOutsideAllSegments)
    editor.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteAllSegments)
    logic.restrictEditingToDoubtfulVoxels(seg, threshold, segmentEditorNode=editor)
    assert editor.GetSourceVolumeNode() is volume and not editor.GetSourceVolumeIntensityMask()
    assert tuple(editor.GetSourceVolumeIntensityMaskRange()) == (-5.0, 700.0)
    assert editor.GetMaskMode() == slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment
    assert editor.GetMaskSegmentID() == DOUBTFUL_SEGMENT_ID
    mask_segment = seg.GetSegmentation().GetSegment(DOUBTFUL_SEGMENT_ID)
    assert mask_segment.GetName() == "Doubtful regions"
    assert not seg.GetDisplayNode().GetSegmentVisibility(DOUBTFUL_SEGMENT_ID)

    before = logic.correctedLabels(seg)  # the mask segment is no class: it is not in the labels
    editable = editable_mask(imageFromVolumeNode(result.reviewMapNode), threshold)  # the doubt grown by 2 mm
    assert 0 < editable.sum() < editable.size
    assert editable.sum() > (imageFromVolumeNode(result.reviewMapNode).array >= threshold).sum()
    everything = before.with_array(np.ones_like(before.array, dtype=bool))
    _paint(scene, seg, "posterior", everything, None, editor=editor)
    _paint(scene, seg, "anterior", everything, None, editor=editor)  # the mask did not shrink under posterior
    after = logic.correctedLabels(seg).array
    np.testing.assert_array_equal(after[editable], 1)
    np.testing.assert_array_equal(after[~editable], before.array[~editable])

    logic.restrictEditingToDoubtfulVoxels(seg, 0.8, segmentEditorNode=editor)  # a new threshold remakes the mask
    remade = seg.GetSegmentation().GetSegment(DOUBTFUL_SEGMENT_ID)
    assert remade.GetTag("AttnSeg.DoubtThreshold", tag := vtkReference("")) and str(tag) == "0.8"
    logic.allowEditingEverywhere(seg, segmentEditorNode=editor)
    assert editor.GetMaskMode() == slicer.vtkMRMLSegmentationNode.EditAllowedOutsideAllSegments
    assert editor.GetOverwriteMode() == slicer.vtkMRMLSegmentEditorNode.OverwriteAllSegments
    assert editor.GetSourceVolumeNode() is volume
    assert seg.GetSegmentation().GetSegment(DOUBTFUL_SEGMENT_ID) is None


def test_the_segment_editor_node_is_the_segment_editor_modules_singleton(logic, scene):
    node = logic.segmentEditorNode()
    assert node.GetSingletonTag() == "SegmentEditor" and logic.segmentEditorNode() is node


# -- export for training ----------------------------------------------------------------------------
def test_exported_correction_is_readable_by_training(logic, scene, segmented, tmp_path):
    volume, result = segmented
    seg = result.segmentationNode
    model = logic.correctedLabels(seg)
    block = _box(model.array.shape, (5, 10, 5), (15, 25, 15))
    _paint(scene, seg, "anterior", model.with_array(block), volume, remove=True)
    _paint(scene, seg, "posterior", model.with_array(_box(model.array.shape, (20, 5, 20), (30, 12, 30))), volume)
    corrected = logic.correctedLabels(seg)
    case_dir = logic.exportCorrection(seg, tmp_path)
    assert case_dir == tmp_path / "hippocampus_001_image"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hippocampus_001_image"]  # no staging left behind
    assert sorted(p.name for p in case_dir.iterdir()) == ["case.json", "difference.nii.gz", "image_0000.nii.gz",
                                                          "label.nii.gz", "model_label.nii.gz", "review_map.nii.gz"]
    files = {p.name.split(".")[0]: read_image(p) for p in case_dir.glob("*.nii.gz")}
    original = read_image(SAMPLE_IMAGE)
    for image in files.values():
        assert image.geometry.same_grid(original.geometry)
    np.testing.assert_array_equal(files["image_0000"].array, original.array)
    np.testing.assert_array_equal(files["label"].array, corrected.array)
    np.testing.assert_array_equal(files["model_label"].array, model.array)
    np.testing.assert_array_equal(files["difference"].array, corrected.array != model.array)
    assert files["difference"].array.sum() > 0
    np.testing.assert_allclose(files["review_map"].array, imageFromVolumeNode(result.reviewMapNode).array)
    record = json.loads((case_dir / "case.json").read_text())
    assert record["model_name"] == "plumbing" and record["model_sha256"] == seg.GetAttribute(ATTRIBUTE + "ModelSha256")
    assert record["class_names"] == ["background", "Anterior", "Posterior"]
    assert record["changed_voxels"] == int((corrected.array != model.array).sum())

    from training.data import find_cases, load_case

    data = {"layout": "corrected", "modalities": [{"name": "T1", "normalization": "zscore"}],
            "classes": HIPPOCAMPUS_CLASSES, "spacing_xyz_mm": [1.0, 1.0, 1.0], "orientation": "RAS"}
    cases = find_cases(data, tmp_path)
    assert [c.name for c in cases] == ["hippocampus_001_image"]
    loaded = load_case(cases[0], data)
    assert loaded.image.shape == (1, *original.array.shape)
    np.testing.assert_array_equal(loaded.label, corrected.array)  # the sample is already RAS at 1 mm


def test_more_than_255_classes_keep_their_values_in_the_scene_and_the_export(logic, tmp_path):
    """A model with 300 classes whose answer is class 290 everywhere: the segment, the corrected labels
    and every exported label map hold 290 (Slicer's labelmap and the export's lookup were uint8: 34)."""
    classes = [{"value": v, "name": f"c{v}"} for v in range(300)]
    package = _untrained_package(tmp_path / "wide", "unet", {"features": [4, 8]},
                                 [{"name": "T1", "normalization": "zscore"}], classes, "wide")
    weights = {k: v.clone() for k, v in package.weights.items()}
    last = [k for k, v in weights.items() if k.endswith("bias") and v.shape == (300,)][-1]
    weights[last][290] = 1e4
    package = save_package(tmp_path / "wide290", package.card, weights)
    volume = logic.loadVolume(SAMPLE_IMAGE)
    seg = logic.segment([volume], package, device="cpu").segmentationNode
    segment = seg.GetSegmentation().GetSegment("c290")
    assert segment is not None and segment.GetLabelValue() == 290
    shared = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    assert set(np.unique(numpy_support.vtk_to_numpy(shared.GetPointData().GetScalars()))) == {290}
    assert set(np.unique(logic.correctedLabels(seg).array)) == {290}
    case = logic.exportCorrection(seg, tmp_path / "export")
    for name in ("label", "model_label"):
        assert set(np.unique(read_image(case / f"{name}.nii.gz").array)) == {290}, name


def test_export_never_overwrites_unless_asked(logic, segmented, tmp_path):
    _, result = segmented
    first = logic.exportCorrection(result.segmentationNode, tmp_path, caseName="case 7/a")
    assert first.name == "case_7_a"
    marker = first / "case.json"
    marker.write_text("{}")
    with pytest.raises(FileExistsError, match="already holds a case"):
        logic.exportCorrection(result.segmentationNode, tmp_path, caseName="case 7/a")
    assert marker.read_text() == "{}"
    logic.exportCorrection(result.segmentationNode, tmp_path, caseName="case 7/a", overwrite=True)
    assert json.loads(marker.read_text())["case"] == "case_7_a"


def test_segments_must_be_model_classes_to_export(logic, scene, segmented, tmp_path):
    volume, result = segmented
    seg = result.segmentationNode
    segmentation = seg.GetSegmentation()
    segmentation.RemoveSegment("posterior")
    segmentation.AddEmptySegment("mine", "posterior", [0.0, 1.0, 0.0])  # named like a class: counts as one
    labels = logic.correctedLabels(seg).array
    assert set(np.unique(labels)) <= {0, 1}
    grid = imageFromVolumeNode(result.modelLabelNode)
    _paint(scene, seg, "mine", grid.with_array(_box(grid.array.shape, (0, 0, 0), (4, 4, 4))), volume)
    assert (logic.correctedLabels(seg).array[:4, :4, :4] == 2).all()
    segmentation.AddEmptySegment("tumour", "Tumour", [1.0, 0.0, 0.0])
    with pytest.raises(CorrectionError, match="segment 'Tumour' is not one of the model's classes"):
        logic.exportCorrection(seg, tmp_path)
    assert not any(tmp_path.iterdir())


def test_helper_nodes_of_the_export_are_removed(logic, scene, segmented):
    _, result = segmented
    ids = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    logic.correctedLabels(result.segmentationNode)
    assert {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())} == ids


# -- trame-slicer ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trame_app():
    from trame_slicer.core import SlicerApp

    return SlicerApp()


def test_runs_in_trame_slicers_scene_on_a_volume_slicer_itself_read(trame_app, plumbing_package, engine_result,
                                                                     tmp_path):
    node = trame_app.io_manager.load_volumes(str(SAMPLE_IMAGE))[0]  # Slicer's own reader, not ours
    logic = SceneLogic(trame_app.scene)
    result = logic.segment([node], plumbing_package, device="cpu")
    labels = logic.correctedLabels(result.segmentationNode)
    assert labels.geometry.same_grid(engine_result.labels.geometry)
    np.testing.assert_array_equal(labels.array, engine_result.labels.array)
    assert (logic.exportCorrection(result.segmentationNode, tmp_path) / "label.nii.gz").is_file()


# -- the shipped model -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shipped():
    return default_package()


def test_shipped_model_segments_the_sample_and_its_doubtful_regions_hold_the_errors(shipped):
    """The sample is a held-out case: good Dice, and the few voxels the review points at hold many of
    the voxels the model got wrong."""
    logic = SceneLogic(newScene())
    result = logic.segment([logic.loadVolume(SAMPLE_IMAGE)], shipped, device="cpu")
    labels = logic.correctedLabels(result.segmentationNode)
    reference = read_image(SAMPLE_LABEL)
    scores = evaluate_labels(labels, reference, labels={c["value"]: c["name"] for c in shipped.classes[1:]})
    assert all(s["dice"] >= 0.8 for s in scores.values()), scores
    threshold = 0.3
    errors = labels.array != reference.array
    doubtful = imageFromVolumeNode(result.reviewMapNode).array >= threshold
    assert doubtful.mean() <= 0.05 and errors[doubtful].sum() >= 0.3 * errors.sum()
    stop = logic.nextDoubtfulRegion(result.segmentationNode, threshold)
    i, j, k = stop.region.marker_ijk
    assert doubtful[k, j, i]


def test_the_uncertainty_overlay_leaves_the_anatomy_where_the_model_is_sure(shipped):
    """Calibrated, the shipped model's uncertainty far from the hippocampus is 0.01-0.04, not 0. Slicer's
    display pipeline draws nothing where the label is given at least 99 % (uncertainty below
    ``negligible_uncertainty``): most of the crop shows the anatomy, and the doubt at the boundary is drawn."""
    logic = SceneLogic(newScene())
    result = logic.segment([logic.loadVolume(SAMPLE_IMAGE)], shipped, device="cpu")
    node = result.mapNodes["uncertainty"]
    alpha = _overlay_rgba(node)[:, 3]
    values = imageFromVolumeNode(node).array.ravel()
    floor = negligible_uncertainty(len(shipped.classes))
    assert ((values > 0.01) & (values < floor)).mean() > 0.5  # the calibrated noise, which was drawn before
    assert (alpha[values < floor] == 0).all() and (alpha[values > floor + 0.03] == 255).all()
    assert (alpha == 0).mean() > 0.8 and (values >= 0.5).any()


def test_the_confidence_overlay_draws_the_doubtful_voxels_and_leaves_the_sure_ones(shipped):
    """The confidence is high where the segmentation is sure; its card's display range runs high to low
    (a negative window in Slicer), so the least confident voxels are drawn brightest and the surest
    are not drawn at all."""
    logic = SceneLogic(newScene())
    result = logic.segment([logic.loadVolume(SAMPLE_IMAGE)], shipped, device="cpu")
    node = result.mapNodes["confidence"]
    first, last = shipped.card.map_spec("confidence").display_range
    assert first > last and logic.mapLegend(node).first == pytest.approx(first)
    rgba = _overlay_rgba(node)
    values = imageFromVolumeNode(node).array.ravel()
    doubtful, sure = values < last, values > first - 0.01 * (first - last)
    assert doubtful.any() and sure.mean() > 0.5
    assert (rgba[doubtful, 3] == 255).all() and (rgba[doubtful, :3].mean(axis=1) > 200).all()  # inferno's pale end
    assert (rgba[sure, 3] == 0).all()


def test_each_map_legend_gives_the_cards_error_detection_score(shipped):
    """The panel shows beside each map how well it finds the model's errors (its card's AUROC); the shipped
    model's difficulty, from a confidence network retrained on the segmenter's errors, scores 0.99 (a map
    under 0.75 would be called a research map: ``test_web.py``)."""
    logic = SceneLogic(newScene())
    result = logic.segment([logic.loadVolume(SAMPLE_IMAGE)], shipped, device="cpu")
    legends = {name: logic.mapLegend(node) for name, node in result.mapNodes.items()}
    scores = shipped.card.metrics["error_detection_auroc"]
    for name in ("uncertainty", "difficulty"):
        assert legends[name].detection == (f"Finds the model's wrong voxels with AUROC {scores[name]:.2f} on its "
                                           "validation cases (model card).")
    assert scores["difficulty"] >= 0.75
    unscored = [name for name in legends if shipped.card.error_detection_auroc(name) is None]
    assert unscored and all(legends[name].detection == "" for name in unscored)


def test_each_map_legend_gives_its_unit_and_what_the_card_measured_of_it(shipped):
    """Beside each map the panel and the page show its unit and its measured information, both from the
    card (AttnSegLib.outputs.information_note); the maps the card measured none for get none."""
    logic = SceneLogic(newScene())
    result = logic.segment([logic.loadVolume(SAMPLE_IMAGE)], shipped, device="cpu")
    legends = {name: logic.mapLegend(node) for name, node in result.mapNodes.items()}
    measured = [name for name in legends if shipped.card.map_information(name) is not None]
    assert set(measured) == set(shipped.card.maps) == {"confidence", "difficulty"}
    for name in measured:
        figures = shipped.card.map_information(name)
        assert legends[name].information == information_note(shipped.card, name)
        assert f"inside Anterior + Posterior {figures['enrichment']:.2f}x its average" in legends[name].information
        assert f"entropy {figures['entropy_ratio']:.3f} of a flat map" in legends[name].information
        assert legends[name].unit == shipped.card.map_spec(name).unit != ""
    assert all(legends[name].information == legends[name].unit == "" for name in legends if name not in measured)


def test_shipped_model_agrees_with_itself_on_an_oblique_anisotropic_copy(shipped):
    """The sample resampled onto a tilted grid with 1.5 mm slices: the segmentation, brought back to the
    original grid through physical space, matches the one of the original."""
    logic = SceneLogic(newScene())
    image = read_image(SAMPLE_IMAGE)
    original = logic.correctedLabels(logic.segment([logic.loadVolume(SAMPLE_IMAGE)], shipped,
                                                   device="cpu").segmentationNode)
    rotation = sitk.Euler3DTransform((0, 0, 0), np.deg2rad(8), 0.0, np.deg2rad(10))
    reference = sitk.Image([35, 51, 24], sitk.sitkUInt8)
    reference.SetSpacing((1.0, 1.0, 1.5))
    reference.SetDirection(tuple(np.asarray(rotation.GetMatrix())))
    centre = image.geometry.ijk_to_lps() @ np.array([17, 25, 17, 1.0])
    reference.SetOrigin(tuple(centre[:3] - np.asarray(rotation.GetMatrix()).reshape(3, 3) @ [17, 25, 18]))
    moved = Image.from_sitk(sitk.Resample(image.to_sitk(), reference, sitk.Transform(), sitk.sitkLinear, 0))
    node = volumeNodeFromImage(moved, logic.scene, "oblique")
    labels = logic.correctedLabels(logic.segment([node], shipped, device="cpu").segmentationNode)
    back = _on_grid(labels, original)
    inside = _on_grid(labels.with_array(np.ones_like(labels.array)), original) > 0
    scores = evaluate_labels(np.where(inside, back, 0), np.where(inside, original.array, 0),
                             labels={c["value"]: c["name"] for c in shipped.classes[1:]})
    assert all(s["dice"] >= 0.8 for s in scores.values()), scores


# -- whole head: the ROIs the localisation places, and segmenting inside one ---------------------------
MNI152_T1 = "mni152/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def _ras_points(labels: Image) -> np.ndarray:
    """(3, N) RAS mm of the labelled voxels."""
    k, j, i = np.nonzero(labels.array)
    return (labels.geometry.ijk_to_ras() @ np.vstack([i, j, k, np.ones_like(i)]))[:3]


def test_localisation_places_an_roi_on_each_hippocampus_and_segment_uses_the_chosen_one(shipped, data_dir):
    """The MNI152 template (a whole head): one ROI per side where the hippocampi are in MNI space (RAS:
    the patient's left at x < 0), each carrying the head's size factor; segmenting inside the left one,
    moved 2 mm as a user would, gives the hippocampus inside that box only, size-normalised as the
    automatic localisation's (measured 4.61 vs 4.70 ml; cut at the scan's own size it was 4.36 ml)."""
    logic = SceneLogic(newScene())
    volume = logic.loadVolume(data_dir / MNI152_T1)
    assert logic.needsLocalisation(volume, shipped)
    assert not logic.needsLocalisation(logic.loadVolume(SAMPLE_IMAGE), shipped)  # already a crop
    left, right = logic.localisationROIs(volume, shipped)
    assert [left.GetName(), right.GetName()] == ["Left hippocampus ROI", "Right hippocampus ROI"]
    assert left.GetAttribute(ATTRIBUTE + "Target") == "left_hippocampus"
    sizeFactor = float(left.GetAttribute(ATTRIBUTE + "SizeFactor"))
    assert right.GetAttribute(ATTRIBUTE + "SizeFactor") == left.GetAttribute(ATTRIBUTE + "SizeFactor")
    assert 1.1 < sizeFactor < 1.3  # the template is larger than the reference head (localise.REFERENCE_SCALE)
    centres = {}
    for node in (left, right):
        centre, size = [0.0] * 3, [0.0] * 3
        node.GetCenterWorld(centre)
        node.GetSizeWorld(size)
        centres[node.GetName()] = np.asarray(centre)
        assert all(20.0 <= s <= 80.0 for s in size), size  # about the training field of view, not a head
    # MNI RAS mm: the hippocampi lie about 27 mm either side of the midline, 22 mm behind and 15 mm below
    # the anterior commissure (the targets' boxes, localise.TARGETS)
    np.testing.assert_allclose(centres["Left hippocampus ROI"], [-27.0, -22.0, -15.0], atol=5.0)
    np.testing.assert_allclose(centres["Right hippocampus ROI"], [27.0, -22.0, -15.0], atol=5.0)

    moved = centres["Left hippocampus ROI"] + [0.0, 2.0, 0.0]
    left.SetCenterWorld(*moved)
    result = logic.segment([volume], shipped, device="cpu", roiNode=left)
    assert result.provenance["roi"]["centre_lps_mm"] == pytest.approx([-moved[0], -moved[1], moved[2]], abs=0.01)
    assert result.provenance["roi"]["size_factor"] == round(sizeFactor, 4)
    labels = logic.correctedLabels(result.segmentationNode)
    volume_ml = np.count_nonzero(labels.array) * labels.geometry.voxel_volume_ml
    localised = logic.segment([volume], shipped, device="cpu").classVolumesMl
    assert volume_ml == pytest.approx(localised["Left anterior hippocampus"] + localised["Left posterior hippocampus"],
                                      rel=0.05)
    bounds = [0.0] * 6
    left.GetRASBounds(bounds)
    points = _ras_points(labels)
    low, high = np.asarray(bounds[0::2]) - 1.0, np.asarray(bounds[1::2]) + 1.0  # a voxel's rounding
    assert np.all((points >= low[:, None]) & (points <= high[:, None]))
    assert points[0].mean() < -15.0  # the left hippocampus


def test_localisation_refuses_an_image_that_is_no_whole_head_and_adds_no_roi(shipped):
    logic = SceneLogic(newScene())
    crop = logic.loadVolume(SAMPLE_IMAGE)  # one hippocampus, no brain around it to register
    with pytest.raises(ImageError, match="--roi|region"):
        logic.localisationROIs(crop, shipped)
    assert logic.scene.GetNodesByClass("vtkMRMLMarkupsROINode").GetNumberOfItems() == 0


# -- the README's picture -----------------------------------------------------------------------------
def test_review_screenshot_shows_the_outlines_and_the_map(logic, segmented, tmp_path):
    from PIL import Image as Picture

    _, result = segmented
    path = render_review(logic, result.segmentationNode, tmp_path / "review.png")  # the review map
    picture = np.asarray(Picture.open(path).convert("RGB")).astype(int)
    assert picture.shape == (468, 1152, 3)
    anterior = np.abs(picture - [230, 159, 0]).sum(axis=2) < 30  # the Anterior outline colour
    assert anterior.sum() > 50
    assert result.segmentationNode.GetAttribute(ATTRIBUTE + "ReviewIndex") is None  # the review did not move


def test_scenes_saved_with_the_earlier_review_map_reference_still_open(logic, segmented):
    """Scenes saved before the review map was named so refer to it as ``AttnSegDifficulty`` with the
    attribute ``AttnSeg.DifficultyMap``: they are still reviewed."""
    _, result = segmented
    node = result.segmentationNode
    reviewMap = node.GetNodeReference("AttnSegReviewMap")
    assert reviewMap is result.reviewMapNode
    node.RemoveNodeReferenceIDs("AttnSegReviewMap")
    node.SetNodeReferenceID("AttnSegDifficulty", reviewMap.GetID())
    node.SetAttribute(ATTRIBUTE + "DifficultyMap", node.GetAttribute(ATTRIBUTE + "ReviewMap"))
    node.RemoveAttribute(ATTRIBUTE + "ReviewMap")
    assert logic.reviewMapNode(node) is reviewMap
    assert logic.reviewMapName(node) == result.reviewMapName
    regions = logic.doubtfulRegions(node, 0.0)  # every voxel is doubtful at 0: one region at least
    assert regions and logic.nextDoubtfulRegion(node, 0.0).region == regions[0]
    assert result.classVolumesMl == class_volumes_ml(imageFromVolumeNode(result.modelLabelNode), result.classes)

"""Click refinement in the MRML scene (AttnSegLib.slicer_refine) on real slicer-core nodes: the clicked
voxel takes the clicked class in the segment, the probability and uncertainty map nodes follow, nothing
farther than 15 mm from the click changes, and the clicks reach case.json through the AttnSeg.Clicks
attribute. The Slicer panel's point lists (ClickRefinement): a point placed as a slice view places it
(preview, then defined) refines at once, a remove point clears, Undo restores voxel for voxel, a point
outside the image is refused, and the clicks of a saved correction reach training."""
from __future__ import annotations

import json

import numpy as np
import pytest
import slicer

from AttnSegLib.maps import volume_name
from AttnSegLib.package import default_package
from AttnSegLib.refine import RADIUS_MM, ClickError, Refiner, voxel_click
from AttnSegLib.mrml import imageFromVolumeNode, newScene
from AttnSegLib.slicer_logic import SceneLogic
from AttnSegLib.slicer_refine import (ADD, CLICKS_ATTRIBUTE, REF_POINT_LIST, REMOVE, ClickRefinement, SceneRefinement,
                                      recordedClicks, refineSegmentation, refinerFor)
from conftest import REPO
from training.config import load_config
from training.data import find_cases

SAMPLE_IMAGE = REPO / "Resources" / "SampleData" / "hippocampus_001_image.nii.gz"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def package():
    return default_package()


@pytest.fixture()
def segmented(package):
    logic = SceneLogic(newScene())
    volume = logic.loadVolume(SAMPLE_IMAGE)
    return logic, logic.segment([volume], package, device="cpu")


def _state(logic, node):
    maps = logic.mapNodes(node)
    return (logic.correctedLabels(node).array,
            {name: imageFromVolumeNode(n).array for name, n in maps.items()
             if name.startswith("probability.") or name == "uncertainty"})


def test_a_click_changes_the_segment_and_maps_near_it_only_and_is_recorded(segmented, tmp_path):
    logic, result = segmented
    node = result.segmentationNode
    assert refinerFor(node).method == "learned"  # the shipped refiner matches the default model
    labels, maps = _state(logic, node)
    geometry = logic.correctedLabels(node).geometry
    inside = np.argwhere(labels == 1)
    target = inside[len(inside) // 2]
    click = voxel_click(target, 0, geometry)  # "background here", inside the Anterior segment
    refined = refineSegmentation(logic, node, [click])
    after, after_maps = _state(logic, node)
    assert after[tuple(target)] == 0 and refined.labels[tuple(target)] == 0
    np.testing.assert_array_equal(after, refined.labels)  # the segments hold exactly the refined labels
    np.testing.assert_allclose(after_maps[f"probability.{volume_name('Anterior')}"], refined.probabilities[1], atol=1e-6)
    np.testing.assert_allclose(after_maps["uncertainty"], refined.uncertainty, atol=1e-6)
    moved = (after != labels) | np.any([after_maps[k] != maps[k] for k in maps], axis=0)
    assert moved.any()
    spacing = np.asarray(geometry.spacing)[::-1]
    distance = np.sqrt((((np.argwhere(moved) - target) * spacing) ** 2).sum(axis=1))
    assert distance.max() <= RADIUS_MM + 1e-3
    assert json.loads(node.GetAttribute(CLICKS_ATTRIBUTE)) == [{"position_lps": list(click.position_lps),
                                                                "class": "background"}]
    second = voxel_click(inside[0], 2, geometry)
    refineSegmentation(logic, node, [second], Refiner("random_walker"))
    assert recordedClicks(node) == [click, second]
    case = json.loads((logic.exportCorrection(node, tmp_path) / "case.json").read_text())
    assert [c["class"] for c in case["clicks"]] == ["background", "Posterior"]


def test_a_session_refines_overlapping_clicks_exactly_as_refine_segmentation(segmented, package):
    """Clicks whose neighbourhoods overlap: a session keeps its arrays between clicks, while
    :func:`refineSegmentation` reads the scene afresh, whose background is 1 - the classes' maps. The
    session kept the background its own update left (off from 1 - the maps by float rounding), so each
    later click nearby saw other inputs: maps off by up to 4e-5 after a few clicks on a whole head. Now
    both refine the same arrays, bitwise."""
    logic, result = segmented
    node = result.segmentationNode
    other = SceneLogic(newScene())
    reference = other.segment([other.loadVolume(SAMPLE_IMAGE)], package, device="cpu").segmentationNode
    geometry = logic.correctedLabels(node).geometry
    session = SceneRefinement(logic, node)
    for index, label in [((17, 20, 17), 1), ((18, 24, 15), 2), ((16, 22, 19), 0), ((17, 27, 17), 1)]:
        click = voxel_click(index, label, geometry)
        session.click(click)
        refineSegmentation(other, reference, [click])
        (labels, maps), (expected, expected_maps) = _state(logic, node), _state(other, reference)
        np.testing.assert_array_equal(labels, expected)
        for name in maps:
            np.testing.assert_array_equal(maps[name], expected_maps[name], err_msg=f"{name} after click at {index}")


def test_a_click_outside_the_image_changes_nothing(segmented):
    logic, result = segmented
    node = result.segmentationNode
    labels, maps = _state(logic, node)
    with pytest.raises(ClickError, match="outside the image"):
        refineSegmentation(logic, node, [voxel_click((-50, 0, 0), 1, logic.correctedLabels(node).geometry)])
    after, after_maps = _state(logic, node)
    np.testing.assert_array_equal(after, labels)
    assert node.GetAttribute(CLICKS_ATTRIBUTE) is None


# -- the panel's point lists (ClickRefinement) ------------------------------------------------------
IDENTITY = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]


def _place(listNode, index, geometry) -> None:
    """Place a point at array ``index`` as a slice view does (vtkSlicerMarkupsWidget::PlacePoint): a
    preview point follows the mouse, a click defines it."""
    click = voxel_click(index, 0, geometry)
    x, y, z = click.position_lps
    event = slicer.vtkMRMLInteractionEventData()
    display = listNode.GetDisplayNode()
    event.SetWorldPosition([-x + 3.0, -y, z])  # hovering nearby
    markups = slicer.vtkMRMLMarkupsNode
    point = display.UpdateActiveControlPointWorld(-1, event, IDENTITY, "", "", markups.PositionPreview)
    event.SetWorldPosition([-x, -y, z])
    display.UpdateActiveControlPointWorld(point, event, IDENTITY, "", "", markups.PositionDefined)


def _far_from(moved: np.ndarray, index, geometry) -> float:
    """The largest distance (mm) from voxel ``index`` of a voxel in ``moved`` (0 when none moved)."""
    if not moved.any():
        return 0.0
    spacing = np.asarray(geometry.spacing)[::-1]
    return float(np.sqrt((((np.argwhere(moved) - np.asarray(index)) * spacing) ** 2).sum(axis=1)).max())


def _background_next_to(labels: np.ndarray, value: int):
    """A background voxel two voxels from the region of class ``value``."""
    from scipy import ndimage

    near = ndimage.binary_dilation(labels == value, iterations=2) & ~ndimage.binary_dilation(labels == value)
    return tuple(int(v) for v in np.argwhere(near & (labels == 0))[0])


def test_point_lists_are_made_per_class_and_action_named_coloured_and_tied_to_the_segmentation(segmented):
    logic, result = segmented
    node = result.segmentationNode
    refinement = logic.clickRefinement(node)
    assert logic.clickRefinement(node) is refinement  # kept: its undo steps last
    assert refinement.classNames == ["Anterior", "Posterior"] and refinement.pointLists() == []
    add = refinement.pointList("anterior", ADD)
    remove = refinement.pointList("Anterior", REMOVE)
    assert refinement.pointList("Anterior", ADD) is add and add is not remove
    assert (add.GetName(), remove.GetName()) == ("Anterior add", "Anterior remove")
    segmentation = node.GetSegmentation()
    colour = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("Anterior")).GetColor()  # as drawn
    for listNode, glyph in ((add, "ThickCross2D"), (remove, "Dash2D")):
        display = listNode.GetDisplayNode()
        np.testing.assert_allclose(display.GetSelectedColor(), colour)
        np.testing.assert_allclose(display.GetColor(), colour)
        assert display.GetGlyphTypeAsString() == glyph
        assert listNode.GetNodeReference("AttnSegSegmentation") is node
    assert [node.GetNthNodeReference(REF_POINT_LIST, i) for i in range(2)] == [add, remove]
    with pytest.raises(ClickError, match="unknown class 'Tail'"):
        refinement.pointList("Tail")
    with pytest.raises(ClickError, match="background has no point list"):
        refinement.pointList("background")

    interaction = refinement.interactionNode
    refinement.startPlacing("Posterior", REMOVE)
    assert interaction.GetCurrentInteractionMode() == slicer.vtkMRMLInteractionNode.Place
    assert interaction.GetPlaceModePersistence() == 1
    assert refinement.placing() == ("Posterior", REMOVE)
    selection = node.GetScene().GetNodeByID("vtkMRMLSelectionNodeSingleton")
    assert selection.GetActivePlaceNodeID() == refinement.pointList("Posterior", REMOVE).GetID()
    assert selection.GetActivePlaceNodeClassName() == "vtkMRMLMarkupsFiducialNode"
    refinement.stopPlacing()
    assert interaction.GetCurrentInteractionMode() == slicer.vtkMRMLInteractionNode.ViewTransform
    assert refinement.placing() is None
    # a new logic on the same scene (a saved scene reloaded) finds the lists and refines their new points
    again = SceneLogic(node.GetScene()).clickRefinement(node)
    assert again.pointLists() == refinement.pointLists()
    refinement.close()
    labels = logic.correctedLabels(node)
    target = _background_next_to(labels.array, 1)
    _place(add, target, labels.geometry)
    assert again.lastReport is not None and again.lastReport.error is None
    assert logic.correctedLabels(node).array[target] == 1


def test_a_placed_add_point_makes_its_background_voxel_the_class_and_changes_nothing_beyond_15_mm(segmented):
    logic, result = segmented
    node = result.segmentationNode
    refinement = logic.clickRefinement(node)
    reports = []
    refinement.onReport = reports.append
    labels, maps = _state(logic, node)
    geometry = logic.correctedLabels(node).geometry
    target = _background_next_to(labels, 2)
    assert labels[target] == 0
    listNode = refinement.startPlacing("Posterior", ADD)
    _place(listNode, target, geometry)
    after, after_maps = _state(logic, node)
    assert after[target] == 2
    moved = (after != labels) | np.any([after_maps[k] != maps[k] for k in maps], axis=0)
    assert moved.any() and _far_from(moved, target, geometry) <= RADIUS_MM + 1e-3
    assert listNode.GetNumberOfControlPoints() == 1 and listNode.GetNthControlPointLocked(0)
    assert [(r.className, r.action, r.error) for r in reports] == [("Posterior", ADD, None)]
    assert reports[0].changedVoxels == int(moved.sum()) and reports[0].seconds > 0
    (recorded,) = json.loads(node.GetAttribute(CLICKS_ATTRIBUTE))
    assert recorded["class"] == "Posterior"
    np.testing.assert_allclose(recorded["position_lps"], voxel_click(target, 2, geometry).position_lps, atol=1e-6)
    assert refinement.undoSteps == 1


def test_a_remove_point_clears_its_voxel(segmented):
    logic, result = segmented
    node = result.segmentationNode
    refinement = logic.clickRefinement(node)
    labels, maps = _state(logic, node)
    geometry = logic.correctedLabels(node).geometry
    inside = np.argwhere(labels == 1)
    target = tuple(int(v) for v in inside[len(inside) // 2])
    _place(refinement.pointList("Anterior", REMOVE), target, geometry)
    after, after_maps = _state(logic, node)
    assert after[target] == 0
    moved = (after != labels) | np.any([after_maps[k] != maps[k] for k in maps], axis=0)
    assert _far_from(moved, target, geometry) <= RADIUS_MM + 1e-3
    assert [c.label for c in recordedClicks(node)] == [0]  # "background here"


def test_undo_restores_the_result_voxel_for_voxel_and_removes_the_point_and_is_bounded(segmented):
    logic, result = segmented
    node = result.segmentationNode
    refinement = ClickRefinement(logic, node, undoSteps=2)
    states = [_state(logic, node)]
    geometry = logic.correctedLabels(node).geometry
    labels = states[0][0]
    inside = np.argwhere(labels == 2)
    targets = [_background_next_to(labels, 1), tuple(int(v) for v in inside[len(inside) // 2]),
               _background_next_to(labels, 2)]
    lists = [refinement.pointList("Anterior", ADD), refinement.pointList("Posterior", REMOVE),
             refinement.pointList("Posterior", ADD)]
    attributes = [node.GetAttribute(CLICKS_ATTRIBUTE)]
    for listNode, target in zip(lists, targets):
        _place(listNode, target, geometry)
        states.append(_state(logic, node))
        attributes.append(node.GetAttribute(CLICKS_ATTRIBUTE))
    assert not np.array_equal(states[-1][0], states[0][0])
    assert refinement.undoSteps == 2  # the oldest click fell off the bounded stack
    for step in (3, 2):
        assert refinement.undo()
        labels, maps = _state(logic, node)
        np.testing.assert_array_equal(labels, states[step - 1][0])
        for name, array in maps.items():
            np.testing.assert_array_equal(array, states[step - 1][1][name], err_msg=name)
        assert node.GetAttribute(CLICKS_ATTRIBUTE) == attributes[step - 1]
        assert lists[step - 1].GetNumberOfControlPoints() == 0
    assert not refinement.undo() and refinement.undoSteps == 0
    assert lists[0].GetNumberOfControlPoints() == 1  # the first click stays: it was beyond the stack
    assert len(recordedClicks(node)) == 1


def test_undo_of_the_only_click_leaves_no_clicks_attribute_and_keeps_edits_elsewhere(segmented):
    logic, result = segmented
    node = result.segmentationNode
    refinement = logic.clickRefinement(node)
    labels, maps = _state(logic, node)
    geometry = logic.correctedLabels(node).geometry
    _place(refinement.pointList("Anterior", ADD), _background_next_to(labels, 1), geometry)
    assert refinement.undo()
    after, after_maps = _state(logic, node)
    np.testing.assert_array_equal(after, labels)
    for name in maps:
        np.testing.assert_array_equal(after_maps[name], maps[name])
    assert node.GetAttribute(CLICKS_ATTRIBUTE) is None


def test_a_point_outside_the_image_is_refused_removed_and_changes_nothing(segmented):
    logic, result = segmented
    node = result.segmentationNode
    refinement = logic.clickRefinement(node)
    labels, maps = _state(logic, node)
    listNode = refinement.pointList("Anterior", ADD)
    _place(listNode, (-40, 0, 0), logic.correctedLabels(node).geometry)
    report = refinement.lastReport
    assert report.error is not None and "outside the image" in report.error and "give a point inside" in report.error
    assert listNode.GetNumberOfControlPoints() == 0 and refinement.undoSteps == 0
    after, after_maps = _state(logic, node)
    np.testing.assert_array_equal(after, labels)
    assert node.GetAttribute(CLICKS_ATTRIBUTE) is None


def _place_an_addition_and_a_removal(logic, node) -> None:
    """An Anterior point on the background next to Anterior, a Posterior removal on a Posterior voxel."""
    refinement = logic.clickRefinement(node)
    labels = logic.correctedLabels(node)
    _place(refinement.pointList("Anterior", ADD), _background_next_to(labels.array, 1), labels.geometry)
    _place(refinement.pointList("Posterior", REMOVE), tuple(np.argwhere(labels.array == 2)[0]), labels.geometry)


def test_the_clicks_of_placed_points_reach_the_saved_correction_training_reads(segmented, tmp_path):
    logic, result = segmented
    node = result.segmentationNode
    _place_an_addition_and_a_removal(logic, node)
    case_dir = logic.exportCorrection(node, tmp_path)
    data = load_config("fine_tune_corrections", {"data": {"root": str(tmp_path)}})["data"]
    (files,) = find_cases(data, tmp_path)
    record = json.loads(files.record.read_text())
    assert record["clicks"] == json.loads(node.GetAttribute(CLICKS_ATTRIBUTE))
    assert [c["class"] for c in record["clicks"]] == ["Anterior", "background"]
    assert record["changed_voxels"] > 0 and files.name == case_dir.name


def test_a_saved_correction_trains_the_refinement_network_with_its_real_clicks(segmented, package, tmp_path,
                                                                              hippocampus_dir):
    """Points placed in the panel, the correction saved through ``exportCorrection``, then
    ``training.refine_train --corrections``: the saved case is read back with its clicks (the model run
    again reproduces the saved model result), its examples put the click maps' peaks at the recorded
    clicks, and a short run trains on it beside two simulated cases and records it in the card."""
    from AttnSegLib.refine import LearnedUpdate, click_voxel, find_refinement_package
    from training import refine_train

    logic, result = segmented
    node = result.segmentationNode
    _place_an_addition_and_a_removal(logic, node)
    corrections = tmp_path / "corrections"
    logic.exportCorrection(node, corrections, caseName="placed")
    refiner_package = find_refinement_package(package.card)
    samples, left_out = refine_train.load_corrections(corrections, refiner_package.card, 30.0,
                                                      tmp_path / "cache.npz")
    assert left_out == [] and len(samples) == 1
    (sample,) = samples
    assert [c.label for c in sample.clicks] == [1, 0] and [c.position_lps for c in sample.clicks] == [
        c.position_lps for c in recordedClicks(node)]
    updater = LearnedUpdate.from_package(refiner_package)
    rng = np.random.default_rng(0)
    for _ in range(4):
        x, y, weight = refine_train.make_example(sample, updater, rng)
        assert (x[0, 4:] == 1.0).any() and weight.max() >= 1.0
        for label in range(3):  # each click map peaks where the corrected label holds its class
            assert (y[0][x[0, 4 + label] == 1.0] == label).all()
    for click in sample.clicks:  # the clicks fall inside the sample's box, on the corrected label's class
        voxel = tuple(np.round(click_voxel(click, sample.geometry)).astype(int))
        assert sample.label[voxel] == click.label
    # a short real run: two simulated training cases beside the saved correction
    card = package.card
    held_out = set(card["training"]["validation_cases"])
    names = [n for n in (f"hippocampus_{i:03d}" for i in range(1, 400))
             if n not in held_out and (hippocampus_dir / "imagesTr" / f"{n}.nii.gz").is_file()][:2]
    data = tmp_path / "data"
    for sub in ("imagesTr", "labelsTr"):
        (data / sub).mkdir(parents=True)
        for n in names:
            (data / sub / f"{n}.nii.gz").symlink_to(hippocampus_dir / sub / f"{n}.nii.gz")
    (data / "dataset.json").write_text(json.dumps({"training": [
        {"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in names]}))
    out = tmp_path / "run"
    assert refine_train.main(["--data", str(data), "--base", card["name"], "--out", str(out), "--corrections",
                              str(corrections), "--iterations", "2", "--batch-size", "4", "--init",
                              str(refiner_package.path)]) == 0
    trained = json.loads((out / "package" / "model.json").read_text())["training"]
    assert trained["iterations"] == 2 and trained["real_corrections"] == {"cases": 1, "clicks": 2,
                                                                          "share_of_examples": 0.5}
    assert len(json.loads((out / "log.json").read_text())) == 2


def test_on_a_whole_head_a_point_outside_its_class_box_is_refused_as_the_cli_refuses_it(data_dir):
    """A localised whole head (MNI152) in the scene: a "Left anterior hippocampus" point placed in the
    right hippocampus's box is refused in one line (the same check as ``attnseg refine``), removed, and
    changes nothing; the same point in the left box refines, and Undo puts it back. The session copied
    the volumes out of the scene only around the point, and refined exactly as
    :func:`refineSegmentation`, which copies them whole, refines the same click."""
    logic = SceneLogic(newScene())
    volume = logic.loadVolume(data_dir / "mni152" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    node = logic.segment([volume], default_package(), device="cpu").segmentationNode
    classes = json.loads(node.GetAttribute("AttnSeg.Classes"))
    assert classes[1]["name"] == "Left anterior hippocampus"
    refinement = logic.clickRefinement(node)
    reports = []
    refinement.onReport = reports.append
    labels, maps = _state(logic, node)
    geometry = logic.correctedLabels(node).geometry
    target = _background_next_to(labels, 1)
    position = voxel_click(target, 1, geometry).position_lps
    # the template is symmetric: x -> -x is the other side
    mirrored_index = np.linalg.solve(geometry.ijk_to_lps(), [-position[0], position[1], position[2], 1.0])[:3][::-1]
    listNode = refinement.pointList("Left anterior hippocampus", ADD)
    _place(listNode, tuple(float(v) for v in mirrored_index), geometry)
    assert reports[-1].error is not None and "falls in the box of the right hippocampus" in reports[-1].error
    assert "\n" not in reports[-1].error and listNode.GetNumberOfControlPoints() == 0
    after, after_maps = _state(logic, node)
    np.testing.assert_array_equal(after, labels)
    assert node.GetAttribute(CLICKS_ATTRIBUTE) is None and refinement.undoSteps == 0
    _place(listNode, target, geometry)
    assert reports[-1].error is None and logic.correctedLabels(node).array[target] == 1
    print(f"whole-head point in the Slicer panel: {reports[-1].seconds:.2f} s (first point)")
    # the point reads 31 voxels around it (1 mm): at most 3 of the 16-voxel cubes along each axis, of 13x15x12
    assert 0 < refinement.session.arrays.filled.sum() <= 3 ** 3
    refined_labels, refined_maps = _state(logic, node)
    click = recordedClicks(node)[-1]
    assert refinement.undo()
    after, after_maps = _state(logic, node)
    np.testing.assert_array_equal(after, labels)
    for name in maps:
        np.testing.assert_array_equal(after_maps[name], maps[name], err_msg=name)
    refineSegmentation(logic, node, [click])
    after, after_maps = _state(logic, node)
    np.testing.assert_array_equal(after, refined_labels)
    for name in maps:
        np.testing.assert_allclose(after_maps[name], refined_maps[name], atol=1e-6, err_msg=name)

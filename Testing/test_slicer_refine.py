"""Click refinement in the MRML scene (AttnSegLib.slicer_refine) on real slicer-core nodes: the clicked
voxel takes the clicked class in the segment, the probability and uncertainty map nodes follow, nothing
farther than 15 mm from the click changes, and the clicks reach case.json through the AttnSeg.Clicks
attribute."""
from __future__ import annotations

import json

import numpy as np
import pytest

from AttnSegLib.maps import volume_name
from AttnSegLib.package import default_package
from AttnSegLib.refine import RADIUS_MM, ClickError, Refiner, voxel_click
from AttnSegLib.mrml import imageFromVolumeNode, newScene
from AttnSegLib.slicer_logic import SceneLogic
from AttnSegLib.slicer_refine import CLICKS_ATTRIBUTE, recordedClicks, refineSegmentation, refinerFor
from conftest import REPO

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


def test_a_click_outside_the_image_changes_nothing(segmented):
    logic, result = segmented
    node = result.segmentationNode
    labels, maps = _state(logic, node)
    with pytest.raises(ClickError, match="outside the image"):
        refineSegmentation(logic, node, [voxel_click((-50, 0, 0), 1, logic.correctedLabels(node).geometry)])
    after, after_maps = _state(logic, node)
    np.testing.assert_array_equal(after, labels)
    assert node.GetAttribute(CLICKS_ATTRIBUTE) is None

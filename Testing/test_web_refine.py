"""The web app's Refine step (:mod:`AttnSegLib.web.refine_mode`): without a browser, on the real logic,
MRML scene and shipped weights, a click of the chosen class changes the segment and its maps within
15 mm only, is recorded for the training case, and undo puts everything back; what a client may send
(the class name) and what the server reads from the view (the point) are checked, and the number of
clicks is bounded. In Chromium (``-m browser``): segment, open Refine, click in the axial view inside
the most doubtful region, the saved case holds the change near the click and the click itself, undo
gives back the model's labels; hostile class names are refused."""
from __future__ import annotations

import io
import json
import re
import time
import zipfile

import numpy as np
import pytest
import SimpleITK as sitk

from AttnSegLib.image import Image, read_image
from AttnSegLib.inference import Predictor
from AttnSegLib.maps import volume_name
from AttnSegLib.mrml import imageFromVolumeNode, newScene
from AttnSegLib.package import default_package, load_package
from AttnSegLib.refine import RADIUS_MM, Click, ClickError, click_voxel, voxel_click
from AttnSegLib.review import doubtful_regions
from AttnSegLib.slicer_logic import SceneLogic
from AttnSegLib.slicer_refine import CLICKS_ATTRIBUTE, writeLabels
from AttnSegLib.web.refine_mode import BACKGROUND, ClickRefinement, click_choices, clicks_text

from test_web import (SAMPLE, _choose, _download, _open_sample, _open_session, _state_sent, _views,  # noqa: F401
                      browser, model_package, server)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def segmented():
    logic = SceneLogic(newScene())
    result = logic.segment([logic.loadVolume(SAMPLE)], default_package(), device="cpu")
    return logic, result


def _scene_state(logic, node) -> dict:
    maps = logic.mapNodes(node)
    state = {name: imageFromVolumeNode(n).array.copy() for name, n in maps.items()
             if name.startswith("probability.") or name == "uncertainty"}
    state["labels"] = logic.correctedLabels(node).array
    return state


def _distance_mm(shape, voxel, spacing_dhw) -> np.ndarray:
    grids = np.meshgrid(*[(np.arange(n) - v) * s for n, v, s in zip(shape, voxel, spacing_dhw)], indexing="ij")
    return np.sqrt(sum(g ** 2 for g in grids))


def test_a_click_refines_near_it_only_is_recorded_and_undone(segmented, tmp_path):
    logic, result = segmented
    node = result.segmentationNode
    names = [c["name"] for c in result.classes]
    assert [c["value"] for c in click_choices(result.classes)] == names[1:] + [BACKGROUND]
    clicks = ClickRefinement(logic)
    before = _scene_state(logic, node)
    geometry = logic.correctedLabels(node).geometry
    doubt = before["uncertainty"] * (before["labels"] > 0)
    voxel = np.unravel_index(int(doubt.argmax()), doubt.shape)  # the most doubtful voxel of the segmentation
    click = voxel_click(voxel, 0, geometry)
    job = clicks.prepare(node, BACKGROUND, click.position_lps, default_package().card.class_names)
    refined, undo = job.run()
    clicks.apply(job, refined, undo)
    after = _scene_state(logic, node)
    assert after["labels"][voxel] == 0 and (after["labels"] != before["labels"]).any()
    moved = np.any([after[k] != before[k] for k in before], axis=0)
    far = _distance_mm(moved.shape, voxel, np.asarray(geometry.spacing)[::-1]) > RADIUS_MM
    assert moved.any() and not moved[far].any()
    # the session copied the scene only where the click reads: the maps hold its refined values in the click's box
    np.testing.assert_allclose(after[f"probability.{volume_name(names[1])}"][undo.box],
                               refined.probabilities[1][undo.box], atol=1e-6)
    assert json.loads(node.GetAttribute(CLICKS_ATTRIBUTE)) == [{"position_lps": list(click.position_lps),
                                                                "class": BACKGROUND}]
    assert clicks_text(node)[0]["class"] == BACKGROUND
    case = logic.exportCorrection(node, tmp_path, caseName="case")
    assert json.loads((case / "case.json").read_text())["clicks"][0]["class"] == BACKGROUND

    clicks.undo(node)
    restored = _scene_state(logic, node)
    for key in before:
        np.testing.assert_allclose(restored[key], before[key], atol=1e-6, err_msg=key)
    assert node.GetAttribute(CLICKS_ATTRIBUTE) is None  # as the Slicer panel's undo leaves it
    with pytest.raises(ClickError, match="no click to undo"):
        clicks.undo(node)

    # The user paints between clicks (the segment's label map replaced, as the editor does): the next click
    # starts from the painted segments, not from the session's copy.
    painted = before["labels"].copy()
    painted[0, 0, 0] = 1
    writeLabels(node, Image(painted, geometry), np.ones(painted.shape, dtype=bool))
    job = clicks.prepare(node, BACKGROUND, click.position_lps, default_package().card.class_names)
    assert job.arrays.labels.array[0, 0, 0] == 1


def test_what_the_client_sends_is_checked_and_clicks_are_bounded(segmented):
    logic, result = segmented
    node = result.segmentationNode
    card = default_package().card.class_names
    geometry = logic.correctedLabels(node).geometry
    centre = tuple(geometry.corners_lps().mean(axis=0))
    before = _scene_state(logic, node)
    clicks = ClickRefinement(logic, max_clicks=2)
    for hostile in ("../../etc/passwd", "/etc/passwd", "Tail", "", None, 3, ["Anterior"], {"name": "Anterior"},
                    "background ", "ANTERIOR"):
        with pytest.raises(ClickError, match="choose a class from the list") as refused:
            clicks.prepare(node, hostile, centre, card)
        assert "\n" not in str(refused.value)
    with pytest.raises(ClickError, match="outside the image"):
        clicks.prepare(node, "Anterior", (centre[0] + 500, centre[1], centre[2]), card)
    for _ in range(2):  # on the worker thread, as the web app runs them
        job = clicks.prepare(node, "Anterior", centre, card).start()
        while not job.done():
            time.sleep(0.01)
        clicks.apply(job, *job.outcome())
    with pytest.raises(ClickError, match="holds 2 clicks, the most it takes"):
        clicks.prepare(node, "Anterior", centre, card)
    for _ in range(2):
        clicks.undo(node)
    restored = _scene_state(logic, node)
    for key in before:
        np.testing.assert_allclose(restored[key], before[key], atol=1e-6, err_msg=key)


# -- in the browser ---------------------------------------------------------------------------------------
CLICK_KEY = "attnseg__AttnSegState__refine__RefinePanel__"


def _axial_pixel(axial, image: sitk.Image, point_lps) -> tuple[float, float]:
    """Where ``point_lps`` is drawn in the axial view (fitted to the volume, centred on it, R on the
    screen's left, A up)."""
    size = np.array(image.GetSize())
    corners = np.array([image.TransformContinuousIndexToPhysicalPoint([float(c) for c in corner])
                        for corner in np.array(np.meshgrid(*[[-0.5, s - 0.5] for s in size])).T.reshape(-1, 3)])
    centre = corners.mean(axis=0)
    extent = corners.max(axis=0) - corners.min(axis=0)
    box = axial.bounding_box()
    px_per_mm = min(box["width"] / extent[0], box["height"] / extent[1])
    x = box["x"] + box["width"] / 2 + (point_lps[0] - centre[0]) * px_per_mm  # LPS x grows to the left: screen right
    y = box["y"] + box["height"] / 2 + (point_lps[1] - centre[1]) * px_per_mm  # LPS y grows posterior: screen down
    return x, y


def _wait_for_clicks(page, count: int) -> None:
    """Wait until the page lists ``count`` clicks (the server's list, sent when a click is written)."""
    page.wait_for_function("n => document.querySelectorAll('#attnseg-refine-clicks li').length === n", arg=count)


def _labels_of(data: bytes) -> np.ndarray:
    from tempfile import NamedTemporaryFile

    with NamedTemporaryFile(suffix=".nii.gz") as file:
        file.write(data)
        file.flush()
        return sitk.GetArrayFromImage(sitk.ReadImage(file.name))


@pytest.mark.browser
def test_refine_in_the_browser_click_near_doubt_then_undo(browser, server, model_package):  # noqa: F811
    page = _open_session(browser, server)
    _open_sample(page)
    axial = _views(page)[0]
    page.click("#attnseg-segment")
    page.wait_for_selector("#attnseg-summary", timeout=300_000)

    # The model's output and its most doubtful region, computed here with the engine; "Next" in Review
    # puts the axial view on that region's slice.
    package = load_package(model_package.path)
    result = Predictor(package, device="cpu").predict([read_image(SAMPLE)])
    model_labels = result.labels.array
    regions = doubtful_regions(result.maps[result.review_map_name])
    assert regions, "the sample has no doubtful region"
    target = regions[0].marker_lps
    page.click("#attnseg-tab-review")
    page.click("#attnseg-next-region")
    page.wait_for_function("() => document.querySelector('#attnseg-review-text').innerText.includes('Region 1 of')")

    page.click("#attnseg-tab-refine")
    page.wait_for_selector("#attnseg-refine-class")
    image = sitk.ReadImage(str(SAMPLE))
    geometry = result.labels.geometry
    label_there = int(model_labels[tuple(np.round(click_voxel(Click(tuple(target), 0), geometry)).astype(int))])
    # A click of the class the model did not give there: background on a segmented voxel, else the first class.
    names = [c["name"] for c in package.card.class_dicts]
    chosen = "background" if label_there else names[1]
    if chosen != names[1]:  # the server chose the first class when the result came
        _choose(page, "attnseg-refine-class", "Background (remove)")
    x, y = _axial_pixel(axial, image, target)
    page.mouse.click(x, y)
    _wait_for_clicks(page, 1)
    message = page.inner_text("#attnseg-refine-message")  # set in the same update as the list
    seconds = float(re.search(r"in ([\d.]+) s", message).group(1))
    assert not page.is_visible("#attnseg-refine-error")

    # The training case holds the click (exact, LPS) and the refined labels.
    page.click("#attnseg-tab-export")
    case = zipfile.ZipFile(io.BytesIO(_download(page, "#attnseg-export-case")))
    folder = next(n.split("/")[0] for n in case.namelist())
    record = json.loads(case.read(f"{folder}/case.json"))
    assert len(record["clicks"]) == 1 and record["clicks"][0]["class"] == chosen
    position = np.array(record["clicks"][0]["position_lps"])
    assert np.linalg.norm(position[:2] - np.asarray(target)[:2]) < 3.0, (position, target)
    labels = _labels_of(case.read(f"{folder}/label.nii.gz"))
    np.testing.assert_array_equal(_labels_of(case.read(f"{folder}/model_label.nii.gz")), model_labels)
    changed = labels != model_labels
    voxel = click_voxel(Click(tuple(position), 0), geometry)
    distance = _distance_mm(labels.shape, voxel, np.asarray(geometry.spacing)[::-1])
    assert changed.any() and changed[distance <= 3].any(), "nothing changed near the click"
    assert not changed[distance > RADIUS_MM + 0.5].any(), "voxels farther than 15 mm from the click changed"

    # Undo gives back the model's labels.
    page.click("#attnseg-tab-refine")
    page.click("#attnseg-refine-undo")
    page.wait_for_function("() => document.querySelector('#attnseg-refine-message').innerText.includes('undone')")
    _wait_for_clicks(page, 0)
    page.click("#attnseg-tab-export")
    np.testing.assert_array_equal(_labels_of(_download(page, "#attnseg-download-nifti")), model_labels)

    # Hostile class names set from the client are refused, with nothing changed. The error shown is
    # cleared first, so that each click's own refusal is waited for.
    page.click("#attnseg-tab-refine")
    for hostile in ("../../etc/passwd", "Tail", 7):
        page.evaluate("values => window.trame.state.update(values)",
                      {CLICK_KEY + "selected": hostile, CLICK_KEY + "error": ""})
        page.wait_for_selector("#attnseg-refine-error", state="detached")
        _state_sent(page)
        page.mouse.click(x, y)
        page.wait_for_selector("#attnseg-refine-error")
        assert "choose a class from the list" in page.inner_text("#attnseg-refine-error")
    assert page.locator("#attnseg-refine-clicks li").count() == 0
    print(f"web click: {seconds:.2f} s from the click's arrival to the page's update")
    page.close()

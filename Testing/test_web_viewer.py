"""The web app's review table and viewer cues: a sortable table of the doubtful regions whose rows go to
their region, the image and map values under the mouse, nearest-neighbour or interpolated display,
segments filled or outlined with a legend of the classes by name and colour.

Without a browser: the table's sorting and rows, and the viewer's readings of a real MRML scene. In
Chromium (``-m browser``): every control looked at in pixels or checked against the engine.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from AttnSegLib.image import read_image
from AttnSegLib.inference import Predictor
from AttnSegLib.package import load_package
from AttnSegLib.review import Region, doubtful_regions
from AttnSegLib.mrml import newScene
from AttnSegLib.slicer_logic import SceneLogic
from AttnSegLib.web.regions_table import MAX_ROWS, next_sort, region_rows, sorted_regions
from AttnSegLib.web.viewer import class_legend, cursor_text, segment_mode, set_interpolation, voxel_value
from trame_slicer.segmentation import SegmentationOpacityEnum

from test_web import (SAMPLE, WAIT_MS, _choose, _open_sample, _open_session, _pixels, _steady_pixels,  # noqa: F401
                      _texts, _views, _wait_for_change, browser, model_package, server)


def _region(rank, ml, mean, peak, ras) -> Region:
    lps = (-ras[0], -ras[1], ras[2])
    return Region(rank, lps, (0, 0, 0), int(ml * 1000), ml, mean, peak, ml * mean, ((0, 1),) * 3)


REGIONS = [_region(0, 0.050, 0.60, 0.70, (10, 0, 5)), _region(1, 0.020, 0.90, 0.95, (-3, 4, -8)),
           _region(2, 0.030, 0.55, 0.99, (7, -2, 30))]


def test_the_region_table_sorts_by_each_column_and_says_where_each_region_is():
    assert [r.rank for r in sorted_regions(REGIONS, "rank", False)] == [0, 1, 2]
    assert [r.rank for r in sorted_regions(REGIONS, "volume", True)] == [0, 2, 1]
    assert [r.rank for r in sorted_regions(REGIONS, "mean", True)] == [1, 0, 2]
    assert [r.rank for r in sorted_regions(REGIONS, "peak", True)] == [2, 1, 0]
    assert [r.rank for r in sorted_regions(REGIONS, "position", False)] == [1, 0, 2]  # by S: slice order
    assert [r.rank for r in sorted_regions(REGIONS, "__class__", True)] == [2, 1, 0]  # unknown key: by rank
    first = region_rows(REGIONS)[0]
    assert first == {"rank": 1, "index": 0, "volume": "0.050", "mean": "0.60", "peak": "0.70", "position": "10 0 5"}
    many = [_region(i, 0.01, 0.6, 0.7, (0, 0, i)) for i in range(MAX_ROWS + 50)]
    assert len(region_rows(many)) == MAX_ROWS  # bounded: the count above the table is the true count
    # A header click sorts by that column, largest first for sizes and doubt; again: the other way.
    assert next_sort("rank", False, "volume") == ("volume", True)
    assert next_sort("volume", True, "volume") == ("volume", False)
    assert next_sort("volume", True, "position") == ("position", False)
    assert next_sort("mean", True, "'); alert(1); ('") == ("mean", True)


def test_segments_are_drawn_filled_or_outlined_as_the_user_chooses():
    assert segment_mode("auto", over_map=True) == SegmentationOpacityEnum.OUTLINE
    assert segment_mode("auto", over_map=False) == SegmentationOpacityEnum.BOTH
    assert segment_mode("fill", over_map=True) == SegmentationOpacityEnum.BOTH
    assert segment_mode("outline", over_map=False) == SegmentationOpacityEnum.OUTLINE
    assert segment_mode({"x": 1}, over_map=False) == SegmentationOpacityEnum.BOTH


def test_values_under_the_cursor_interpolation_and_legend_read_a_real_scene():
    scene = newScene()
    logic = SceneLogic(scene)
    node = logic.loadVolume(SAMPLE)
    image = read_image(SAMPLE)
    i, j, k = 12, 30, 17
    ras = (image.geometry.ijk_to_ras() @ [i + 0.3, j - 0.2, k + 0.4, 1.0])[:3]  # nearest voxel: (i, j, k)
    assert voxel_value(node, ras) == ((i, j, k), float(image.array[k, j, i]))
    assert voxel_value(node, ras + [500.0, 0, 0]) is None
    text = cursor_text(ras, node, node, "uncertainty")
    assert text.startswith(f"R {ras[0]:.1f} A {ras[1]:.1f} S {ras[2]:.1f} mm · voxel ({i}, {j}, {k}) · image ")
    assert text.endswith(f"uncertainty {image.array[k, j, i]:.4g}")
    assert cursor_text(ras + [500.0, 0, 0], node, None).endswith("outside the image")

    set_interpolation(scene, False)
    assert node.GetDisplayNode().GetInterpolate() == 0
    set_interpolation(scene, True)
    assert node.GetDisplayNode().GetInterpolate() == 1

    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.GetSegmentation().AddEmptySegment("anterior", "Anterior", (230 / 255, 159 / 255, 0.0))
    segmentation.GetSegmentation().AddEmptySegment("hidden", "Hidden", (1.0, 1.0, 1.0))
    segmentation.GetDisplayNode().SetSegmentVisibility("hidden", False)
    assert class_legend(segmentation) == [{"name": "Anterior", "color": "#e69f00"}]


# -- in Chromium ---------------------------------------------------------------------------------------
def _rows(page) -> list[list[str]]:
    """The region table's rows (their cells' texts), once the table has stopped changing."""
    return [row.split("\t") for row in _texts(page.locator(".attnseg-region-row"))]


@pytest.mark.browser
def test_region_table_cursor_values_legend_and_display_controls_in_the_browser(browser, server, model_package):
    page = _open_session(browser, server)
    _open_sample(page)
    axial = _views(page)[0]
    _choose(page, "attnseg-model-select", model_package.name)
    page.click("#attnseg-segment")
    page.wait_for_selector("#attnseg-summary", timeout=300_000)
    page.click("#attnseg-tab-review")

    # The engine's own review of the same image: the table lists its regions, most doubtful first.
    result = Predictor(load_package(model_package.path), device="cpu").predict([read_image(SAMPLE)])
    review_map = result.maps[result.review_map_name]
    regions = doubtful_regions(review_map)
    page.wait_for_selector("#attnseg-region-table")
    rows = _rows(page)
    assert f"{len(regions)} doubtful regions" in page.inner_text("#attnseg-review-text")
    assert len(rows) == min(len(regions), MAX_ROWS)
    for row, region in zip(rows, regions):
        assert row == [str(region.rank + 1), f"{region.volume_ml:.3f}", f"{region.mean_value:.2f}",
                       f"{region.peak_value:.2f}", " ".join(f"{v:.0f}" for v in region.marker_ras)]

    # Headers sort (an arrow marks the column and its direction; the rows come in the same update): size
    # largest first, again smallest first; position in slice order (S).
    page.click("#attnseg-sort-volume")
    page.wait_for_selector("#attnseg-sort-volume .mdi-arrow-down")
    sizes = [float(r[1]) for r in _rows(page)]
    assert sizes == sorted(sizes, reverse=True)
    page.click("#attnseg-sort-volume")
    page.wait_for_selector("#attnseg-sort-volume .mdi-arrow-up")
    assert [float(r[1]) for r in _rows(page)] == sorted(sizes)
    page.click("#attnseg-sort-position")
    page.wait_for_selector("#attnseg-sort-position .mdi-arrow-up")
    heights = [float(r[4].split()[2]) for r in _rows(page)]
    assert heights == sorted(heights)

    # A row goes to its region: the views move to it, the row is marked, the text names it.
    target = regions[min(2, len(regions) - 1)]
    before = _pixels(axial)
    row_of_target = [r[0] for r in _rows(page)].index(str(target.rank + 1))
    page.locator(".attnseg-region-row").nth(row_of_target).click()
    page.wait_for_function(f"() => document.querySelector('#attnseg-review-text').innerText"
                           f".startsWith('Region {target.rank + 1} of {len(regions)}')")
    _wait_for_change(axial, before)
    assert page.locator(".attnseg-region-row.bg-primary").inner_text().split("\t")[0] == str(target.rank + 1)
    assert page.locator(".attnseg-position").first.inner_text() == f"S {target.marker_ras[2]:.1f} mm"

    # The values under the mouse: the image's voxel and value, and the map's, as the engine has them.
    box = axial.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.45, box["y"] + box["height"] * 0.55)
    page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5, steps=5)
    page.wait_for_selector("#attnseg-cursor")
    pattern = (r"R (-?[\d.]+) A (-?[\d.]+) S (-?[\d.]+) mm · voxel \((\d+), (\d+), (\d+)\) · image (\S+)"
               r" · uncertainty (\S+)")
    page.wait_for_function(f"() => /{pattern}/.test(document.querySelector('#attnseg-cursor').innerText)")
    match = re.fullmatch(pattern, page.inner_text("#attnseg-cursor"))
    r, a, s = (float(match.group(n)) for n in (1, 2, 3))
    i, j, k = (int(match.group(n)) for n in (4, 5, 6))
    image = read_image(SAMPLE)
    nearest = np.round(np.linalg.inv(image.geometry.ijk_to_ras()) @ [r, a, s, 1.0])[:3].astype(int)
    assert np.abs(nearest - [i, j, k]).max() <= 1  # the position is printed to 0.1 mm
    assert float(match.group(7)) == pytest.approx(float(image.array[k, j, i]), rel=1e-3)
    assert float(match.group(8)) == pytest.approx(float(review_map.array[k, j, i]), rel=1e-3, abs=1e-4)
    page.mouse.move(box["x"] + 2, box["y"] + 2)  # away from the view's centre: no hover highlight below

    # Legend: each class by name in its colour.
    names = _texts(page.locator(".attnseg-legend-name"))
    assert names == [c["name"] for c in model_package.classes[1:]]
    swatch = page.locator(".attnseg-swatch").first.evaluate("e => getComputedStyle(e).backgroundColor")
    colour = model_package.classes[1].get("color")
    if colour:
        assert swatch == f"rgb({colour[0]}, {colour[1]}, {colour[2]})"

    # Smooth (interpolate) and the segments' style each change the picture.
    sharp = _steady_pixels(axial)
    page.click("#attnseg-interpolate")
    smooth = _wait_for_change(axial, sharp)
    changed = int((np.abs(smooth - sharp).max(axis=-1) > 40).sum())
    assert changed > 500, f"interpolation changed only {changed} pixels"
    _choose(page, "attnseg-map-select", "None")
    filled = _wait_for_change(axial, smooth)
    page.click("#attnseg-segment-style-outline")
    outlined = _wait_for_change(axial, filled)
    changed = int((np.abs(outlined - filled).max(axis=-1) > 40).sum())
    assert changed > 500, f"fill -> outline changed only {changed} pixels"
    page.close()


def _inside_viewport(page, selector: str, size: dict) -> bool:
    box = page.locator(selector).first.bounding_box()
    return box is not None and box["x"] >= 0 and box["y"] >= 0 and box["x"] + box["width"] <= size["width"] \
        and box["y"] + box["height"] <= size["height"]


@pytest.mark.browser
def test_the_page_fits_1366x768_and_opens_with_the_sample(browser, server, model_package):
    size = {"width": 1366, "height": 768}
    page = browser.new_page(viewport=size)
    page.set_default_timeout(WAIT_MS)
    page.goto(server)
    page.wait_for_selector("#attnseg-open", timeout=180_000)
    # The shipped sample is on screen before any click (the README says it is preloaded).
    page.wait_for_selector("#attnseg-loaded-volume")
    assert "hippocampus_001_image" in page.inner_text("#attnseg-loaded-volume")
    axial = _views(page)[0]
    deadline = page.evaluate("Date.now()") + 60_000
    while _pixels(axial).std() < 20:  # black until the first frame of the volume arrives
        assert page.evaluate("Date.now()") < deadline, "the axial view stayed black"
        page.wait_for_timeout(500)
    # Everything fits: no page scroll; the controls of each step are in view.
    assert page.evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]") == \
        [size["width"], size["height"]]
    for tab in ("segment", "review", "correct", "export"):
        assert _inside_viewport(page, f"#attnseg-tab-{tab}", size)
    _choose(page, "attnseg-model-select", model_package.name)
    assert _inside_viewport(page, "#attnseg-segment", size)
    # Progress names the stage from the start (it showed "starting · 0 %" until the result came): every
    # text the progress line shows is recorded as the page changes, so a fast run cannot slip past a poll.
    page.evaluate("""() => {
        window.attnsegProgressSeen = [];
        new MutationObserver(() => {
            const line = document.querySelector('#attnseg-progress');
            if (line) window.attnsegProgressSeen.push(line.innerText);
        }).observe(document.body, {subtree: true, childList: true, characterData: true});
    }""")
    page.click("#attnseg-segment")
    page.wait_for_selector("#attnseg-summary", timeout=300_000)
    seen = page.evaluate("window.attnsegProgressSeen")
    assert any(re.search("preprocess|first window|predict", text) for text in seen), \
        f"the result came before any stage was shown (progress showed {seen[:5]})"
    page.click("#attnseg-tab-review")
    page.wait_for_selector("#attnseg-next-region")
    assert _inside_viewport(page, "#attnseg-next-region", size)
    page.click("#attnseg-tab-correct")
    page.wait_for_selector(".attnseg-editor button:has(.mdi-undo)")
    for icon in ("mdi-undo", "mdi-redo"):  # undo and redo were cut in half at the bottom of the panel
        assert _inside_viewport(page, f".attnseg-editor button:has(.{icon})", size)
    page.close()

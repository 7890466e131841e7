"""Web Refine latency on a whole head, as a user sees it: ``attnseg serve`` on loopback, driven by Chromium.

    python benchmarks/web_clicks.py                        # this tree; prints one JSON object last
    python benchmarks/web_clicks.py --tree /tmp/old --output /tmp/old.json   # another source tree's server

The MNI152 T1 is uploaded and segmented (localised to both hippocampi); the Review step's "Next" puts
the axial view on the most doubtful region's slice; the Refine step is opened, "Background (remove)"
chosen, and ``--clicks`` background clicks are made at evenly spaced segmented voxels of that slice
(found with the engine's own prediction, here), back to back. Each click is timed from the mouse
click to the page listing it (the browser's side), beside the time the page's message reports (the
server's side, from the click's arrival to the scene updated). The first click is reported apart:
it is the one that may wait for what opening the step (or the end of the segmentation) prepares.

``--flow straight`` opens Refine as soon as the segmentation is shown (no Review step before), the
quickest a user can click. The machine's load average is recorded before and after: on the shared
two-core machine wall times stretch with the other jobs' share of the cores.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
SESSION_START_S = 600  # a loaded machine takes minutes to import trame and VTK


def click_targets(image_path: Path, count: int) -> list[list[float]]:
    """LPS points (mm) of ``count`` evenly spaced segmented voxels on the axial slice of the most
    doubtful region's marker, as the default package segments ``image_path``."""
    from AttnSegLib.image import read_image
    from AttnSegLib.inference import Predictor
    from AttnSegLib.package import default_package
    from AttnSegLib.refine import Click, click_voxel, voxel_click
    from AttnSegLib.review import doubtful_regions

    result = Predictor(default_package(), device="cpu").predict([read_image(image_path)])
    marker = doubtful_regions(result.maps[result.review_map_name])[0].marker_lps
    geometry = result.labels.geometry
    k = int(round(click_voxel(Click(tuple(marker), 0), geometry)[0]))
    inside = np.argwhere(result.labels.array[k] > 0)
    picked = inside[np.linspace(0, len(inside) - 1, count).astype(int)]
    return [list(voxel_click((k, j, i), 0, geometry).position_lps) for j, i in picked]


def axial_pixel(box: dict, image_path: Path, point_lps) -> tuple[float, float]:
    """Where ``point_lps`` is drawn in the axial view of bounding ``box`` (the volume fitted and centred,
    R on the screen's left, A up)."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(image_path))
    size = np.array(image.GetSize())
    corners = np.array([image.TransformContinuousIndexToPhysicalPoint([float(c) for c in corner])
                        for corner in np.array(np.meshgrid(*[[-0.5, s - 0.5] for s in size])).T.reshape(-1, 3)])
    centre, extent = corners.mean(axis=0), corners.max(axis=0) - corners.min(axis=0)
    px_per_mm = min(box["width"] / extent[0], box["height"] / extent[1])
    return (box["x"] + box["width"] / 2 + (point_lps[0] - centre[0]) * px_per_mm,
            box["y"] + box["height"] / 2 + (point_lps[1] - centre[1]) * px_per_mm)


def start_server(tree: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": f"{tree / 'AttnSegExtension'}{os.pathsep}{tree}",
           "ATTNSEG_MODELS": str(tree / "Resources" / "Models"), "PYTHONUNBUFFERED": "1",
           "ATTNSEG_WEB_MAX_UPLOAD_MB": "50"}
    server = subprocess.Popen([sys.executable, "-m", "AttnSegLib.cli", "serve", "--host", "127.0.0.1", "--port",
                               str(port)], env=env, cwd=tree, stdout=log_path.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + SESSION_START_S
    while True:
        if server.poll() is not None:
            raise SystemExit(f"attnseg serve exited with status {server.returncode}; see {log_path}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return server, f"http://127.0.0.1:{port}/"
        if time.monotonic() > deadline:
            server.kill()
            raise SystemExit(f"attnseg serve did not listen within {SESSION_START_S} s")
        time.sleep(0.5)


def measure(url: str, image_path: Path, targets: list[list[float]], flow: str) -> dict:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = chromium.new_page(viewport={"width": 1400, "height": 900})
        page.goto(url, timeout=SESSION_START_S * 1000)
        page.wait_for_selector("#attnseg-open", timeout=SESSION_START_S * 1000)
        page.locator("input#attnseg-upload").set_input_files(str(image_path))
        page.wait_for_function("() => (document.querySelector('#attnseg-loaded-volume') || {}).innerText"
                               "?.includes('mni')", timeout=600_000)
        page.click("#attnseg-segment")
        page.wait_for_selector("#attnseg-summary", timeout=1_200_000)
        shown = time.perf_counter()
        if flow == "review":
            page.click("#attnseg-tab-review")
            page.click("#attnseg-next-region")
            page.wait_for_function("() => document.querySelector('#attnseg-review-text').innerText"
                                   ".includes('Region 1 of')", timeout=600_000)
        page.click("#attnseg-tab-refine")
        page.wait_for_selector("#attnseg-refine-class", timeout=600_000)
        page.locator(".v-select:has(#attnseg-refine-class) .v-field").click()
        page.get_by_role("option", name="Background (remove)", exact=True).click()
        page.get_by_role("option").first.wait_for(state="hidden")
        before_first = time.perf_counter() - shown
        box = page.locator("img.image-display-area").first.bounding_box()
        browser_s, server_s, messages = [], [], []
        for n, point in enumerate(targets):
            x, y = axial_pixel(box, image_path, point)
            start = time.perf_counter()
            page.mouse.click(x, y)
            page.wait_for_function(f"() => document.querySelectorAll('#attnseg-refine-clicks li').length == {n + 1}",
                                   timeout=600_000, polling=20)
            browser_s.append(time.perf_counter() - start)
            message = page.inner_text("#attnseg-refine-message")
            messages.append(message)
            server_s.append(float(re.search(r"in ([\d.]+) s", message).group(1)))
            print(n, round(browser_s[-1], 3), message, file=sys.stderr, flush=True)
        chromium.close()
    return {"result_to_first_click_s": round(before_first, 3), "browser_s": [round(v, 3) for v in browser_s],
            "server_s": server_s, "first_click_browser_s": round(browser_s[0], 3),
            "first_click_server_s": server_s[0],
            "median_later_browser_s": round(float(np.median(browser_s[1:])), 3),
            "median_later_server_s": round(float(np.median(server_s[1:])), 3), "messages": messages}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, default=common.REPO, help="the source tree whose server is measured")
    parser.add_argument("--clicks", type=int, default=7)
    parser.add_argument("--flow", choices=("review", "straight"), default="review",
                        help="review: Review's Next region, then Refine (as a reader does); straight: Refine at once")
    parser.add_argument("--output", type=Path, help="JSON path (none: stdout only); the server's log beside it")
    args = parser.parse_args(argv)
    image_path = common.data_root() / common.MNI_T1
    targets = click_targets(image_path, args.clicks)
    log_path = (args.output or Path("/tmp/attnseg_web_clicks.json")).with_suffix(".log")
    load_before = os.getloadavg()
    server, url = start_server(args.tree.resolve(), log_path)
    try:
        report = measure(url, image_path, targets, args.flow)
    finally:
        server.terminate()
        server.wait(60)
    report = {"tree": str(args.tree), "flow": args.flow, "clicks": args.clicks,
              "load_average_before": [round(v, 2) for v in load_before],
              "load_average_after": [round(v, 2) for v in os.getloadavg()], **report}
    if args.output:
        args.output.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

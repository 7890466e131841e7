"""``attnseg serve --corrections FOLDER``: "Save as training case" writes the corrected case into the
server's folder, under a name the server makes, bounded in count; without a browser (the real logic
and MRML scene) and through the page in Chromium."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from AttnSegLib.package import default_package
from AttnSegLib.mrml import newScene
from AttnSegLib.slicer_logic import SceneLogic
from AttnSegLib.web.corrections import CorrectionsFolder, CorrectionsFull

from test_web import REPO, SAMPLE, _free_port, _open_sample, _open_session, browser  # noqa: F401

NAME = re.compile(r"hippocampus_001_image_\d{8}-\d{6}_[0-9a-f]{4}")


@pytest.fixture(scope="module")
def segmented():
    logic = SceneLogic(newScene())
    result = logic.segment([logic.loadVolume(SAMPLE)], default_package(), device="cpu")
    return logic, result.segmentationNode


def test_cases_are_saved_under_server_made_names_and_the_folder_is_bounded(segmented, tmp_path):
    logic, node = segmented
    folder = CorrectionsFolder(tmp_path, max_cases=2, max_saves=5)
    first = folder.save(logic, node, "hippocampus_001_image")
    second = folder.save(logic, node, "hippocampus_001_image")
    assert NAME.fullmatch(first) and NAME.fullmatch(second) and first != second
    for name in (first, second):
        assert {"label.nii.gz", "model_label.nii.gz", "review_map.nii.gz", "case.json"} <= {
            p.name for p in (tmp_path / name).iterdir()}
    with pytest.raises(CorrectionsFull, match="holds 2 cases, the most it takes") as full:
        folder.save(logic, node, "hippocampus_001_image")
    assert "\n" not in str(full.value) and len(list(tmp_path.iterdir())) == 2
    one_per_session = CorrectionsFolder(tmp_path / "other", max_saves=1)
    (tmp_path / "other").mkdir()
    one_per_session.save(logic, node, "case")
    with pytest.raises(CorrectionsFull, match="this session saved 1 cases"):
        one_per_session.save(logic, node, "case")


def test_serve_refuses_a_missing_corrections_folder(tmp_path):
    result = subprocess.run([sys.executable, "-m", "AttnSegLib.cli", "serve", "--port", str(_free_port()),
                             "--corrections", str(tmp_path / "absent")], capture_output=True, text=True, cwd=REPO,
                            timeout=120)
    assert result.returncode == 2
    error = result.stderr.strip()
    assert "no such folder" in error and "\n" not in error, error


@pytest.mark.browser
def test_save_as_training_case_writes_into_the_servers_folder(browser, tmp_path):  # noqa: F811
    import socket
    import time

    port = _free_port()
    folder = tmp_path / "corrections"
    folder.mkdir()
    process = subprocess.Popen([sys.executable, "-m", "AttnSegLib.cli", "serve", "--host", "127.0.0.1",
                                "--port", str(port), "--corrections", str(folder)],
                               env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.25)
        page = _open_session(browser, f"http://127.0.0.1:{port}/")
        _open_sample(page)
        page.click("#attnseg-segment")
        page.wait_for_selector("#attnseg-summary", timeout=300_000)
        page.click("#attnseg-tab-export")
        assert page.inner_text("#attnseg-export-case").strip().lower() == "save as training case"
        page.click("#attnseg-export-case")
        page.wait_for_selector("#attnseg-export-message", timeout=60_000)
        message = page.inner_text("#attnseg-export-message")
        name = NAME.search(message).group(0)
        assert "server's corrections folder" in message and str(folder) not in message
        assert (folder / name / "label.nii.gz").is_file() and [p.name for p in folder.iterdir()] == [name]
        page.close()
    finally:
        process.terminate()
        assert process.wait(60) == 0

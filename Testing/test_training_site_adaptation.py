"""The site-adaptation benchmark: the simulated site really changes the images, and a quick run goes
through every stage (site cases saved as corrections, the shipped model measured, fine-tuned with the
README's recipe, exported with its lineage, measured again, paired tests) on real hippocampus cases."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from AttnSegLib.image import read_image
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import site_adaptation  # noqa: E402


def test_the_simulated_site_changes_intensities_smoothly_and_reproducibly(hippocampus_dir):
    image = read_image(hippocampus_dir / "imagesTr" / "hippocampus_001.nii.gz").array.astype(np.float32)
    site = site_adaptation.simulate_site(image, seed=1)
    assert site.shape == image.shape and site.dtype == np.float32 and site.min() >= 0
    np.testing.assert_array_equal(site, site_adaptation.simulate_site(image, seed=1))
    assert not np.array_equal(site, site_adaptation.simulate_site(image, seed=2))
    # not a linear rescaling (which z-scoring would undo)
    inside = image > np.percentile(image, 50)
    assert np.corrcoef(image[inside], site[inside])[0, 1] < 0.95


def test_quick_run_measures_before_and_after_on_disjoint_cases(tmp_path):
    output = tmp_path / "site.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "site_adaptation.py"), "--quick",
                           "--output", str(output)], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(output.read_text())
    cases = report["cases"]
    assert len(cases["corrected"]) == 3 and len(cases["site_test"]) == 2 and len(cases["reference"]) == 3
    assert not set(cases["corrected"]) & set(cases["site_test"]) and not set(cases["site_test"]) & set(cases["reference"])
    for result in (report["site"], report["reference"]):
        assert set(result["per_case"]) and 0 < result["before"] <= 1 and 0 < result["after"] <= 1
        assert abs(result["difference"] - (result["after"] - result["before"])) < 2e-4
    lineage = report["fine_tuned"]["lineage"]
    assert lineage["parent"]["sha256"] == report["model"]["sha256"]
    assert sorted(c["case"] for c in lineage["corrections"]) == sorted(cases["corrected"])
    assert report["recipe"]["config"] == "training/configs/fine_tune_corrections.yaml"
    assert report["fine_tuned"]["validation_history"][0]["iteration"] == 0
    assert "| new site" in output.with_suffix(".md").read_text()

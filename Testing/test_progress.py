"""Progress from the start: the shipped model on the shipped sample (one window, seconds of work)
reports its stages before the first window ends, so a panel never shows only "starting · 0 %"."""
from __future__ import annotations

from pathlib import Path

from AttnSegLib.image import read_image
from AttnSegLib.inference import Predictor
from AttnSegLib.package import default_package

SAMPLE = Path(__file__).resolve().parents[1] / "Resources" / "SampleData" / "hippocampus_001_image.nii.gz"


def test_stages_are_reported_before_the_first_window_ends(one_torch_thread):
    calls = []
    Predictor(default_package(), device="cpu").predict([read_image(SAMPLE)],
                                                       progress=lambda f, eta, stage: calls.append((f, eta, stage)))
    assert calls[:2] == [(0.0, None, "preprocess"), (0.0, None, "first window")]
    stages = [c[2] for c in calls]
    assert stages.index("first window") < stages.index("predict") < stages.index("postprocess")
    fractions = [c[0] for c in calls]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0

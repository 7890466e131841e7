"""A correction saved by the module's logic on real MRML (slicer-core) with the shipped default model,
as training reads it: readable by others as the user's umask says, its changed voxels and its record
(the model's sha256) picked up, and a fine-tuning lineage built from it."""
from __future__ import annotations

import os
import stat

import numpy as np
import slicer  # noqa: F401  (slicer-core: the real MRML the module runs on)

from AttnSegLib.package import default_package
from AttnSegLib.mrml import newScene
from AttnSegLib.slicer_logic import SceneLogic
from conftest import REPO
from training.config import load_config
from training.data import find_cases, load_case
from training.finetune import correction_record

SAMPLE_IMAGE = REPO / "Resources" / "SampleData" / "hippocampus_001_image.nii.gz"
SAMPLE_LABEL = REPO / "Resources" / "SampleData" / "hippocampus_001_label.nii.gz"


def test_a_saved_correction_is_shared_readable_and_feeds_fine_tuning(tmp_path):
    package = default_package()
    logic = SceneLogic(newScene())
    volume = logic.loadVolume(SAMPLE_IMAGE)
    result = logic.segment([volume], package, device="cpu")
    case_dir = logic.exportCorrection(result.segmentationNode, tmp_path)

    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(case_dir.stat().st_mode) == 0o777 & ~mask  # mkdtemp alone makes it 0700
    for path in case_dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path.name

    data = load_config("fine_tune_corrections", {"data": {"root": str(tmp_path)}})["data"]
    files = find_cases(data, tmp_path)
    assert [f.name for f in files] == [case_dir.name]
    assert files[0].difference.name == "difference.nii.gz" and files[0].record.name == "case.json"
    case = load_case(files[0], data)
    assert case.changed is not None and case.changed.shape == case.label.shape
    assert not case.changed.any()  # nothing was corrected yet: the label is the model's
    record = correction_record(files[0])
    assert record == {"case": case_dir.name, "model_name": package.name, "model_sha256": package.sha256,
                      "changed_voxels": 0}
    assert np.isin(np.unique(case.label), [0, 1, 2]).all()

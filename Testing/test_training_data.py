"""Training data: every dataset layout on real files, the seeded split, label checks, patch sampling.

The MSD hippocampus and BraTS sample are read where they lie; the iSeg, plain-folder and
corrected-case layouts are written into tmp_path from real hippocampus cases.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from training.config import load_config
from training.data import (
    CaseFiles,
    DatasetError,
    LabelError,
    SkippedCaseWarning,
    check_label_values,
    detect_layout,
    find_cases,
    label_lookup,
    load_case,
    load_cases,
    load_or_make_split,
    make_split,
)
from training.patches import IterationBatches, PatchDataset

HIPPOCAMPUS_CASES = ("hippocampus_001", "hippocampus_003", "hippocampus_004")


@pytest.fixture(scope="module")
def hippocampus_data():
    """The data section of the shipped hippocampus config."""
    return load_config("hippocampus_unet")["data"]


def _write(array, reference: sitk.Image, path):
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    sitk.WriteImage(image, str(path))


def _read(path):
    image = sitk.ReadImage(str(path))
    return image, sitk.GetArrayFromImage(image)


# -- layouts ---------------------------------------------------------------------------------------
def test_msd_hippocampus_finds_every_case_and_loads_one_in_the_model_frame(hippocampus_dir, hippocampus_data):
    cases = find_cases(hippocampus_data, hippocampus_dir)
    assert len(cases) == 201 and cases[0].name == "hippocampus_001"
    assert cases[0].images[0].name == "hippocampus_001.nii.gz" and cases[0].label.parent.name == "labelsTr"
    case = load_case(cases[0], hippocampus_data)
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(cases[0].label)))
    assert case.image.shape == (1,) + reference.shape and case.image.dtype == np.float32
    np.testing.assert_array_equal(case.label, reference)  # already 1 mm RAS: no resampling at all
    assert abs(float(case.image.mean())) < 1e-4 and abs(float(case.image.std()) - 1) < 1e-3  # z-score


def test_brats_sample_two_modalities_and_five_classes(data_dir):
    """The DeepMedic BraTS sample: already z-scored inside the brain, labels stored as float 0..4."""
    data = {
        "layout": "brats",
        "modalities": [{"name": "FLAIR", "pattern": "Flair_*", "normalization": "none"},
                       {"name": "T1c", "pattern": "T1c_*", "normalization": "none"}],
        "label_pattern": "OTMultiClass*",
        "classes": [{"value": v} for v in range(5)],
    }
    cases = find_cases(data, data_dir / "brats_sample")
    assert [c.name for c in cases] == ["brats_2013_pat0003_1", "brats_2013_pat0004_1",
                                      "brats_2013_pat0005_1", "brats_2013_pat0006_1"]
    assert [p.name for p in cases[0].images] == ["Flair_subtrMeanDivStd.nii.gz", "T1c_subtrMeanDivStd.nii.gz"]
    case = load_case(cases[0], data)
    stored = sitk.GetArrayFromImage(sitk.ReadImage(str(cases[0].label)))
    flair = sitk.GetArrayFromImage(sitk.ReadImage(str(cases[0].images[0])))
    assert case.image.shape == (2, 155, 240, 240) and case.label.dtype == np.uint8
    np.testing.assert_array_equal(case.label, stored.astype(np.uint8))
    np.testing.assert_array_equal(case.image[0], flair)
    assert set(np.unique(case.label)) == {0, 1, 2, 3, 4}


def test_brats_ambiguous_pattern_is_refused_with_the_matching_files(data_dir):
    data = {"layout": "brats", "modalities": [{"name": "subtr"}], "classes": [{"value": 0}, {"value": 1}]}
    with pytest.raises(DatasetError, match="matches 2 files"):
        find_cases(data, data_dir / "brats_sample")


def test_iseg_layout_maps_its_stored_label_values(tmp_path, hippocampus_dir):
    """iSeg-2017 stores labels 0 / 10 / 150 / 250 in Analyze files; source_value maps them to 0..3."""
    for number, name in enumerate(HIPPOCAMPUS_CASES[:2], start=1):
        image, array = _read(hippocampus_dir / "imagesTr" / f"{name}.nii.gz")
        label, label_array = _read(hippocampus_dir / "labelsTr" / f"{name}.nii.gz")
        sitk.WriteImage(image, str(tmp_path / f"subject-{number}-T1.hdr"))
        _write((array.max() - array).astype(np.float32), image, tmp_path / f"subject-{number}-T2.hdr")
        _write(np.choose(label_array.astype(int), [0, 150, 250]).astype(np.uint8), label, tmp_path / f"subject-{number}-label.hdr")
    data = {"layout": "iseg", "modalities": [{"name": "T1"}, {"name": "T2"}],
            "classes": [{"value": 0}, {"value": 1, "source_value": 10}, {"value": 2, "source_value": 150},
                        {"value": 3, "source_value": 250}]}
    assert detect_layout(tmp_path) == "iseg"
    cases = find_cases(data, tmp_path)
    assert [c.name for c in cases] == ["subject-1", "subject-2"]
    assert [p.name for p in cases[0].images] == ["subject-1-T1.hdr", "subject-1-T2.hdr"]
    case = load_case(cases[0], data)
    original = sitk.GetArrayFromImage(sitk.ReadImage(str(hippocampus_dir / "labelsTr" / "hippocampus_001.nii.gz")))
    np.testing.assert_array_equal(case.label, np.choose(original.astype(int), [0, 2, 3]))
    assert case.image.shape[0] == 2


def test_plain_folder_layout_one_file_per_modality(tmp_path, hippocampus_dir):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for name in HIPPOCAMPUS_CASES:
        image, array = _read(hippocampus_dir / "imagesTr" / f"{name}.nii.gz")
        sitk.WriteImage(image, str(tmp_path / "images" / f"{name}_0000.nii.gz"))
        _write(np.sqrt(array.astype(np.float32)), image, tmp_path / "images" / f"{name}_0001.nii.gz")
        shutil.copy(hippocampus_dir / "labelsTr" / f"{name}.nii.gz", tmp_path / "labels" / f"{name}.nii.gz")
    data = {"layout": "folder", "modalities": [{"name": "T1"}, {"name": "sqrt T1"}],
            "classes": [{"value": v} for v in range(3)]}
    assert detect_layout(tmp_path) == "folder"
    cases = find_cases(data, tmp_path)
    assert [c.name for c in cases] == list(HIPPOCAMPUS_CASES)
    assert [p.name for p in cases[1].images] == ["hippocampus_003_0000.nii.gz", "hippocampus_003_0001.nii.gz"]
    (tmp_path / "images" / "hippocampus_004_0001.nii.gz").unlink()
    with pytest.raises(DatasetError, match="hippocampus_004.*1 of the 2 modality files"):
        find_cases(data, tmp_path)


def test_corrected_cases_exported_from_the_module(tmp_path, hippocampus_dir, hippocampus_data):
    """<case>/image_0000.nii.gz, label.nii.gz (the correction), difficulty, model_label, case.json."""
    for name in HIPPOCAMPUS_CASES[:2]:
        folder = tmp_path / name
        folder.mkdir()
        image, array = _read(hippocampus_dir / "imagesTr" / f"{name}.nii.gz")
        label, label_array = _read(hippocampus_dir / "labelsTr" / f"{name}.nii.gz")
        sitk.WriteImage(image, str(folder / "image_0000.nii.gz"))
        sitk.WriteImage(label, str(folder / "label.nii.gz"))
        _write(np.zeros_like(label_array), label, folder / "model_label.nii.gz")
        _write(np.full(array.shape, 0.5, np.float32), image, folder / "review_map.nii.gz")
        (folder / "case.json").write_text(json.dumps({"model": "hippocampus_unet"}))
    (tmp_path / f".{HIPPOCAMPUS_CASES[0]}.x1y2").mkdir()  # an export's staging folder, left by a crash
    assert detect_layout(tmp_path) == "corrected"
    data = {**hippocampus_data, "layout": "corrected"}
    cases = find_cases(data, tmp_path)
    assert [(c.name, c.images[0].name, c.label.name) for c in cases] == [
        (n, "image_0000.nii.gz", "label.nii.gz") for n in HIPPOCAMPUS_CASES[:2]]
    loaded = load_cases(cases, data)
    assert loaded[1].label.max() == 2 and loaded[1].image.shape[1:] == loaded[1].label.shape
    (tmp_path / HIPPOCAMPUS_CASES[0] / "label.nii.gz").unlink()
    with pytest.warns(SkippedCaseWarning, match=f"{HIPPOCAMPUS_CASES[0]}: no label.nii.gz"):
        assert [c.name for c in find_cases(data, tmp_path)] == [HIPPOCAMPUS_CASES[1]]  # the other is kept
    with pytest.raises(DatasetError, match="no label.nii.gz"):
        find_cases(data, tmp_path, strict=True)


# -- labels ----------------------------------------------------------------------------------------
def test_label_with_fractional_values_names_the_file_and_the_values(tmp_path, hippocampus_case, hippocampus_data):
    image_path, label_path = hippocampus_case
    label, array = _read(label_path)
    blurred = array.astype(np.float32)
    blurred[0, 0, :3] = [0.5, 1.25, 1.5]
    _write(blurred, label, tmp_path / "blurred.nii.gz")
    with pytest.raises(LabelError, match=r"blurred\.nii\.gz: label values must be integers, found 0\.5, 1\.25, 1\.5"):
        load_case(CaseFiles("blurred", (image_path,), tmp_path / "blurred.nii.gz"), hippocampus_data)


def test_label_with_unknown_values_names_them_and_the_known_ones():
    with pytest.raises(LabelError, match=r"case\.nii\.gz: label values \[3, 7\] are not among the dataset's classes \[0, 1, 2\]"):
        check_label_values(np.array([[[0, 1, 2, 3, 7]]]), {0: 0, 1: 1, 2: 2}, "case.nii.gz")


def test_float_labels_with_integer_values_are_mapped():
    lookup = label_lookup([{"value": 0}, {"value": 1, "source_value": 4}])
    mapped = check_label_values(np.array([[[0.0, 4.0, 4.0]]], dtype=np.float32), lookup, "x")
    assert mapped.dtype == np.uint8 and mapped.tolist() == [[[0, 1, 1]]]


# -- split -----------------------------------------------------------------------------------------
def test_split_is_seeded_disjoint_complete_and_order_free():
    names = [f"case_{i:03d}" for i in range(50)]
    split = make_split(names, 0.2, seed=7)
    assert len(split["validation"]) == 10 and len(split["train"]) == 40
    assert set(split["train"]) | set(split["validation"]) == set(names)
    assert not set(split["train"]) & set(split["validation"])
    assert make_split(list(reversed(names)), 0.2, seed=7) == split
    assert make_split(names, 0.2, seed=8) != split


def test_split_is_written_once_and_read_back(tmp_path):
    names = [f"case_{i}" for i in range(10)]
    path = tmp_path / "split.json"
    first = load_or_make_split(path, names, 0.3, seed=0)
    assert json.loads(path.read_text()) == first
    assert load_or_make_split(path, names, 0.5, seed=99) == first  # the stored split wins
    with pytest.raises(DatasetError, match="does not fit this dataset"):
        load_or_make_split(path, names[:5], 0.3, seed=0)


# -- patches ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hippocampus_patches(hippocampus_dir, hippocampus_data):
    files = find_cases(hippocampus_data, hippocampus_dir)[:6]
    config = load_config("hippocampus_unet")
    cases = load_cases(files, hippocampus_data)
    return PatchDataset(cases, config["patch_size"], 3, config["sampling"], config["augmentation"], seed=3)


def test_patches_are_a_pure_function_of_seed_and_index(hippocampus_patches):
    first, again, other = hippocampus_patches[11], hippocampus_patches[11], hippocampus_patches[12]
    assert first["image"].shape == (1, 40, 56, 40) and first["label"].shape == (40, 56, 40)
    assert first["label"].dtype == torch.long
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["label"], again["label"])
    assert not torch.equal(first["image"], other["image"])


def test_patches_sample_foreground_at_the_configured_ratio(hippocampus_patches):
    """foreground_ratio 0.67: about two thirds of the crops are centred on a hippocampus voxel; with
    whole crops nearly every patch holds both classes."""
    labels = [hippocampus_patches[i]["label"] for i in range(60)]
    with_both = np.mean([bool((lab == 1).any() and (lab == 2).any()) for lab in labels])
    assert with_both > 0.8


def test_iteration_batches_give_each_rank_its_own_indices_and_resume_where_they_stopped():
    rank0 = list(IterationBatches(0, 3, batch_size=2, rank=0, world_size=2))
    rank1 = list(IterationBatches(0, 3, batch_size=2, rank=1, world_size=2))
    assert rank0 == [[0, 1], [4, 5], [8, 9]] and rank1 == [[2, 3], [6, 7], [10, 11]]
    assert list(IterationBatches(1, 3, batch_size=2, rank=0, world_size=2)) == rank0[1:]

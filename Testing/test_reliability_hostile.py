"""Hostile inputs, second round: each failure a tester reproduced, and what AttnSeg does now.

File names that are not UTF-8, spacings and cards in the wrong units, colliding or escaping batch case
names, hot voxels, swapped / duplicated / partial modalities, more than 255 classes, ``attnseg evaluate``
on missing, empty, fractional or foreign label maps, ``--overwrite`` over a previous run and a closed
stdout pipe. The rule throughout: a clear one-line error (exit 2) or a notice, never a wrong answer
with exit 0, a process abort or a mix of two runs.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from AttnSegLib import models
from AttnSegLib.cli import main
from AttnSegLib.image import Geometry, Image, ImageError, physical_memory_bytes, read_image, write_image
from AttnSegLib.inference import Predictor
from AttnSegLib.intensity import clip_and_standardise
from AttnSegLib.metrics import image_diagonal_mm
from AttnSegLib.package import PackageError, load_package, save_package
from AttnSegLib.preprocess import check_model_frame_size, to_model_frame
from test_reliability_cli import assert_one_error

ATTNSEG = Path(sys.executable).with_name("attnseg")
CLASSES = [{"value": 0, "name": "background"}, {"value": 1, "name": "Anterior"}, {"value": 2, "name": "Posterior"}]
SHIPPED = Path(__file__).resolve().parents[1] / "Resources" / "Models"


def tiny_card(modalities: list[str], classes: list[dict] = CLASSES, **extra) -> dict:
    return {"name": f"tiny_{len(modalities)}_{len(classes)}", "architecture": {"name": "unet", "kwargs": {"features": [4, 8]}},
            "modalities": [{"name": n, "normalization": "zscore"} for n in modalities], "classes": classes,
            "patch_size_dhw": [16, 32, 16], "spacing_xyz_mm": [1.0, 1.0, 1.0], "orientation": "RAS",
            "inference": {"overlap": 0.25, "batch_size": 2}, **extra}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    """A small untrained one-modality package: these tests are about what the user sees."""
    torch.manual_seed(0)
    net = models.build("unet", 1, 3, features=[4, 8])
    return save_package(tmp_path_factory.mktemp("package") / "tiny", tiny_card(["T1"]), net.state_dict()).path


@pytest.fixture(scope="module")
def image(hippocampus_case) -> Image:
    return read_image(hippocampus_case[0])


def run_main(capsys, *args: str) -> tuple[int, str, list[str]]:
    status = main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, [line for line in captured.err.splitlines() if line.strip()]


def attnseg(*args, timeout: float = 240) -> subprocess.CompletedProcess:
    """The installed executable; arguments may be bytes (file names that are not UTF-8)."""
    return subprocess.run([str(ATTNSEG), *args], capture_output=True, encoding="utf-8", errors="replace",
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def tree(folder: Path) -> list[bytes]:
    """Every name under ``folder`` (bytes: some are not UTF-8), hidden ones included."""
    return sorted(os.fsencode(p.relative_to(folder)) for p in folder.rglob("*"))


# -- 1. file names that are not UTF-8 ----------------------------------------------------------------
@pytest.mark.parametrize("name", [b"bad\xff.nii.gz", b"M\xfcller.nrrd", b"M\xfcller.mha", "Müller.nii".encode()])
def test_names_that_are_not_utf8_are_read_and_written(name, image, tmp_path):
    folder = tmp_path / os.fsdecode(b"Gr\xfc\xdfe")  # a Latin-1 folder name too
    path = folder / os.fsdecode(name)
    write_image(image, path)
    assert os.fsencode(path.name) in os.listdir(os.fsencode(folder))
    back = read_image(path)
    np.testing.assert_array_equal(back.array, image.array)
    assert back.geometry.same_grid(image.geometry)


def test_detached_header_in_a_latin1_folder_is_read_and_one_with_a_latin1_name_refused(image, tmp_path):
    folder = tmp_path / os.fsdecode(b"Gr\xfc\xdfe")
    folder.mkdir()
    sitk.WriteImage(image.to_sitk(), str(tmp_path / "case.mhd"))
    for suffix in (".mhd", ".raw"):
        shutil.move(tmp_path / f"case{suffix}", folder / f"case{suffix}")
    np.testing.assert_array_equal(read_image(folder / "case.mhd").array, image.array)
    bad = folder / os.fsdecode(b"c\xe4se.mhd")
    shutil.move(folder / "case.mhd", bad)
    with pytest.raises(ImageError, match="the file name is not valid UTF-8 and the header names a separate data "
                                         "file; rename the header to a UTF-8 name"):
        read_image(bad)


def test_latin1_names_through_the_attnseg_command(package, hippocampus_case, tmp_path):
    """The process used to abort inside ITK (exit 134); now a single case and a batch both segment,
    into Latin-1 output folders, and leave no staging folder."""
    cases = tmp_path / "cases"
    cases.mkdir()
    for name in (b"bad\xff.nii.gz", b"M\xfcller.nii.gz", b"good.nii.gz"):
        shutil.copy(hippocampus_case[0], os.path.join(os.fsencode(cases), name))
    single_out = os.path.join(os.fsencode(tmp_path), b"out\xff")
    result = attnseg(b"segment", b"-i", os.path.join(os.fsencode(cases), b"M\xfcller.nii.gz"), b"-o", single_out,
                     b"--model", os.fsencode(package))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert sorted(os.listdir(single_out)) == [b"labels.nii.gz", b"maps", b"probabilities.nii.gz", b"report.json"]
    batch_out = tmp_path / "batch"
    result = attnseg("segment", "-i", str(cases), "-o", str(batch_out), "--model", str(package))
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(os.fsencode(batch_out))) == [b"M\xfcller", b"bad\xff", b"good"]
    for case in os.listdir(os.fsencode(batch_out)):
        assert b"report.json" in os.listdir(os.path.join(os.fsencode(batch_out), case))
    assert not [p for p in tree(batch_out) if b"/." in b"/" + p]  # no hidden staging leftovers


# -- 2. spacings, sizes and card values in the wrong units ------------------------------------------------
@pytest.mark.parametrize("spacing, phrase", [
    (100.0, "are 100 times finer or coarser than the model's (1, 1, 1 mm)"),
    (1e-6, "are 1e+06 times finer or coarser than the model's"),
])
def test_spacing_in_the_wrong_units_is_refused_before_resampling(spacing, phrase, package, image, tmp_path, capsys):
    path = tmp_path / "units.nii.gz"
    write_image(Image(image.array, Geometry(image.geometry.size, (spacing,) * 3, image.geometry.origin,
                                            image.geometry.direction)), path)
    status, _, lines = run_main(capsys, "segment", "-i", str(path), "-o", str(tmp_path / "out"), "--model", str(package))
    assert status == 2
    assert_one_error(lines, phrase)
    assert "probably in the wrong units (mm expected) — fix the header" in lines[0]
    assert not (tmp_path / "out").exists() or tree(tmp_path / "out") == []


def test_spacing_in_the_wrong_units_is_refused_before_localising(image, tmp_path, capsys):
    """The default (localising) model: 100 mm voxels make the crop look like a whole body, and the
    registration's resampling to 2 mm used to fail allocating ("Failed to allocate memory for image")."""
    path = tmp_path / "units.nii.gz"
    write_image(Image(image.array, Geometry(image.geometry.size, (100.0,) * 3, image.geometry.origin,
                                            image.geometry.direction)), path)
    status, _, lines = run_main(capsys, "segment", "-i", str(path), "-o", str(tmp_path / "out"))
    assert status == 2
    assert_one_error(lines, "are 100 times finer or coarser than the model's (1, 1, 1 mm)")


def test_a_model_frame_too_large_for_memory_is_refused_before_allocating():
    """The resampled grid is estimated from the header: a 10x upsampling of a grid that fits (by the
    header check) would not."""
    side = int((physical_memory_bytes() / 8) ** (1 / 3) / 10) + 1
    geometry = Geometry((side,) * 3, (10.0,) * 3, (0.0,) * 3, (1, 0, 0, 0, 1, 0, 0, 0, 1))
    with pytest.raises(ImageError, match=r"resampling the image to the model's 1, 1, 1 mm voxels makes a grid of "
                                         r".* voxels needing .* GiB, more than this machine's"):
        check_model_frame_size(geometry, (1.0, 1.0, 1.0), 1)
    check_model_frame_size(geometry, (10.0, 10.0, 10.0), 1)  # at its own spacing it fits


@pytest.mark.parametrize("field, value, phrase", [
    ("spacing_xyz_mm", [1e-300, 1.0, 1.0], "'spacing_xyz_mm' must be null or three numbers from 0.01 to 50.0 (mm)"),
    ("spacing_xyz_mm", [1e300, 1e300, 1e300], "'spacing_xyz_mm' must be null or three numbers from 0.01 to 50.0"),
    ("patch_size_dhw", [1024, 1024, 1024], "'patch_size_dhw' [1024, 1024, 1024] holds 1073741824 voxels, more than"),
    ("inference", {"batch_size": 10**9}, "'inference.batch_size' must be an integer from 1 to 512"),
    ("classes", CLASSES[:2] + [{"value": 2, "name": "x", "color": [0, 300, 0]}],
     "a class 'color' must be three integers from 0 to 255"),
])
def test_card_values_outside_physical_ranges_are_refused(field, value, phrase, tmp_path):
    torch.manual_seed(0)
    card = tiny_card(["T1"])
    card[field] = value
    with pytest.raises(PackageError, match=None) as refused:
        save_package(tmp_path / "pkg", card, models.build("unet", 1, 3, features=[4, 8]).state_dict())
    assert phrase in str(refused.value) and "\n" not in str(refused.value)


# -- 3. batch case names ---------------------------------------------------------------------------
@pytest.mark.parametrize("names, phrase", [
    (["a.nii.gz", "a.nrrd"], "a.nii.gz and a.nrrd would both be written to case 'a'; rename or move one of them"),
    (["A.nii.gz", "a.nii.gz"], "A.nii.gz and a.nii.gz would both be written to case 'a'"),
    (["...nii.gz", "b.nii.gz"], "...nii.gz: the case name '..' is not a usable folder name inside --output"),
])
def test_batch_case_names_are_unique_and_stay_inside_the_output(names, phrase, package, image, tmp_path, capsys):
    cases = tmp_path / "cases"
    for name in names:
        write_image(image, cases / name)
    out = tmp_path / "nest" / "out"
    status, _, lines = run_main(capsys, "segment", "-i", str(cases), "-o", str(out), "--model", str(package))
    assert status == 2
    assert_one_error(lines, phrase)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cases"]  # nothing written, above --output neither


# -- 4. hot voxels -----------------------------------------------------------------------------------
def test_normalisation_survives_a_voxel_at_1e20():
    values = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    values[0, 0, 0] = 1e20
    profile = clip_and_standardise(values)
    assert np.isfinite(values).all() and abs(float(values.mean())) < 1e-4 and abs(float(values.std()) - 1) < 1e-3
    assert profile.extreme == pytest.approx(1e20) and profile.outlier_extent > 1e15


@pytest.mark.parametrize("kind", ["blank", "one_voxel"])
def test_a_blank_or_nearly_blank_crop_is_segmented_without_a_traceback(kind, package, image, tmp_path, capsys):
    """An image of zeros (or zeros and one bright voxel): its zeros and their rim leave no tissue to
    measure the intensity profile on; the z-score normalisation crashed in np.percentile on an empty
    sample (IndexError, a traceback). Now it runs; a constant image says so."""
    array = np.zeros(image.array.shape, dtype=np.float32)
    if kind == "one_voxel":
        array[tuple(n // 2 for n in array.shape)] = 100.0
    path = tmp_path / f"{kind}.nii.gz"
    write_image(image.with_array(array), path)
    status, _, lines = run_main(capsys, "segment", "-i", str(path), "-o", str(tmp_path / "out"), "--model", str(package))
    assert status == 0, lines
    assert "Traceback" not in "\n".join(lines)
    assert (kind == "blank") == any("is constant (0.0); the prediction will be meaningless" in line for line in lines)


@pytest.fixture(scope="module")
def default_predictor():
    return Predictor(load_package("hippocampus_difficulty_aware"), device="cpu", with_maps=False)


@pytest.mark.parametrize("hot", [1e20, 1e6])
def test_a_hot_voxel_changes_nothing_and_is_noticed(hot, default_predictor, image):
    """With the shipped default package on a held-out case: one voxel at 1e20 gave Dice 0.39 / 0.00 and
    one at 1e6 moved the posterior volume 1.43 -> 2.09 ml, silently; now the labels are the clean
    input's (the clip fence lies beyond all anatomy) and a notice names the voxel."""
    clean = default_predictor.predict([image])
    assert clean.notices == []  # a held-out case is not flagged
    array = image.array.astype(np.float32)
    array[0, 0, 0] = hot
    hot_result = default_predictor.predict([image.with_array(array)])
    assert np.mean(hot_result.labels.array == clean.labels.array) > 0.9999
    [notice] = hot_result.notices
    assert notice.startswith(f"T1: voxels as extreme as {hot:.4g} lie far outside the image's range; they were "
                             "clipped to ") and notice.endswith(" — check the image for hot pixels or a wrong data type")


@pytest.mark.parametrize("kind", ["label_map", "other_contrast"])
def test_an_image_unlike_the_training_cases_is_noticed(kind, default_predictor, image, hippocampus_case):
    """The label map given as the image, or a contrast the model never saw: the shipped card's
    intensity statistics flag both."""
    strange = (read_image(hippocampus_case[1]) if kind == "label_map"
               else image.with_array(np.exp(image.array / np.float32(20.0)).astype(np.float32)))
    notices = default_predictor.predict([strange]).notices
    assert any(n.startswith("T1: its intensity distribution is unlike the training cases'") and
               n.endswith("the result may be unreliable — check that this is a T1 image") for n in notices), notices


def test_no_held_out_case_is_flagged(hippocampus_dir):
    """The same statistics raise no notice on any of the 40 held-out cases of the default package."""
    card = load_package("hippocampus_difficulty_aware").card
    for case in card["training"]["validation_cases"]:
        prepared = to_model_frame([read_image(hippocampus_dir / "imagesTr" / f"{case}.nii.gz")], card["modalities"],
                                  card["spacing_xyz_mm"], card["orientation"], False, card["input_statistics"])
        assert [n for n in prepared.notices if "reoriented" not in n] == [], case


def test_shipped_cards_record_the_training_intensity_statistics():
    for folder in sorted(p for p in SHIPPED.iterdir() if (p / "model.json").is_file()):  # refinement/ holds click refiners
        card = load_package(folder).card
        statistics = card["input_statistics"]
        assert [m["name"] for m in statistics["modalities"]] == [m["name"] for m in card["modalities"]]
        for modality in statistics["modalities"]:
            assert modality["cases"] == card["training"]["cases_train"]
            assert len(modality["quantiles_min"]) == len(statistics["levels"]) == len(modality["quantiles_max"])
            assert all(a <= b <= c for a, b, c in zip(modality["quantiles_min"], modality["quantiles_median"],
                                                      modality["quantiles_max"]))


def test_the_shipped_statistics_are_measured_from_the_training_cases(tmp_path, capsys):
    """``python -m training.statistics`` on a copy of the BraTS package without them writes back the
    shipped card: the numbers come from its three training cases. Everything else is byte for byte;
    the statistics agree to 1e-3 (their last rounded digit moves with the resampling library's version,
    e.g. 2.25 -> 2.2501)."""
    from training.statistics import main as statistics_main

    copy = shutil.copytree(SHIPPED / "brats_sample_unet", tmp_path / "brats_sample_unet")
    card = json.loads((copy / "model.json").read_text())
    del card["input_statistics"]
    (copy / "model.json").write_text(json.dumps(card, indent=2) + "\n")
    assert statistics_main(["--model", str(copy)]) == 0
    written = json.loads((copy / "model.json").read_text())
    shipped = json.loads((SHIPPED / "brats_sample_unet" / "model.json").read_text())
    assert _numbers(written.pop("input_statistics")) == pytest.approx(_numbers(shipped.pop("input_statistics")), abs=1e-3)
    assert written == shipped
    assert "FLAIR over 3 training cases" in capsys.readouterr().out


def _numbers(tree) -> list[float]:
    """The numbers of a JSON tree, depth first (keys in order), for comparing with a tolerance."""
    if isinstance(tree, dict):
        return [n for key in sorted(tree) for n in _numbers(tree[key])]
    if isinstance(tree, list):
        return [n for item in tree for n in _numbers(item)]
    return [float(tree)] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


# -- 5. modalities that are swapped, duplicated or partial ----------------------------------------------------
@pytest.fixture(scope="module")
def brats(data_dir) -> tuple[Predictor, list[Image]]:
    package = load_package("brats_sample_unet")
    case = data_dir / "brats_sample" / package.card["training"]["validation_cases"][0]
    return (Predictor(package, device="cpu", with_maps=False),
            [read_image(next(case.glob(f"{m}*"))) for m in ("Flair", "T1c")])


def test_the_same_image_given_for_two_modalities_is_noticed(brats):
    predictor, (flair, _) = brats
    notices = predictor.predict([flair, flair]).notices
    assert "T1c is the same image as FLAIR; the model needs a different image per modality — give the T1c file" \
        in notices


def test_a_modality_covering_half_the_field_of_view_is_noticed(brats):
    predictor, (flair, t1c) = brats
    half = t1c.array[:, :, : t1c.geometry.size[0] // 2]
    g = t1c.geometry
    t1c_half = Image(np.ascontiguousarray(half), Geometry((half.shape[2],) + g.size[1:], g.spacing, g.origin, g.direction))
    notices = predictor.predict([flair, t1c_half]).notices
    assert ("T1c covers only 50% of FLAIR's field of view; the model sees zeros beyond it, so the segmentation "
            "there is unreliable — give images of the same region") in notices


BRATS_SWAP_NOTICE = ("the modalities look swapped: input 1 (given as FLAIR) looks like T1c, input 2 (given as T1c) "
                     "looks like FLAIR; give them in the model's order (FLAIR, T1c)")


def test_the_brats_models_inputs_swapped_are_noticed(brats):
    """The held-out case with FLAIR and T1c swapped (enhancing tumour Dice 0.66 -> 0.10 without a word):
    their histograms, z-scored inside the brain by the data's providers, are alike, but T1c is the
    rougher contrast in every training case, and here."""
    predictor, (flair, t1c) = brats
    assert BRATS_SWAP_NOTICE in predictor.predict([t1c, flair]).notices


def test_no_brats_case_is_flagged_in_the_right_order_and_every_one_swapped(data_dir):
    card = load_package("brats_sample_unet").card
    for case in sorted((data_dir / "brats_sample").iterdir()):
        flair, t1c = (read_image(next(case.glob(f"{m}*"))) for m in ("Flair", "T1c"))
        for images, swapped in (([flair, t1c], False), ([t1c, flair], True)):
            prepared = to_model_frame(images, card["modalities"], card["spacing_xyz_mm"], card["orientation"],
                                      card["crop_to_nonzero"], card["input_statistics"])
            unusual = [n for n in prepared.notices if "brought back to the input grid" not in n]
            assert unusual == ([BRATS_SWAP_NOTICE] if swapped else []), (case.name, unusual)


@pytest.mark.parametrize("copy", ["rescaled", "int16"])
def test_a_copy_of_one_modality_given_for_another_is_noticed(copy, brats):
    """FLAIR given twice, the second copy rescaled or stored as int16 (not equal voxel for voxel)."""
    predictor, (flair, _) = brats
    second = flair.array * np.float32(1.5) + np.float32(0.2) if copy == "rescaled" else \
        np.round(flair.array * 1000).astype(np.int16)
    prepared = to_model_frame([flair, flair.with_array(second)], predictor.card["modalities"])
    assert any(n.startswith("T1c looks like a copy of FLAIR (their voxels correlate 1.0000); the model needs a "
                            "different image per modality — give the T1c file") for n in prepared.notices), \
        prepared.notices


@pytest.mark.parametrize("padding", ["background", "zero"])
def test_a_modality_scanned_over_half_the_region_and_padded_onto_the_same_grid_is_noticed(padding, brats):
    predictor, (flair, t1c) = brats
    half = t1c.array.copy()
    half[:, :, half.shape[2] // 2:] = half.min() if padding == "background" else 0
    prepared = to_model_frame([flair, t1c.with_array(half)], predictor.card["modalities"])
    partial = [n for n in prepared.notices if n.startswith("T1c covers only ")]
    assert len(partial) == 1 and partial[0].endswith(
        "% of FLAIR's field of view; the model sees zeros beyond it, so the segmentation there is unreliable — "
        "give images of the same region"), prepared.notices
    assert 45 <= int(partial[0].split()[3].rstrip("%")) <= 55


def test_swapped_modalities_are_noticed_when_their_intensities_differ(image, hippocampus_dir, tmp_path):
    """Two modalities with different histograms (a T1 crop and its square root, inverted), statistics
    measured on training cases: given in the wrong order, a notice; in the right order, none."""
    from training.statistics import measure
    from training.data import CaseFiles

    def second(array):
        return -np.sqrt(np.maximum(array.astype(np.float32), 0))

    files = []
    for index, path in enumerate(sorted((hippocampus_dir / "imagesTr").glob("hippocampus_0*.nii.gz"))[:6]):
        t1 = read_image(path)
        write_image(t1.with_array(second(t1.array)), tmp_path / f"{index}_b.nii.gz")
        files.append(CaseFiles(str(index), (path, tmp_path / f"{index}_b.nii.gz"), None))
    card = tiny_card(["A", "B"])
    card["input_statistics"] = measure(files, {"modalities": card["modalities"], "spacing_xyz_mm": [1.0] * 3,
                                               "orientation": "RAS"}, progress=False)
    other = image.with_array(second(image.array))
    for images, swapped in (([image, other], False), ([other, image], True)):
        prepared = to_model_frame(images, card["modalities"], [1.0] * 3, "RAS", False, card["input_statistics"])
        notice = ("the modalities look swapped: input 1 (given as A) looks like B, input 2 (given as B) looks like A; "
                  "give them in the model's order (A, B)")
        assert (notice in prepared.notices) == swapped, prepared.notices


# -- 6. more than 255 classes -------------------------------------------------------------------------
def test_more_than_255_classes_keep_their_values(image, tmp_path):
    classes = [{"value": v, "name": f"c{v}"} for v in range(300)]
    torch.manual_seed(0)
    network = models.build("unet", 1, 300, features=[4, 8])
    last = [m for m in network.modules() if isinstance(m, torch.nn.Conv3d) and m.out_channels == 300][-1]
    with torch.no_grad():
        last.bias[290] = 1e4  # class 290 everywhere: it used to be stored as 34
    result = Predictor(network, card=tiny_card(["T1"], classes), device="cpu", with_maps=False).predict([image])
    assert result.labels.array.dtype == np.uint16 and set(np.unique(result.labels.array)) == {290}
    write_image(result.labels, tmp_path / "labels.nii.gz")
    assert set(np.unique(read_image(tmp_path / "labels.nii.gz").array)) == {290}


def test_more_than_255_classes_survive_training_loading_and_patches(hippocampus_case, tmp_path):
    """A label map with class 290 is read, looked up and cropped into training patches as 290 (the
    loader's uint8 table stored it as 34)."""
    from training.data import CaseFiles, load_case
    from training.patches import PatchDataset

    classes = [{"value": v, "name": f"c{v}"} for v in range(300)]
    label = read_image(hippocampus_case[1])
    wide = label.array.astype(np.uint16)
    wide[wide == 2] = 290
    write_image(label.with_array(wide), tmp_path / "label.nii.gz")
    case = load_case(CaseFiles("wide", (hippocampus_case[0],), tmp_path / "label.nii.gz"),
                     {"modalities": [{"name": "T1", "normalization": "zscore"}], "classes": classes,
                      "spacing_xyz_mm": [1.0] * 3, "orientation": "RAS"})
    assert set(np.unique(case.label)) == {0, 1, 290}
    augmentation = {"affine_prob": 1.0, "rotate_deg": 10, "scale": [0.9, 1.1], "flip_axes": [0, 1, 2], "flip_prob": 0.5}
    patches = PatchDataset([case], [16, 32, 16], 300, {"foreground_ratio": 1.0}, augmentation, seed=0)
    seen = set().union(*(np.unique(patches[i]["label"].numpy()).tolist() for i in range(4)))
    assert 290 in seen and seen <= {0, 1, 290}


def test_more_than_255_classes_survive_click_refinement(image):
    from AttnSegLib.refine import Click, Refiner
    classes = 300
    probabilities = np.full((classes,) + image.array.shape, 0.1 / (classes - 1), dtype=np.float32)
    probabilities[290] = 0.9
    refined = Refiner("sphere").refine(image.array[None].astype(np.float32), probabilities, image.geometry,
                               [Click(tuple(image.geometry.ijk_to_lps()[:3, 3]), 0)])
    assert refined.labels.dtype == np.uint16 and 290 in np.unique(refined.labels)


# -- 7. attnseg evaluate ------------------------------------------------------------------------------
@pytest.fixture
def evaluation_folders(hippocampus_dir, tmp_path) -> tuple[Path, Path, dict[str, Path]]:
    """Three references; predictions: one perfect, one empty, one missing."""
    refs, preds = tmp_path / "refs", tmp_path / "preds"
    labels = sorted((hippocampus_dir / "labelsTr").glob("hippocampus_0*.nii.gz"))[:3]
    names = {}
    for path, kind in zip(labels, ("perfect", "empty", "missing")):
        names[kind] = path
        refs.mkdir(exist_ok=True)
        shutil.copy(path, refs / path.name)
        label = read_image(path)
        if kind == "perfect":
            write_image(label, preds / path.name)
        elif kind == "empty":
            write_image(label.with_array(np.zeros_like(label.array)), preds / path.name)
    return preds, refs, names


def test_evaluate_counts_every_reference_and_scores_missing_and_empty_predictions(evaluation_folders, capsys):
    preds, refs, names = evaluation_folders
    status, out, lines = run_main(capsys, "evaluate", "-p", str(preds), "-r", str(refs), "--json",
                                  "--model", "hippocampus_difficulty_aware")
    assert status == 0
    summary = json.loads(out)
    case = {kind: path.name.removesuffix(".nii.gz") for kind, path in names.items()}
    assert summary["n_cases"] == 3 and summary["missing_predictions"] == [case["missing"]]
    assert list(summary["mean"]) == ["Anterior", "Posterior"]  # the package's class names
    assert summary["cases"][case["perfect"]]["Anterior"]["dice"] == 1.0
    for kind in ("empty", "missing"):
        diagonal = image_diagonal_mm(read_image(names[kind]).geometry)
        for metrics in summary["cases"][case[kind]].values():
            assert metrics["dice"] == 0.0 and metrics["asd_mm"] == metrics["hd95_mm"] == diagonal
    assert summary["mean"]["Anterior"]["dice"] == pytest.approx(1 / 3, abs=1e-4)
    assert lines == [f"attnseg: notice: {n}" for n in summary["notices"]] and len(lines) == 2
    assert any(f"{case['missing']}: no prediction; scored as an empty one (Dice 0" in n for n in lines)
    assert any(f"{case['empty']}: nothing predicted for Anterior, Posterior; scored as Dice 0" in n for n in lines)


def test_evaluate_prints_class_names_from_the_package(evaluation_folders, capsys):
    preds, refs, _ = evaluation_folders
    status, out, _ = run_main(capsys, "evaluate", "-p", str(preds), "-r", str(refs), "-m", "hippocampus_difficulty_aware")
    assert status == 0 and "Anterior" in out and "Posterior" in out
    status, out, _ = run_main(capsys, "evaluate", "-p", str(preds), "-r", str(refs))
    assert status == 0 and "Anterior" not in out  # without a package the classes are their values


@pytest.mark.parametrize("kind, phrase", [
    ("fractional", "holds values that are not whole class numbers (e.g. 0.999999881)"),
    ("image", "holds class values"),
    ("unknown_class", "holds class values 7 that the model does not have; check --model"),
])
def test_evaluate_refuses_what_is_not_a_label_map_of_the_model(kind, phrase, hippocampus_case, tmp_path, capsys):
    label = read_image(hippocampus_case[1])
    prediction = tmp_path / "prediction.nrrd"
    if kind == "fractional":
        write_image(label.with_array(label.array.astype(np.float32) * np.float32(0.9999999)), prediction)
    elif kind == "image":
        shutil.copy(hippocampus_case[0], tmp_path / "prediction.nii.gz")
        prediction = tmp_path / "prediction.nii.gz"
    else:
        array = label.array.copy()
        array[0, 0, 0] = 7
        write_image(label.with_array(array), prediction)
    status, _, lines = run_main(capsys, "evaluate", "-p", str(prediction), "-r", str(hippocampus_case[1]),
                                "-m", "hippocampus_difficulty_aware")
    assert status == 2
    assert_one_error(lines, phrase)


# -- 8. --overwrite and a closed pipe ---------------------------------------------------------------
def test_overwrite_replaces_the_whole_result_set(package, hippocampus_case, tmp_path, capsys):
    out = tmp_path / "out"
    base = ("segment", "-i", str(hippocampus_case[0]), "-o", str(out), "--model", str(package))
    assert run_main(capsys, *base, "--preview")[0] == 0
    assert (out / "preview.png").is_file()
    elsewhere = tmp_path / "elsewhere"
    shutil.move(out / "maps", elsewhere)
    os.symlink(elsewhere, out / "maps")  # maps/ a link to a folder somewhere else
    kept = sorted(p.name for p in elsewhere.iterdir())
    (out / "notes.txt").write_text("the user's own file")
    assert run_main(capsys, *base, "--overwrite")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["labels.nii.gz", "maps", "notes.txt", "probabilities.nii.gz",
                                                    "report.json"]  # no stale preview.png
    assert not (out / "maps").is_symlink() and sorted(p.name for p in elsewhere.iterdir()) == kept


def test_overwrite_that_cannot_finish_leaves_the_previous_results(package, hippocampus_case, tmp_path, capsys):
    out = tmp_path / "out"
    base = ("segment", "-i", str(hippocampus_case[0]), "-o", str(out), "--model", str(package))
    assert run_main(capsys, *base, "--preview")[0] == 0
    (out / "notes.txt").write_text("the user's own file")  # so the results move one by one, not the folder whole
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    if subprocess.run(["chattr", "+i", str(out / "report.json")], capture_output=True).returncode != 0:
        pytest.skip("chattr +i (an immutable file, so that a rename fails for real) is not available here")
    try:
        status, _, lines = run_main(capsys, *base, "--overwrite")
    finally:
        subprocess.run(["chattr", "-i", str(out / "report.json")], check=True)
    assert status == 2
    assert_one_error(lines, f"could not write the results into {out} (Operation not permitted); it was left as it was")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_overwrite_of_a_results_folder_swaps_it_whole_and_leaves_a_linked_maps_folder_alone(
        package, hippocampus_case, tmp_path, capsys):
    out = tmp_path / "out"
    base = ("segment", "-i", str(hippocampus_case[0]), "-o", str(out), "--model", str(package))
    assert run_main(capsys, *base, "--preview")[0] == 0
    elsewhere = tmp_path / "elsewhere"
    shutil.move(out / "maps", elsewhere)
    os.symlink(elsewhere, out / "maps")
    kept = {p.name: p.read_bytes() for p in elsewhere.iterdir()}
    assert run_main(capsys, *base, "--overwrite")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["labels.nii.gz", "maps", "probabilities.nii.gz", "report.json"]
    assert not (out / "maps").is_symlink() and {p.name: p.read_bytes() for p in elsewhere.iterdir()} == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "out"]  # nothing staged is left


@pytest.mark.parametrize("atomic", [True, False])
def test_replace_folder_swaps_whole_folders(atomic, tmp_path, monkeypatch):
    """One system call where there is one; else two renames, the previous folder whole under its aside
    name in between (a system without renameat2 / renamex_np is simulated)."""
    from AttnSegLib import swap
    if not atomic:
        monkeypatch.setattr(swap, "exchange", lambda first, second: False)
    new, target = tmp_path / ".staged", tmp_path / "results"
    for folder, run in ((new, "new"), (target, "previous")):
        (folder / "maps").mkdir(parents=True)
        (folder / "report.json").write_text(run)
        (folder / "maps" / "m.nii.gz").write_text(run)
    swap.replace_folder(new, target)
    assert (target / "report.json").read_text() == (target / "maps" / "m.nii.gz").read_text() == "new"
    assert (new / "report.json").read_text() == (new / "maps" / "m.nii.gz").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".staged", "results"]


def test_overwrite_of_the_working_folder_leaves_the_shell_in_it(package, hippocampus_case, tmp_path, capsys,
                                                                monkeypatch):
    """`attnseg segment -o . --overwrite` inside a results folder: swapping the folder whole would leave
    the user's shell in the deleted previous one; the results move in one by one instead."""
    out = tmp_path / "out"
    base = ("segment", "-i", str(hippocampus_case[0]), "--model", str(package))
    assert run_main(capsys, *base, "-o", str(out), "--preview")[0] == 0
    inode = os.stat(out).st_ino
    monkeypatch.chdir(out)
    assert run_main(capsys, *base, "-o", ".", "--overwrite")[0] == 0
    assert os.stat(".").st_ino == os.stat(out).st_ino == inode
    assert sorted(os.listdir(".")) == ["labels.nii.gz", "maps", "probabilities.nii.gz", "report.json"]


def _text_or_empty(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _fingerprint(out: Path) -> tuple:
    """What identifies a result set: every name under ``out`` (hidden ones too), the input its report
    names, and its labels."""
    report = json.loads((out / "report.json").read_text())
    return tuple(tree(out)), tuple(report["inputs"]), read_image(out / "labels.nii.gz").array.tobytes()


def _staged(tmp_path: Path, name: str) -> bool:
    """``name`` is in a staging folder (beside the output folder, or inside it as before)."""
    return any(tmp_path.glob(f".attnseg-*/{name}")) or any(tmp_path.glob(f"out/.attnseg-*/{name}"))


def test_overwrite_killed_at_any_moment_leaves_one_whole_result_set(package, hippocampus_dir, tmp_path):
    """A real `attnseg segment --overwrite` killed with SIGKILL while it starts, once its staging folder
    exists, once the labels are staged, once everything is staged (the swap imminent) and just after the
    swap: the folder holds the previous run's results or the new run's, each whole (per-file moves left
    a mix, and their staging folder, behind). The moment everything is staged lasts microseconds: up
    to three tries each to kill the run alive there; a run that ended first must have left the new set."""
    first, second = sorted((hippocampus_dir / "imagesTr").glob("hippocampus_0*.nii.gz"))[:2]
    previous, new = tmp_path / "previous", tmp_path / "new"
    assert attnseg("segment", "-i", first, "-o", previous, "--model", package, "--preview").returncode == 0
    assert attnseg("segment", "-i", second, "-o", new, "--model", package).returncode == 0
    expected = {_fingerprint(previous): "previous", _fingerprint(new): "new"}
    reached = {"starting": lambda: time.monotonic() - started > 0.5, "staging": lambda: _staged(tmp_path, ""),
               "labels staged": lambda: _staged(tmp_path, "labels.nii.gz"),
               "all staged": lambda: _staged(tmp_path, "report.json"),
               "swapped": lambda: str(second) in _text_or_empty(tmp_path / "out" / "report.json")}
    outcomes, killed = {}, {}
    for moment, condition in reached.items():
        for _ in range(3):
            out = tmp_path / "out"
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(previous, out, symlinks=True)
            process = subprocess.Popen([str(ATTNSEG), "segment", "-i", str(second), "-o", str(out), "--model",
                                        str(package), "--overwrite"], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
            started = time.monotonic()
            while process.poll() is None and not condition():
                time.sleep(0.0002)
            killed[moment] = process.poll() is None
            process.kill()
            process.wait()
            outcomes[moment] = expected.get(_fingerprint(out), f"a mix: {tree(out)}")
            for leftover in tmp_path.glob(".attnseg-*"):  # the previous set, whole, when killed after the swap
                shutil.rmtree(leftover)
            if killed[moment]:
                break
    # Between "all staged" and the swap lie microseconds: the kill can land on either side, and either way
    # the folder must hold one whole set (a mix would match neither fingerprint).
    at_all_staged = outcomes.pop("all staged")
    assert at_all_staged in ({"previous", "new"} if killed["all staged"] else {"new"}), at_all_staged
    assert outcomes == {"starting": "previous", "staging": "previous", "labels staged": "previous",
                        "swapped": "new"}, outcomes
    assert all(alive for moment, alive in killed.items() if moment != "all staged"), killed


def test_a_closed_stdout_pipe_ends_quietly():
    """`attnseg info --json | head` where the reader has gone: no "Broken pipe; check the path" error."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write now fails with EPIPE
    try:
        result = subprocess.run([str(ATTNSEG), "info", "--json"], stdout=write_end, stderr=subprocess.PIPE,
                                timeout=240)
    finally:
        os.close(write_end)
    assert result.stderr.decode() == "" and result.returncode == 141

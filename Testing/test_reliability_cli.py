"""Every kind of bad input where a user gives it to AttnSeg: the ``attnseg segment`` command.

Each bad input gets one line on stderr that names the problem and what to do (``attnseg: error: ...``
with a non-zero exit, or ``attnseg: notice: ...`` when AttnSeg can go on), never a traceback, and
never a half-written or overwritten result. The full catalogue runs in-process through
``cli.main`` (the function the ``attnseg`` entry point calls, with the same handlers); a representative
set runs the installed ``attnseg`` executable in subprocesses, and one batch run over a folder of bad
files checks that each bad case gets its own line while the good case is still segmented. The same
bad files are then given to the training data loader.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from AttnSegLib import models
from AttnSegLib.cli import main
from AttnSegLib.image import Geometry, Image, ImageError, read_image, write_image
from AttnSegLib.package import save_package

ATTNSEG = Path(sys.executable).with_name("attnseg")
CLASSES = [{"value": 0, "name": "background"}, {"value": 1, "name": "Anterior"},
           {"value": 2, "name": "Posterior"}]


def tiny_card(modalities: list[str]) -> dict:
    return {"name": f"tiny_{len(modalities)}", "architecture": {"name": "unet", "kwargs": {"features": [4, 8]}},
            "modalities": [{"name": n, "normalization": "zscore"} for n in modalities], "classes": CLASSES,
            "patch_size_dhw": [16, 32, 16], "spacing_xyz_mm": [1.0, 1.0, 1.0], "orientation": "RAS",
            "inference": {"overlap": 0.25, "batch_size": 2}}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> dict[str, Path]:
    """Small untrained packages (one and two modalities): these tests are about what the user sees,
    not about accuracy (test_reliability_geometry uses the shipped trained package)."""
    root = tmp_path_factory.mktemp("packages")
    out = {}
    for names in (["T1"], ["T1", "T2"]):
        torch.manual_seed(0)
        net = models.build("unet", len(names), 3, features=[4, 8])
        out[str(len(names))] = save_package(root / f"tiny{len(names)}", tiny_card(names), net.state_dict()).path
    return out


def write_dicom_series(image: Image, folder: Path, series_uid: str, slices: int | None = None) -> None:
    """``image`` as a DICOM series (one file per k slice) with its geometry in the position tags."""
    folder.mkdir(parents=True, exist_ok=True)
    volume = sitk.Cast(image.to_sitk(), sitk.sitkInt16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = image.geometry.direction
    cosines = "\\".join(map(str, (d[0], d[3], d[6], d[1], d[4], d[7])))
    for k in range(slices or volume.GetDepth()):
        plane = volume[:, :, k]
        plane.SetMetaData("0020|0032", "\\".join(map(str, volume.TransformIndexToPhysicalPoint((0, 0, k)))))
        plane.SetMetaData("0020|0037", cosines)
        plane.SetMetaData("0020|0013", str(k))
        plane.SetMetaData("0020|000e", series_uid)
        plane.SetMetaData("0008|0060", "MR")
        writer.SetFileName(str(folder / f"{series_uid[-4:]}_{k:03d}.dcm"))
        writer.Execute(plane)


def _replace_header_line(source: Path, target: Path, key: bytes, line: bytes) -> None:
    data = source.read_bytes()
    start = data.index(key)
    target.write_bytes(data[:start] + line + data[data.index(b"\n", start):])


@pytest.fixture(scope="module")
def bad(tmp_path_factory, hippocampus_case) -> dict[str, Path]:
    """Every kind of file a user may hand over by mistake, made from a real case."""
    root = tmp_path_factory.mktemp("bad_inputs")
    image = read_image(hippocampus_case[0])
    plain = root / "plain.nrrd"
    sitk.WriteImage(image.to_sitk(), str(plain), False)
    files = {"missing": root / "missing.nii.gz", "good": Path(hippocampus_case[0])}

    files["text"] = root / "text.nii.gz"
    files["text"].write_text("patient notes, not an image")
    files["empty_file"] = root / "empty_file.nii.gz"
    files["empty_file"].write_bytes(b"")
    original = Path(hippocampus_case[0]).read_bytes()
    files["truncated_gz"] = root / "truncated_gz.nii.gz"
    files["truncated_gz"].write_bytes(original[: len(original) // 2])
    files["truncated_nii"] = root / "truncated_nii.nii"
    write_image(image, files["truncated_nii"])
    files["truncated_nii"].write_bytes(files["truncated_nii"].read_bytes()[:40000])
    files["truncated_nrrd"] = root / "truncated_nrrd.nrrd"
    files["truncated_nrrd"].write_bytes(plain.read_bytes()[:40000])
    files["slice_2d"] = root / "slice_2d.nii.gz"
    sitk.WriteImage(image.to_sitk()[:, :, 17], str(files["slice_2d"]))
    files["png"] = root / "png.png"
    sitk.WriteImage(sitk.Cast(image.to_sitk()[:, :, 17], sitk.sitkUInt8), str(files["png"]))
    files["one_slice"] = root / "one_slice.nii.gz"
    write_image(Image(image.array[17:18].copy(), Geometry((35, 51, 1), (1.0,) * 3, (0.0,) * 3, (1, 0, 0, 0, 1, 0, 0, 0, 1))),
                files["one_slice"])
    files["series_4d"] = root / "series_4d.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([image.to_sitk()] * 3), str(files["series_4d"]))
    files["rgb"] = root / "rgb.nrrd"
    sitk.WriteImage(sitk.Compose([sitk.Cast(image.to_sitk(), sitk.sitkUInt8)] * 3), str(files["rgb"]))
    files["complex"] = root / "complex.nrrd"
    real = sitk.Cast(image.to_sitk(), sitk.sitkFloat32)
    sitk.WriteImage(sitk.RealAndImaginaryToComplex(real, real), str(files["complex"]))
    files["zero_spacing"] = root / "zero_spacing.nrrd"
    _replace_header_line(plain, files["zero_spacing"], b"space directions:",
                         b"space directions: (-1,0,0) (0,-1,0) (0,0,0)")
    files["degenerate_direction"] = root / "degenerate_direction.nrrd"
    _replace_header_line(plain, files["degenerate_direction"], b"space directions:",
                         b"space directions: (1,0,0) (0,1,0) (1,0,0)")
    files["huge_header"] = root / "huge_header.nrrd"
    _replace_header_line(plain, files["huge_header"], b"sizes:", b"sizes: 40000 40000 40000")
    files["bad_ndims"] = root / "bad_ndims.mha"
    sitk.WriteImage(image.to_sitk(), str(root / "plain.mha"), False)
    _replace_header_line(root / "plain.mha", files["bad_ndims"], b"NDims", b"NDims = -1")
    with_nan = image.array.astype(np.float32)
    with_nan[10:12] = np.nan
    with_nan[0, 0, 0] = np.inf
    files["nan"] = root / "nan.nrrd"  # NRRD keeps NaN; ITK's NIfTI reader turns NaN into 0 itself
    write_image(image.with_array(with_nan), files["nan"])
    files["all_nan"] = root / "all_nan.nrrd"
    write_image(image.with_array(np.full_like(with_nan, np.nan)), files["all_nan"])
    files["constant"] = root / "constant.nii.gz"
    write_image(image.with_array(np.full(image.array.shape, 120, np.int16)), files["constant"])
    files["tiny"] = root / "tiny.nii.gz"  # 4 x 6 x 5 voxels: smaller than one 16 x 32 x 16 window
    write_image(Image(image.array[15:20, 20:26, 15:19].copy(), Geometry((4, 6, 5), (1.0,) * 3, (0.0,) * 3, image.geometry.direction)),
                files["tiny"])
    files["anisotropic"] = root / "anisotropic.nii.gz"
    write_image(Image(image.array[::3].copy(), Geometry((35, 51, 12), (1.0, 1.0, 3.0), image.geometry.origin,
                                                        image.geometry.direction)), files["anisotropic"])
    files["shifted"] = root / "shifted.nii.gz"  # same anatomy, another grid
    write_image(Image.from_sitk(sitk.Resample(image.to_sitk(), [30, 40, 30], sitk.Transform(), sitk.sitkLinear,
                                              (-2.0, -2.0, 3.0), (1.2, 1.2, 1.2), image.geometry.direction)),
                files["shifted"])
    files["far"] = root / "far.nii.gz"  # same size, 500 mm away: another patient or no registration
    write_image(Image(image.array, Geometry(image.geometry.size, image.geometry.spacing, (500.0, 500.0, 500.0),
                                            image.geometry.direction)), files["far"])
    files["empty_folder"] = root / "empty_folder"
    files["empty_folder"].mkdir()
    files["folder_without_images"] = root / "folder_without_images"
    files["folder_without_images"].mkdir()
    (files["folder_without_images"] / "notes.txt").write_text("x")
    files["dicom"] = root / "dicom"
    write_dicom_series(image, files["dicom"], "1.2.826.0.1.3680043.2.1125.1001")
    files["two_series"] = root / "two_series"
    write_dicom_series(image, files["two_series"], "1.2.826.0.1.3680043.2.1125.2001", slices=4)
    write_dicom_series(image, files["two_series"], "1.2.826.0.1.3680043.2.1125.2002", slices=4)
    return files


def run_main(capsys, *args: str) -> tuple[int, str, list[str]]:
    """``attnseg`` in-process: (exit status, stdout, stderr lines)."""
    status = main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, [line for line in captured.err.splitlines() if line.strip()]


def attnseg(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """The installed ``attnseg`` executable in a subprocess."""
    return subprocess.run([str(ATTNSEG), *args], capture_output=True, encoding="utf-8", timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def assert_one_error(lines: list[str], phrase: str) -> str:
    """Exactly one stderr line, an ``attnseg: error:`` naming the problem."""
    text = "\n".join(lines)
    assert "Traceback" not in text, text
    assert len(lines) == 1 and lines[0].startswith("attnseg: error: "), text
    assert phrase in lines[0], f"{phrase!r} not in {lines[0]!r}"
    return lines[0]


def assert_no_results(folder: Path) -> None:
    """No result file and no staging leftover (hidden temporary names included)."""
    if folder.exists():
        assert sorted(p.name for p in folder.rglob("*")) == [], sorted(folder.rglob("*"))


# -- single inputs that must be refused -----------------------------------------------------------
REFUSED = {
    "missing": "no such file or folder",
    "text": "not a readable medical image (unknown or damaged file format)",
    "empty_file": "not a readable medical image (unknown or damaged file format)",
    "truncated_gz": "the file is truncated (the compressed data ends early)",
    "truncated_nii": "the file is truncated: it holds 40000 of the",
    "truncated_nrrd": "not a readable medical image (",
    "slice_2d": "2D image of size (35, 51); AttnSeg segments 3D volumes",
    "png": "2D image of size (35, 51)",
    "one_slice": "2D image of size (35, 51, 1)",
    "series_4d": "4D image (35, 51, 35, 3); AttnSeg needs one 3D volume per modality",
    "rgb": "3-component (colour/vector) image; give a scalar volume per modality",
    "complex": "complex-valued image; give the magnitude image",
    "zero_spacing": "invalid voxel spacing (1.0, 1.0, 0.0); fix the header",
    "degenerate_direction": "is degenerate; fix the header",
    "huge_header": "a 40000x40000x40000 volume needs at least 238418.6 GiB to process",
    "bad_ndims": "damaged MetaImage header (NDims '-1'",
    "all_nan": "T1 holds no finite voxel (all NaN/Inf)",
    "empty_folder": "no images (.nii.gz, .nii, .nrrd, .mha) and no DICOM series in this folder",
    "folder_without_images": "no images (.nii.gz, .nii, .nrrd, .mha) and no DICOM series in this folder",
    "two_series": "folder holds 2 DICOM series; AttnSeg reads one series per folder",
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_bad_input_is_refused_in_one_line(name, bad, packages, tmp_path, capsys):
    status, _, lines = run_main(capsys, "segment", "-i", str(bad[name]), "-o", str(tmp_path / "out"),
                                "--model", str(packages["1"]))
    assert status == 2
    assert_one_error(lines, REFUSED[name])
    assert_no_results(tmp_path / "out")


# -- inputs AttnSeg can use, with a notice ---------------------------------------------------------
NOTICED = {
    "nan": "T1: 3571 NaN/Inf voxels replaced by the image minimum",
    "constant": "T1 is constant (120.0); the prediction will be meaningless",
    "anisotropic": "resampled from (1.0, 1.0, 3.0) mm voxels to the model's (1.0, 1.0, 1.0) mm",
}


@pytest.mark.parametrize("name", sorted(NOTICED))
def test_usable_odd_input_is_segmented_with_a_notice(name, bad, packages, tmp_path, capsys):
    status, out, lines = run_main(capsys, "segment", "-i", str(bad[name]), "-o", str(tmp_path),
                                  "--model", str(packages["1"]))
    assert status == 0, lines
    assert lines and all(line.startswith("attnseg: notice: ") for line in lines), lines
    assert any(NOTICED[name] in line for line in lines), lines
    labels = read_image(tmp_path / "labels.nii.gz")
    assert labels.geometry.same_grid(read_image(bad[name]).geometry)
    report = json.loads((tmp_path / "report.json").read_text())
    assert any(NOTICED[name] in n for n in report["notices"])


def test_volume_smaller_than_one_window_is_segmented_silently(bad, packages, tmp_path, capsys):
    """4 x 6 x 5 voxels against 16 x 32 x 16 windows: padded for the network, labels on its own grid."""
    status, _, lines = run_main(capsys, "segment", "-i", str(bad["tiny"]), "-o", str(tmp_path),
                                "--model", str(packages["1"]))
    assert status == 0 and lines == []
    assert read_image(tmp_path / "labels.nii.gz").array.shape == (5, 6, 4)
    probabilities = sitk.ReadImage(str(tmp_path / "probabilities.nii.gz"))  # a 3-component image
    assert probabilities.GetSize() == (4, 6, 5) and probabilities.GetNumberOfComponentsPerPixel() == 3


def test_dicom_series_folder_is_segmented_on_its_own_grid(bad, packages, tmp_path, capsys):
    status, out, lines = run_main(capsys, "segment", "-i", str(bad["dicom"]), "-o", str(tmp_path),
                                  "--model", str(packages["1"]))
    assert status == 0 and lines == [], lines
    assert out.startswith("dicom: ")
    assert read_image(tmp_path / "labels.nii.gz").geometry.same_grid(read_image(bad["dicom"]).geometry, 1e-3)


# -- modalities ------------------------------------------------------------------------------------
def test_modality_count_and_geometry(bad, packages, tmp_path, capsys):
    one, two = str(packages["1"]), str(packages["2"])
    good = str(bad["good"])
    status, _, lines = run_main(capsys, "segment", "-i", good, "-i", good, "-o", str(tmp_path / "a"), "--model", one)
    assert status == 2
    assert_one_error(lines, "the model expects 1 modality (T1) but 2 image(s) were given; pass one --input per "
                            "modality in that order")
    status, _, lines = run_main(capsys, "segment", "-i", good, "-o", str(tmp_path / "b"), "--model", two)
    assert status == 2
    assert_one_error(lines, "the model expects 2 modalities (T1, T2) but 1 image(s) were given")
    status, _, lines = run_main(capsys, "segment", "-i", good, "-i", str(bad["far"]), "-o", str(tmp_path / "c"),
                                "--model", two)
    assert status == 2
    assert_one_error(lines, "T2 does not overlap T1 in physical space; the modalities must show the same anatomy")
    for folder in "abc":
        assert_no_results(tmp_path / folder)
    status, _, lines = run_main(capsys, "segment", "-i", good, "-i", str(bad["shifted"]), "-o", str(tmp_path / "d"),
                                "--model", two)
    assert status == 0
    assert lines == ["attnseg: notice: hippocampus_001: T2 had a different grid from T1 and was resampled onto it",
                     "attnseg: notice: hippocampus_001: T2 covers only 86% of T1's field of view; the model sees "
                     "zeros beyond it, so the segmentation there is unreliable — give images of the same region"]


# -- options ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("option, message", [
    (["--overlap", "1.5"], "window overlap must be at least 0 and below 1, got 1.5"),
    (["--batch-size", "0"], "the window batch size must be at least 1, got 0"),
    (["--batch-size", "-3"], "the window batch size must be at least 1, got -3"),
    (["--device", "tpu"], "unknown device 'tpu'; choose auto, cpu, cuda or mps"),
] + ([] if torch.cuda.is_available() else [
    (["--device", "cuda"], "device 'cuda' was asked for but no CUDA GPU is available; use --device cpu or auto")]))
def test_bad_options_are_refused_before_any_work(option, message, bad, packages, tmp_path, capsys):
    status, _, lines = run_main(capsys, "segment", "-i", str(bad["good"]), "-o", str(tmp_path / "out"),
                                "--model", str(packages["1"]), *option)
    assert status == 2
    assert_one_error(lines, message)
    assert_no_results(tmp_path / "out")


# -- model packages from strangers, as the CLI shows them ----------------------------------------
def _package_variant(source: Path, target: Path, kind: str) -> Path:
    """A copy of a good package, broken in one way."""
    shutil.copytree(source, target)
    card = json.loads((target / "model.json").read_text())
    if kind == "wrong_hash":
        card["weights_sha256"] = "0" * 64
    elif kind == "unknown_architecture":
        card["architecture"] = {"name": "vnet", "kwargs": {}}
    elif kind == "mismatched_tensors":
        card["architecture"]["kwargs"]["features"] = [4, 16]
    elif kind == "pickle":
        import hashlib

        torch.save(models.build("unet", 1, 3, features=[4, 8]).state_dict(), target / "weights.safetensors")
        card["weights_sha256"] = hashlib.sha256((target / "weights.safetensors").read_bytes()).hexdigest()
    elif kind == "not_json":
        (target / "model.json").write_text("{this is not json")
        return target
    (target / "model.json").write_text(json.dumps(card))
    if kind == "path_traversal":
        archive = target.with_suffix(".zip")
        with zipfile.ZipFile(archive, "w") as z:
            z.write(target / "model.json", "model.json")
            z.write(target / "weights.safetensors", "weights.safetensors")
            z.writestr("../../etc/cron.d/evil", "* * * * * root rm -rf /")
        return archive
    return target


PACKAGE_ERRORS = {
    "wrong_hash": "does not match the card's 000000000000...; the file was altered or damaged",
    "unknown_architecture": "unknown architecture 'vnet'; known architectures:",
    "mismatched_tensors": "the weights do not fit architecture 'unet'",
    "pickle": "weights.safetensors is not a valid safetensors file",
    "not_json": "model.json is not valid JSON",
    "path_traversal": "refused, entry '../../etc/cron.d/evil' points outside the package (path traversal)",
}


@pytest.mark.parametrize("kind", sorted(PACKAGE_ERRORS))
def test_bad_model_package_is_refused_in_one_line(kind, bad, packages, tmp_path, capsys):
    package = _package_variant(packages["1"], tmp_path / kind, kind)
    status, _, lines = run_main(capsys, "segment", "-i", str(bad["good"]), "-o", str(tmp_path / "out"),
                                "--model", str(package))
    assert status == 2
    assert_one_error(lines, PACKAGE_ERRORS[kind])
    assert not (tmp_path / "out").exists()
    assert not (tmp_path.parent.parent / "etc").exists()


def test_unknown_model_name_lists_what_is_installed(bad, tmp_path, capsys):
    status, _, lines = run_main(capsys, "segment", "-i", str(bad["good"]), "-o", str(tmp_path / "out"),
                                "--model", "no_such_model")
    assert status == 2
    assert_one_error(lines, "no model package 'no_such_model'; installed packages: ")


# -- the output folder: never overwritten (full and read-only disks: test_reliability_faults) ------
def test_existing_results_are_never_overwritten_without_overwrite(bad, packages, tmp_path, capsys):
    args = ("segment", "-i", str(bad["good"]), "-o", str(tmp_path), "--model", str(packages["1"]))
    assert run_main(capsys, *args)[0] == 0
    before = {name: (tmp_path / name).read_bytes() for name in ("labels.nii.gz", "report.json")}
    (tmp_path / "labels.nii.gz").write_bytes(b"the user's own edited labels")
    status, _, lines = run_main(capsys, *args)
    assert status == 2
    assert_one_error(lines, f"{tmp_path} already holds results (labels.nii.gz, probabilities.nii.gz, maps, "
                            "report.json); choose another --output or pass --overwrite")
    assert (tmp_path / "labels.nii.gz").read_bytes() == b"the user's own edited labels"
    assert (tmp_path / "report.json").read_bytes() == before["report.json"]
    assert run_main(capsys, *args, "--overwrite")[0] == 0
    assert (tmp_path / "labels.nii.gz").read_bytes() == before["labels.nii.gz"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_output_under_a_regular_file_is_refused(bad, packages, tmp_path, capsys):
    blocker = tmp_path / "report.pdf"
    blocker.write_text("not a folder")
    status, _, lines = run_main(capsys, "segment", "-i", str(bad["good"]), "-o", str(blocker / "out"),
                                "--model", str(packages["1"]))
    assert status == 2
    assert_one_error(lines, f"cannot write to {blocker / 'out'} (Not a directory); choose a writable --output")


# -- the real executable ---------------------------------------------------------------------------
def test_the_attnseg_executable_answers_bad_input_in_one_line(bad, packages, tmp_path):
    """The installed entry point, in subprocesses (two at a time): exit status, exactly one stderr
    line, no traceback, no output."""
    one, two = str(packages["1"]), str(packages["2"])
    wrong_hash = str(_package_variant(packages["1"], tmp_path / "wrong_hash", "wrong_hash"))
    traversal = str(_package_variant(packages["1"], tmp_path / "traversal", "path_traversal"))
    good = str(bad["good"])
    runs = {  # the rest of the catalogue above runs the same main(); the batch test below adds more files
        "text": (["-i", str(bad["text"]), "--model", one], REFUSED["text"]),
        "modalities": (["-i", good, "--model", two], "the model expects 2 modalities (T1, T2)"),
        "wrong_hash": (["-i", good, "--model", wrong_hash], PACKAGE_ERRORS["wrong_hash"]),
        "traversal": (["-i", good, "--model", traversal], PACKAGE_ERRORS["path_traversal"]),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = {name: pool.submit(attnseg, "segment", *args, "-o", str(tmp_path / "out" / name))
                for name, (args, _) in runs.items()}
    for name, (_, phrase) in runs.items():
        result = done[name].result()
        assert result.returncode == 2, (name, result.stderr)
        assert result.stdout == ""
        assert_one_error(result.stderr.splitlines(), phrase)
        assert_no_results(tmp_path / "out" / name)


def test_batch_folder_of_bad_files_reports_each_and_segments_the_good_one(bad, packages, tmp_path):
    """A folder of cases: every bad file gets its own error line naming it, the run goes on, the
    good case is segmented, and the exit status (1) says that some cases failed."""
    cases = tmp_path / "cases"
    cases.mkdir()
    names = ["text", "empty_file", "truncated_gz", "truncated_nii", "slice_2d", "series_4d", "rgb", "complex",
             "bad_ndims", "all_nan", "huge_header", "nan", "good"]
    for name in names:
        shutil.copy(bad[name], cases / (name + "".join(bad[name].suffixes)))
    result = attnseg("segment", "-i", str(cases), "-o", str(tmp_path / "out"), "--model", str(packages["1"]))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("attnseg: error: ")]
    failed = {line.split(": ")[2] for line in errors}
    assert failed == set(names) - {"nan", "good"}, lines
    assert len(errors) == len(failed)  # one line each
    for line in errors:
        assert REFUSED[line.split(": ")[2]] in line, line
    assert [line for line in lines if line not in errors] == [f"attnseg: notice: nan: {NOTICED['nan']}"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good", "nan"]  # failed cases leave nothing
    assert (tmp_path / "out" / "good" / "report.json").is_file()
    assert result.stdout.startswith("good: ") or "\ngood: " in result.stdout


# -- the same bad files where training reads them ---------------------------------------------------
def test_training_data_loader_refuses_bad_files_naming_them(bad, hippocampus_case):
    """``training/data.py`` reads cases with the same reader: a bad image or label stops the run
    with the file's name and the problem, not deep inside a training step."""
    data_module = pytest.importorskip("training.data")
    data = {"modalities": [{"name": "T1", "normalization": "zscore"}], "classes": CLASSES,
            "spacing_xyz_mm": [1.0, 1.0, 1.0], "orientation": "RAS"}
    label = Path(hippocampus_case[1])
    for name in ("truncated_gz", "slice_2d", "series_4d", "text", "all_nan"):
        with pytest.raises(ImageError) as caught:
            data_module.load_case(data_module.CaseFiles(name, (bad[name],), label), data)
        assert REFUSED[name] in str(caught.value)
    with pytest.raises(ImageError, match="truncated"):
        data_module.load_case(data_module.CaseFiles("case", (bad["good"],), bad["truncated_gz"]), data)
    case = data_module.load_case(data_module.CaseFiles("case", (bad["good"],), label), data)
    assert case.image.shape[1:] == case.label.shape and set(np.unique(case.label)) == {0, 1, 2}

"""Headers whose voxels live in another file (MetaImage ``ElementDataFile``, NRRD ``data file``,
Analyze/NIfTI ``.hdr``/``.img``): read only from the header's own folder, refused outright where
``allow_detached=False`` (uploads and the web app's ``--data`` folder).

Every hostile header here names a "secret" file outside its folder that holds exactly as many bytes
as the header's voxels, so without the check ITK would read it as the image: each refusal below is
an attack that works on an unprotected reader.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk

from AttnSegLib.cli import main as attnseg
from AttnSegLib.image import ImageError, check_data_file, read_image

SHAPE = (4, 5, 6)  # (k, j, i)
VOXELS = np.arange(np.prod(SHAPE), dtype=np.uint8).reshape(SHAPE)


@pytest.fixture
def folders(tmp_path):
    """(a folder of headers, a secret file outside it with as many bytes as the image has voxels)."""
    inside, outside = tmp_path / "case", tmp_path / "elsewhere"
    inside.mkdir()
    outside.mkdir()
    secret = outside / "secret.bin"
    secret.write_bytes(bytes((7 * i) % 256 for i in range(VOXELS.size)))
    return inside, secret


def _write_detached(folder, name: str):
    """Write VOXELS as ``name`` (.mhd, .nhdr or .hdr), which puts the voxels in a file beside it."""
    sitk.WriteImage(sitk.GetImageFromArray(VOXELS), str(folder / name))
    return folder / name


def _retarget(header, old: str, new: str):
    header.write_text(header.read_text().replace(old, new))
    return header


# -- what must still read --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["case.mhd", "case.nhdr", "case.hdr"])
def test_a_header_with_its_data_file_beside_it_reads(folders, name):
    inside, _ = folders
    header = _write_detached(inside, name)
    np.testing.assert_array_equal(read_image(header).array, VOXELS)


def test_a_data_file_named_through_its_own_folder_reads(folders):
    inside, _ = folders
    header = _retarget(_write_detached(inside, "case.nhdr"), "data file: case.raw", "data file: ../case/case.raw")
    np.testing.assert_array_equal(read_image(header).array, VOXELS)


# -- what must be refused ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name,field,data_name", [("case.mhd", "ElementDataFile", "case.raw"),
                                                  ("case.mha", "ElementDataFile", "case.raw"),
                                                  ("case.nhdr", "data file", "case.raw"),
                                                  ("case.nrrd", "data file", "case.raw")])
@pytest.mark.parametrize("where", ["absolute", "parent", "symlink"])
def test_a_data_file_outside_the_headers_folder_is_refused(folders, name, field, data_name, where):
    inside, secret = folders
    writer = "case.mhd" if name.startswith("case.m") else "case.nhdr"
    header = _write_detached(inside, writer)
    if name != writer:
        header = header.rename(inside / name)
    (inside / data_name).unlink()
    target = {"absolute": str(secret), "parent": f"../{secret.parent.name}/{secret.name}", "symlink": "link.raw"}[where]
    if where == "symlink":
        os.symlink(secret, inside / "link.raw")
    _retarget(header, data_name, target)
    with pytest.raises(ImageError, match=f"{field} = .*points outside the header's folder") as refused:
        read_image(header)
    assert "\n" not in str(refused.value)


def test_the_other_half_of_an_analyze_pair_may_not_lead_out(folders):
    inside, secret = folders
    header = _write_detached(inside, "case.hdr")
    (inside / "case.img").unlink()
    os.symlink(secret, inside / "case.img")
    with pytest.raises(ImageError, match="Analyze/NIfTI pair file = case.img points outside"):
        read_image(header)
    # Read through its .img, the pair's header is the half that must not lead out.
    (inside / "case.img").unlink()
    (inside / "case.img").write_bytes(VOXELS.tobytes())
    header.rename(secret.parent / "case.hdr")
    os.symlink(secret.parent / "case.hdr", header)
    with pytest.raises(ImageError, match="Analyze/NIfTI pair file = case.hdr points outside"):
        read_image(inside / "case.img")


@pytest.mark.parametrize("writer,field,data_name,value", [
    ("case.mhd", "ElementDataFile", "case.raw", "LIST"),
    ("case.mhd", "ElementDataFile", "case.raw", "slice%03d.raw 1 4 1"),
    ("case.nhdr", "data file", "case.raw", "LIST"),
    ("case.nhdr", "data file", "case.raw", "slice%03d.raw 1 4 1"),
    ("case.nhdr", "data file", "case.raw", "slice.raw 1 4 1 2"),
])
def test_lists_and_patterns_of_data_files_are_refused(folders, writer, field, data_name, value):
    inside, _ = folders
    header = _retarget(_write_detached(inside, writer), data_name, value)
    with pytest.raises(ImageError, match=f"{field} = .*list or numbered pattern"):
        read_image(header)


def test_a_data_file_field_cannot_hide_behind_a_long_header(folders):
    inside, secret = folders
    header = _write_detached(inside, "case.nhdr")
    text = header.read_text().replace("data file: case.raw", "# padding\n" * 120_000 + f"data file: {secret}")
    header.write_text(text)
    with pytest.raises(ImageError, match="NRRD header does not end within 1 MiB"):
        read_image(header)
    meta = _write_detached(inside, "case.mhd")
    meta.write_text(meta.read_text().replace("ElementDataFile", "Comment = x\n" * 8000 + "ElementDataFile")
                    .replace("case.raw", str(secret)))
    with pytest.raises(ImageError, match="no ElementDataFile in the first 64 KiB"):
        read_image(meta)


@pytest.mark.parametrize("writer,old,new", [
    ("case.nhdr", "data file: case.raw", "DataFile: {secret}"),  # teem: any case, with or without the space
    ("case.nhdr", "data file: case.raw", "DATA FILE:   {secret}"),
    ("case.mhd", "ElementDataFile = case.raw", "ElementDataFile: {secret}\nElementDataFile = case.raw"),  # MetaIO: ':' too
])
def test_fields_are_read_as_the_formats_own_readers_read_them(folders, writer, old, new):
    inside, secret = folders
    header = _retarget(_write_detached(inside, writer), old, new.format(secret=secret))
    with pytest.raises(ImageError, match="points outside"):
        read_image(header)


# -- where only single files are taken ---------------------------------------------------------------------
@pytest.mark.parametrize("name,field", [("case.mhd", "ElementDataFile"), ("case.nhdr", "data file"),
                                        ("case.hdr", "Analyze/NIfTI pair file")])
def test_single_file_places_refuse_any_detached_header(folders, name, field):
    inside, _ = folders
    header = _write_detached(inside, name)
    with pytest.raises(ImageError, match=f"keeps its voxels in another file \\({field} = .*single-file volumes"):
        check_data_file(header, allow_detached=False)


@pytest.mark.parametrize("name", ["case.mha", "case.nrrd", "case.nii.gz", "case.nii"])
def test_single_file_volumes_pass_everywhere(folders, name):
    inside, _ = folders
    path = inside / name
    sitk.WriteImage(sitk.GetImageFromArray(VOXELS), str(path))
    check_data_file(path, allow_detached=False)
    np.testing.assert_array_equal(read_image(path).array, VOXELS)


def test_the_command_line_refuses_with_one_line_and_exit_2(folders, capsys):
    inside, secret = folders
    header = _retarget(_write_detached(inside, "case.mhd"), "case.raw", str(secret))
    good = inside / "good.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(VOXELS), str(good))
    assert attnseg(["evaluate", "-p", str(header), "-r", str(good)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("attnseg: error:") and "ElementDataFile" in error and "\n" not in error

"""DICOM in the web app: a zipped DICOM series as an upload (unpacked under server-made names,
bounded, kept as NRRD) and DICOM series folders offered from ``--data``."""
from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from AttnSegLib.image import ImageError, check_data_file, read_image
from AttnSegLib.mrml import loadVolume, newScene
from AttnSegLib.web.data_folder import offered_volumes, volume_title
from AttnSegLib.web.uploads import UploadError, check_upload, save_upload
from AttnSegLib.web.webapp import label_map_note

from test_reliability_cli import write_dicom_series

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "Resources" / "SampleData" / "hippocampus_001_image.nii.gz"
LIMIT = 8 * 2**20


def _zip(folders: list[Path], prefix: str = "") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for folder in folders:
            for file in sorted(folder.iterdir()):
                archive.write(file, prefix + f"{folder.name}/{file.name}")
    return buffer.getvalue()


def _one_member_zip() -> bytearray:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("slice.dcm", b"A" * 100_000)
    return bytearray(buffer.getvalue())


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dicom") / "case_dicom"
    write_dicom_series(read_image(SAMPLE), folder, "1.2.826.0.1.3680043.8.498.1")
    return folder


def test_a_zipped_dicom_series_is_uploaded_as_one_volume_and_no_member_path_is_used(series, tmp_path):
    check_upload("case.zip", 1000, LIMIT)
    uploads = tmp_path / "session" / "uploads"
    saved = save_upload("case.zip", _zip([series], prefix="../../"), uploads, LIMIT)
    assert saved == uploads / "case.nrrd" and [p.name for p in uploads.iterdir()] == ["case.nrrd"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["session"]  # nothing landed beside the session
    sample, uploaded = read_image(SAMPLE), read_image(saved)
    np.testing.assert_array_equal(uploaded.array, sample.array.astype(np.int16))
    np.testing.assert_allclose(uploaded.geometry.ijk_to_lps(), sample.geometry.ijk_to_lps(), atol=1e-3)


def test_a_dicom_series_is_measured_before_it_is_read(series):
    """Its first file's slice times its number of files, against the bound (compressed DICOM could
    unpack to more than the zip held)."""
    size = read_image(SAMPLE).geometry.size
    stored = size[0] * size[1] * size[2] * 2  # int16
    assert read_image(series, max_voxel_bytes=stored).array.shape == tuple(reversed(size))
    with pytest.raises(ImageError, match=f"{'x'.join(map(str, size))} voxels take .* MiB unpacked"):
        read_image(series, max_voxel_bytes=stored - 1)


def test_bad_zips_are_refused_in_one_line(series, tmp_path):
    other = tmp_path / "other_series"
    write_dicom_series(read_image(SAMPLE), other, "1.2.826.0.1.3680043.8.498.2", slices=4)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("hello")
    bad = {
        "two.zip": (_zip([series, other]), "the zip holds 2 DICOM series"),
        "notes.zip": (_zip([notes]), "holds no DICOM series"),
        "broken.zip": (b"PK\x03\x04 not really a zip", "not a readable zip"),
    }
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("slice.dcm", b"\0" * (LIMIT + 1))  # a few KiB zipped, over the limit unpacked
    bad["bomb.zip"] = (bomb.getvalue(), "unpacks to more than this server's upload limit")
    # Damaged archives escaped as other errors (zlib.error, ValueError): the page showed nothing.
    stream = _one_member_zip()
    start = 30 + len("slice.dcm")  # the member's deflate stream follows its local header
    stream[start + 10:start + 60] = bytes(b ^ 0x55 for b in stream[start + 10:start + 60])
    bad["stream.zip"] = (bytes(stream), r"not a readable zip \(Error -3 while decompressing")
    offset = _one_member_zip()
    end = offset.rfind(b"PK\x05\x06")
    offset[end + 16:end + 20] = struct.pack("<I", 0xFFFFFF00)  # the central directory's offset, past the file
    bad["offset.zip"] = (bytes(offset), "not a readable zip")
    for name, (content, message) in bad.items():
        with pytest.raises(UploadError, match=message) as refused:
            save_upload(name, content, tmp_path / "uploads", LIMIT)
        assert "\n" not in str(refused.value) and str(tmp_path) not in str(refused.value)
        assert not list((tmp_path / "uploads").iterdir())  # nothing kept, not even the unpacked files


def test_dicom_series_folders_in_the_data_folder_are_offered_and_open(series, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "sample.nii.gz").write_bytes(SAMPLE.read_bytes())
    write_dicom_series(read_image(SAMPLE), data / "series_a", "1.2.826.0.1.3680043.8.498.3")
    (data / "empty").mkdir()
    (data / "notes").mkdir()
    (data / "notes" / "readme.txt").write_text("no images here")
    offered = offered_volumes(data)
    assert [p.name for p in offered] == ["sample.nii.gz", "series_a"]
    assert [volume_title(p) for p in offered] == ["sample.nii.gz", "series_a/ (DICOM series)"]
    # The web app's checks before opening, then the logic's reader.
    check_data_file(data / "series_a", allow_detached=False)
    assert label_map_note(data / "series_a") == ""
    node = loadVolume(data / "series_a", newScene())
    assert node.GetName() == "series_a" and node.GetImageData().GetDimensions() == (35, 51, 35)

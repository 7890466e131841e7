"""Volumes uploaded from the browser: limited in size, named safely, and read once before use.

An upload reaches the scene only after :func:`save_upload` has written it under the session's own
folder and the engine's reader has opened it as a 3D scalar volume; anything else is refused with an
:class:`UploadError` whose message the page shows as it is.

A ``.zip`` holds one DICOM series: its files are unpacked under names the server makes (the paths
inside the archive are never used, so nothing lands outside the session folder), at most
``MAX_ZIP_FILES`` of them and no more bytes unpacked than the upload limit (a zip bomb stops there),
read as one series and kept as an NRRD volume. A volume file's voxels, unpacked, may not exceed the
upload limit either (read from its header before any voxel is: a gzip bomb stops there too).
"""
from __future__ import annotations

import io
import re
import shutil
import zipfile
import zlib
from pathlib import Path

from ..errors import AttnSegError
from ..image import ImageError, check_data_file, read_image, write_image

# Single-file formats only: a browser upload cannot keep a header and its detached data file together,
# and a header naming a data file would read it from the server (refused by check_data_file); and a
# zipped DICOM series.
UPLOAD_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".zip")
MAX_ZIP_FILES = 4096
# A client names its file as it likes; the name kept is at most this long, which leaves room within a
# file system's 255 bytes for the names the server makes from it (``<name>.dicom-unpacked``, and
# ``<case>_<time>_<hex>`` folders of corrected cases holding ``<case>_0000.nii.gz``).
MAX_NAME_CHARS = 100
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class UploadError(AttnSegError, ValueError):
    """An uploaded file cannot be used; the message says why and what to do instead."""


def upload_suffix(name: str) -> str | None:
    lower = name.lower()
    return next((s for s in UPLOAD_SUFFIXES if lower.endswith(s)), None)


def safe_upload_name(name: str) -> str:
    """The file's base name with anything but letters, digits, ``._-`` replaced by ``_``, cut to
    ``MAX_NAME_CHARS`` (its volume suffix kept).

    Drops any folder part a client sends (``../../etc/passwd`` -> ``passwd``), so writes stay inside
    the session folder.
    """
    base = _UNSAFE.sub("_", Path(str(name).replace("\\", "/")).name).lstrip(".")
    if not base:
        raise UploadError("the uploaded file has no name; rename it, e.g. case.nii.gz")
    if len(base) > MAX_NAME_CHARS:
        suffix = upload_suffix(base) or ""
        base = base[: MAX_NAME_CHARS - len(suffix)] + suffix
    return base


def check_upload(name: str, size: int, limit_bytes: int) -> None:
    """Refuse a file by name and declared size before its content is looked at."""
    if upload_suffix(name) is None:
        raise UploadError(f"{name}: not a volume file; upload one of {', '.join(UPLOAD_SUFFIXES[:-1])}, or a "
                          ".zip of one DICOM series folder")
    if size > limit_bytes:
        raise UploadError(f"{name}: {size / 2**20:.1f} MiB is over this server's upload limit of "
                          f"{limit_bytes / 2**20:.0f} MiB; put the file in the server's --data folder instead")
    if size == 0:
        raise UploadError(f"{name}: the file is empty")


def save_upload(name: str, content: bytes, folder: Path, limit_bytes: int) -> Path:
    """Write an uploaded volume into ``folder`` and check it is a readable 3D scalar image whose
    voxels are in the file itself.

    Returns the written path. A file that fails the check is deleted and :class:`UploadError` says why.
    """
    check_upload(name, len(content), limit_bytes)
    folder.mkdir(parents=True, exist_ok=True)
    if upload_suffix(name) == ".zip":
        return _save_dicom_zip(name, content, folder, limit_bytes)
    path = folder / safe_upload_name(name)
    path.write_bytes(content)
    try:
        check_data_file(path, allow_detached=False)
        read_image(path, max_voxel_bytes=limit_bytes)
    except ImageError as err:
        path.unlink(missing_ok=True)
        raise UploadError(str(err).replace(str(path), name)) from None
    return path


def _save_dicom_zip(name: str, content: bytes, folder: Path, limit_bytes: int) -> Path:
    """The one DICOM series in the zip ``content``, read and written as ``<name>.nrrd`` in ``folder``."""
    stem = safe_upload_name(name)[: -len(".zip")] or "dicom"
    unpacked = folder / f"{stem}.dicom-unpacked"
    shutil.rmtree(unpacked, ignore_errors=True)
    unpacked.mkdir()
    try:
        try:
            archive = zipfile.ZipFile(io.BytesIO(content))
            members = [m for m in archive.infolist() if not m.is_dir()]
            if len(members) > MAX_ZIP_FILES:
                raise UploadError(f"{name}: {len(members)} files in the zip, more than the {MAX_ZIP_FILES} "
                                  "this server unpacks; zip one DICOM series")
            budget = limit_bytes
            for number, member in enumerate(members):
                with archive.open(member) as source:
                    data = source.read(budget + 1)
                budget -= len(data)
                if budget < 0:
                    raise UploadError(f"{name}: unpacks to more than this server's upload limit of "
                                      f"{limit_bytes / 2**20:.0f} MiB; put the series in the server's --data folder")
                (unpacked / f"{number:05d}.dcm").write_bytes(data)
        except UploadError:
            raise
        # a damaged archive: bad offsets (ValueError), member names that are not UTF-8 (UnicodeDecodeError, a
        # ValueError), a broken deflate stream (zlib.error)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError, ValueError,
                zlib.error) as err:
            raise UploadError(f"{name}: not a readable zip ({err}); zip the DICOM series folder again") from None
        try:
            image = read_image(unpacked, max_voxel_bytes=limit_bytes)
        except ImageError as err:
            message = str(err).replace(str(unpacked), name)
            raise UploadError(message.replace("folder holds", "the zip holds")) from None
        return write_image(image, folder / f"{stem}.nrrd")
    finally:
        shutil.rmtree(unpacked, ignore_errors=True)

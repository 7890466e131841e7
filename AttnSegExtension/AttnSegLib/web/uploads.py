"""Volumes uploaded from the browser: limited in size, named safely, and read once before use.

An upload reaches the scene only after :func:`save_upload` has written it under the session's own
folder and the engine's reader has opened it as a 3D scalar volume; anything else is refused with an
:class:`UploadError` whose message the page shows as it is.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import AttnSegError
from ..image import ImageError, check_data_file, read_image

# Single-file formats only: a browser upload cannot keep a header and its detached data file together,
# and a header naming a data file would read it from the server (refused by check_data_file).
UPLOAD_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class UploadError(AttnSegError, ValueError):
    """An uploaded file cannot be used; the message says why and what to do instead."""


def upload_suffix(name: str) -> str | None:
    lower = name.lower()
    return next((s for s in UPLOAD_SUFFIXES if lower.endswith(s)), None)


def safe_upload_name(name: str) -> str:
    """The file's base name with anything but letters, digits, ``._-`` replaced by ``_``.

    Drops any folder part a client sends (``../../etc/passwd`` -> ``passwd``), so writes stay inside
    the session folder.
    """
    base = _UNSAFE.sub("_", Path(str(name).replace("\\", "/")).name).lstrip(".")
    if not base:
        raise UploadError("the uploaded file has no name; rename it, e.g. case.nii.gz")
    return base


def check_upload(name: str, size: int, limit_bytes: int) -> None:
    """Refuse a file by name and declared size before its content is looked at."""
    if upload_suffix(name) is None:
        raise UploadError(f"{name}: not a volume file; upload one of {', '.join(UPLOAD_SUFFIXES)} "
                          "(convert DICOM series to NIfTI or NRRD first, or serve them with --data)")
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
    path = folder / safe_upload_name(name)
    path.write_bytes(content)
    try:
        check_data_file(path, allow_detached=False)
        read_image(path)
    except ImageError as err:
        path.unlink(missing_ok=True)
        raise UploadError(str(err).replace(str(path), name)) from None
    return path

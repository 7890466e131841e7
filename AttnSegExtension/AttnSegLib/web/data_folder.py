"""What the ``--data`` folder offers a session: its single-file volumes and, as the README promises,
its DICOM series folders (a subfolder holding exactly one series), at most ``MAX_FOLDERS`` of them
looked at, so a huge folder does not stall a session's start."""
from __future__ import annotations

from pathlib import Path

from ..image import dicom_series, list_images, text_name

MAX_FOLDERS = 256
DICOM_TITLE = " (DICOM series)"


def offered_volumes(folder: Path) -> list[Path]:
    """Volume files directly in ``folder``, then its DICOM series subfolders, each sorted by name."""
    if not folder.is_dir():
        return []
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))[:MAX_FOLDERS]
    return list_images(folder) + [p for p in subfolders if len(dicom_series(p)) == 1]


def volume_title(path: Path) -> str:
    """How the list names a volume: the file's name, or the folder's with ``/ (DICOM series)``."""
    name = text_name(path.name)
    return f"{name}/{DICOM_TITLE}" if path.is_dir() else name

"""Replacing a folder by another in one step, so that a result set is never half old, half new.

:func:`replace_folder` swaps the two folders with one system call where the system offers one (Linux
``renameat2(RENAME_EXCHANGE)``, macOS ``renamex_np(RENAME_SWAP)``): a process killed at any moment
leaves the target holding either the whole previous folder or the whole new one. Elsewhere the target
is renamed aside and the new folder renamed in: killed between the two, the target is missing for a
moment but the previous folder is whole under its aside name, never mixed with the new one.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import sys
import tempfile
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # <linux/fs.h>
_RENAME_SWAP = 2  # <stdio.h> on macOS
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name, use_errno=True) if name else None
    except OSError:
        return None


_LIBC = _libc()


def exchange(first: str | os.PathLike, second: str | os.PathLike) -> bool:
    """Swap two existing paths on one file system atomically; False (nothing changed) where the system
    or the file system cannot, :class:`OSError` for any other failure."""
    a, b = os.fsencode(first), os.fsencode(second)
    if sys.platform.startswith("linux") and _LIBC is not None and hasattr(_LIBC, "renameat2"):
        status = _LIBC.renameat2(_AT_FDCWD, a, _AT_FDCWD, b, _RENAME_EXCHANGE)
    elif sys.platform == "darwin" and _LIBC is not None and hasattr(_LIBC, "renamex_np"):
        status = _LIBC.renamex_np(a, b, _RENAME_SWAP)
    else:
        return False
    if status == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), os.fsdecode(b))


def replace_folder(new: Path, target: Path) -> None:
    """Make folder ``new`` the folder ``target`` (a real folder, not a link; both in one parent folder's
    file system). Afterwards ``new`` names the previous ``target``, for the caller to delete."""
    if exchange(new, target):
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}-previous-", dir=target.parent))
    os.rmdir(aside)  # only its unique name is wanted
    os.rename(target, aside)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(aside, target)
        raise
    os.rename(aside, new)

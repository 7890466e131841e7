"""The errors a user can fix: every one derives from :class:`AttnSegError`.

Front ends (the ``attnseg`` command, the worker process, the web app, the Slicer panel) catch
:class:`AttnSegError` and show its message, one line naming the problem and the fix. Anything else that
escapes is a programming error and is shown as one (a traceback, an internal error), never as the user's
mistake. The specific errors keep their own modules and names (``PackageError`` in :mod:`.package`,
``ImageError`` in :mod:`.image`, ...); those that were ``ValueError``/``RuntimeError`` before still are,
so existing ``except ValueError`` callers keep working.
"""
from __future__ import annotations


class AttnSegError(Exception):
    """A problem with the user's input, settings, files or machine; the message says what and how to fix it."""


class InputError(AttnSegError, ValueError):
    """A value the user chose (a device, a window overlap, input volumes, an ROI) cannot be used."""


class OutOfMemory(AttnSegError, MemoryError):
    """The machine has not enough memory even after every fallback; the message says what to free."""

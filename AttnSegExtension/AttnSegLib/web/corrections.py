"""The server's corrections folder (``attnseg serve --corrections FOLDER``): where "Save as training
case" writes a corrected case, in the layout ``training/`` reads (``--layout corrected``), instead of
handing the user a zip to unzip.

The server names every case (the volume's case name, the time and a random suffix), never a path or
name a client sent, and never replaces one. Bounded: at most ``max_cases`` cases in the folder and
``max_saves`` saves per session; past either, a one-line error says what to do.
"""
from __future__ import annotations

import itertools
import secrets
import time
from pathlib import Path

from ..errors import AttnSegError

MAX_CASES = 10_000
MAX_SAVES_PER_SESSION = 200


class CorrectionsFull(AttnSegError, RuntimeError):
    """The folder, or this session, took as many cases as it may."""


class CorrectionsFolder:
    """Save corrected cases of one session into ``root`` (an existing folder the server may write)."""

    def __init__(self, root: Path, max_cases: int = MAX_CASES, max_saves: int = MAX_SAVES_PER_SESSION):
        self.root = Path(root)
        self.max_cases, self.max_saves = max_cases, max_saves
        self.saves = 0

    def new_case_name(self, base: str) -> str:
        """``<base>_<YYYYmmdd-HHMMSS>_<4 hex>``: a name no earlier save has."""
        return f"{base}_{time.strftime('%Y%m%d-%H%M%S')}_{secrets.token_hex(2)}"

    def save(self, logic, segmentationNode, base: str) -> str:
        """Write the corrected case of ``segmentationNode`` (``logic.exportCorrection``) under a new
        name; returns that name. Raises :class:`CorrectionsFull` past a bound."""
        if self.saves >= self.max_saves:
            raise CorrectionsFull(f"this session saved {self.saves} cases, the most one session may; "
                                  "open a new session to save more")
        held = sum(1 for _ in itertools.islice(self.root.iterdir(), self.max_cases))
        if held >= self.max_cases:
            raise CorrectionsFull(f"the server's corrections folder holds {held} cases, the most it takes; "
                                  "ask the server's operator to move them to training")
        folder = logic.exportCorrection(segmentationNode, self.root, caseName=self.new_case_name(base))
        self.saves += 1
        return folder.name

"""Shared pytest fixtures: where the real data lives, and small real cases from it.

The data is read from ``$ATTNSEG_DATA`` or ``../shared/data`` beside the repository; tests that need
it fail with a message naming what is missing rather than silently skipping.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Two cores on CI: one intra-op thread per test process keeps runs predictable.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module's tests (``pytestmark = pytest.mark.usefixtures(...)``): tiny
    networks on a busy two-core machine run many times faster than with two (the second spins waiting
    for a core), and with the same arithmetic as an ``attnseg`` subprocess under OMP_NUM_THREADS=1, so
    their outputs can be compared exactly; restored for other modules."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def data_root() -> Path:
    root = Path(os.environ.get("ATTNSEG_DATA", REPO.parent / "shared" / "data"))
    if not (root / "hippocampus").is_dir():
        raise FileNotFoundError(
            f"real test data not found at {root}: put the shared data folder beside the repository "
            "(../shared/data) or set ATTNSEG_DATA to it"
        )
    return root


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return data_root()


@pytest.fixture(scope="session")
def hippocampus_dir(data_dir) -> Path:
    return data_dir / "hippocampus"


@pytest.fixture(scope="session")
def hippocampus_case(hippocampus_dir) -> tuple[Path, Path]:
    """(image, label) of one real MSD hippocampus case (T1 crop ~35x51x35, 1 mm)."""
    name = "hippocampus_001.nii.gz"
    return hippocampus_dir / "imagesTr" / name, hippocampus_dir / "labelsTr" / name

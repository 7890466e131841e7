"""The 3D Slicer releases AttnSeg supports and the API each one has.

One JSON per release in ``Testing/slicer_api``, extracted by ``slicer_api/extract_slicer_api.py`` from the
release's git tag (``Libs``, ``Modules``, ``Base``), the CTK commit its ``SuperBuild/External_CTK.cmake``
pins and the PyTorch extension's ``PyTorchUtils``. The oldest supported release, one 5.8, the first with
Python 3.12 (5.10.0) and the newest are listed, so a call that a later release removed or renamed fails a
test as surely as one that only a later release added.
"""
from __future__ import annotations

import json

from conftest import REPO

RELEASES = ("5.6.2", "5.8.1", "5.10.0", "5.12.3")
OLDEST, NEWEST = RELEASES[0], RELEASES[-1]
# The CTK commit each release pins (SuperBuild/External_CTK.cmake at its tag) and its Python.
CTK_COMMITS = {"5.6.2": "f53820a4e6ebfc9649897577a6157d94833e9699",
               "5.8.1": "82cae5781621845486bad2697aed095f04cfbe76",
               "5.10.0": "dd4caeae7e979cf441e44ee85d3b0780120d113d",
               "5.12.3": "5056664a20a3d0a393bb6d91f040525581e0dcdf"}
PYTHON = {"5.6.2": "3.9", "5.8.1": "3.9", "5.10.0": "3.12", "5.12.3": "3.12"}


def load_api(release: str) -> dict:
    """The API list of ``release`` (see ``slicer_api/extract_slicer_api.py`` for what it holds)."""
    path = REPO / "Testing" / "slicer_api" / f"slicer-{release}.json"
    return json.loads(path.read_text(encoding="utf-8"))


APIS = {release: load_api(release) for release in RELEASES}

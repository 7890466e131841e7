"""Every MRML, VTK and Slicer call of the module and its logic exists in every Slicer release AttnSeg
supports (5.6.2, 5.8.1, 5.10.0, 5.12.3: ``slicer_releases.RELEASES``), and the code Slicer runs is
Python 3.9 (the Python of Slicer 5.6 and 5.8; 5.10 and 5.12 run 3.12).

Each release's API is a JSON in ``Testing/slicer_api``, extracted from its headers, the CTK commit it
pins, its ``Base/Python/slicer`` and SampleData module, and the PyTorch extension's PyTorchUtils, by
``Testing/slicer_api/extract_slicer_api.py``. VTK's own classes (``vtkObject``, ``vtkImageData``,
``vtkMatrix4x4``...) are checked against the VTK installed here: the methods used have not changed across
the VTK 9 releases Slicer 5.6 to 5.12 pin.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import slicer
import vtkmodules.all as vtk

from conftest import REPO
from slicer_releases import APIS, CTK_COMMITS, NEWEST, OLDEST, PYTHON as RELEASE_PYTHON, RELEASES

MODULE = REPO / "AttnSegExtension" / "AttnSeg.py"
LOGIC = REPO / "AttnSegExtension" / "AttnSegLib" / "slicer_logic.py"
MRML = REPO / "AttnSegExtension" / "AttnSegLib" / "mrml.py"
REFINE = REPO / "AttnSegExtension" / "AttnSegLib" / "slicer_refine.py"
# Provided by the running application rather than by a header or a Python module.
APPLICATION_ATTRIBUTES = {"app", "mrmlScene", "modules", "selfTests"}
SCRIPTED_MODULES = ("SampleData", "PyTorchUtils")
# Python modules of the engine and libraries whose attributes are not Slicer API.
NOT_SLICER = {"np", "numpy_support", "os", "json", "re", "shutil", "tempfile", "time", "threading", "logging",
              "pathlib", "qt", "contextlib", "unittest", "Path"}
# VTK classes the code uses directly or reaches through GetPointData()/GetScalars()/connections.
VTK_NAMES = set().union(*(set(dir(getattr(vtk, c))) for c in (
    "vtkObject", "vtkImageData", "vtkMatrix4x4", "vtkStringArray", "vtkPointData", "vtkDataArray",
    "vtkAlgorithmOutput", "vtkAlgorithm")))


class ReleaseApi:
    """One release's API list, as the checks read it."""

    def __init__(self, api: dict):
        self.api, self.version = api, api["slicer_version"]
        self.vtk_classes, self.python = api["vtk_classes"], api["python"]
        self.slicer_names = set().union(*(self.own_names(c) for c in self.vtk_classes))

    def own_names(self, node: str) -> set[str]:
        """Methods and constants of a VTK class: its own from the release's headers, then its bases',
        down to VTK's classes, taken from the installed VTK."""
        if node in self.vtk_classes:
            entry = self.vtk_classes[node]
            names = set(entry["methods"]) | set(entry.get("constants", []))
            for base in entry["bases"]:
                names |= self.own_names(base)
            return names
        return set(dir(getattr(vtk, node))) if hasattr(vtk, node) else set()


RELEASE_APIS = {release: ReleaseApi(api) for release, api in APIS.items()}


def _calls(path: Path):
    """(line, receiver source, attribute, call node or None) of every attribute access in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    calls = {id(n.func): n for n in ast.walk(tree) if isinstance(n, ast.Call)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            yield node.lineno, ast.unparse(node.value), node.attr, calls.get(id(node))


def _check_scripted(api: ReleaseApi, where: str, receiver: str, name: str, call) -> list[str]:
    """``Module.Class`` and ``Module.Class[()].method(...)`` of Slicer's SampleData and the PyTorch
    extension's PyTorchUtils: the class, the method and its keyword arguments."""
    parts = receiver.replace("()", "").split(".")
    classes = api.python[parts[0]]["classes"]
    if len(parts) == 1:
        return [] if name in classes else [f"{where}: {parts[0]} has no {name}"]
    methods = classes.get(parts[1], {})
    if name not in methods:
        return [f"{where}: {parts[1]} has no {name}"]
    unknown = [k.arg for k in call.keywords if k.arg not in methods[name]] if call is not None else []
    return [f"{where}: {name} takes no {unknown}"] if unknown else []


def check_slicer_calls(path: Path, release: str = OLDEST) -> list[str]:
    """Problems with ``path``'s use of Slicer, MRML and VTK against ``release``'s API (empty when none)."""
    api = RELEASE_APIS[release]
    slicer_version = f"Slicer {release}"
    problems = []
    for line, receiver, name, call in _calls(path):
        where = f"{path.name}:{line}: {receiver}.{name}"
        if receiver == "slicer":
            known = (name in api.vtk_classes or name in api.api["qt_classes"] or f"slicer.{name}" in api.python
                     or name in APPLICATION_ATTRIBUTES)
            if not known:
                problems.append(f"{where}: no such class or module in {slicer_version}")
        elif receiver.startswith("slicer.vtk") and receiver.count(".") == 1:
            if name not in api.own_names(receiver.split(".")[1]):
                problems.append(f"{where}: {receiver.split('.')[1]} has no {name} in {slicer_version}")
        elif receiver == "slicer.util":
            params = api.python["slicer.util"]["functions"].get(name)
            if params is None:
                problems.append(f"{where}: slicer.util has no {name} in {slicer_version}")
            elif call is not None and "**" not in params:
                unknown = [k.arg for k in call.keywords if k.arg not in params]
                if unknown:
                    problems.append(f"{where}: {slicer_version}'s {name} takes no {unknown}")
        elif receiver.split(".")[0] in SCRIPTED_MODULES:
            problems += _check_scripted(api, where, receiver, name, call)
        elif name[:1].isupper() and receiver.split(".")[0] not in NOT_SLICER:
            if name not in api.slicer_names and name not in VTK_NAMES:
                problems.append(f"{where}: no {slicer_version} or VTK class has {name}")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "slicer":
            for alias in node.names:
                if node.module == "slicer":
                    ok = alias.name in api.vtk_classes or f"slicer.{alias.name}" in api.python
                else:
                    module = api.python.get(node.module)
                    ok = module is not None and (alias.name in module["functions"] or alias.name in module["classes"])
                if not ok:
                    problems.append(f"{path.name}:{node.lineno}: from {node.module} import {alias.name}: "
                                    f"not in {slicer_version}")
    return problems


@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize("path", [MODULE, LOGIC, MRML, REFINE],
                         ids=["AttnSeg.py", "slicer_logic.py", "mrml.py", "slicer_refine.py"])
def test_every_slicer_call_exists_in_every_supported_release(path, release):
    problems = check_slicer_calls(path, release)
    assert not problems, "\n".join(problems)


def test_the_check_finds_a_call_that_only_newer_slicer_has(tmp_path):
    """``vtkSegment.SetTerminology`` (Slicer 5.10+), a keyword 5.6's util lacks, and a made-up class."""
    source = tmp_path / "newer.py"
    source.write_text("import slicer\n"
                      "segment = slicer.vtkSegment()\n"
                      "segment.SetTerminology('x')\n"
                      "slicer.vtkSegment.SetTerminology\n"
                      "slicer.util.tryWithErrorDisplay('m', waitCursor=True, detailedText='d')\n"
                      "slicer.vtkMRMLNoSuchNode()\n"
                      "from slicer.ScriptedLoadableModule import ScriptedLoadableModuleNoSuch\n"
                      "PyTorchUtils.PyTorchUtilsLogic().installTorch(torchRequirement='>=2')\n")
    problems = "\n".join(check_slicer_calls(source, OLDEST))
    assert "newer.py:3: segment.SetTerminology: no Slicer 5.6.2 or VTK class has SetTerminology" in problems
    assert "newer.py:4: slicer.vtkSegment.SetTerminology: vtkSegment has no SetTerminology in Slicer 5.6.2" in problems
    assert "takes no ['detailedText']" in problems
    assert "slicer.vtkMRMLNoSuchNode: no such class or module in Slicer 5.6.2" in problems
    assert "import ScriptedLoadableModuleNoSuch: not in Slicer 5.6.2" in problems
    assert "installTorch takes no ['torchRequirement']" in problems
    assert hasattr(slicer.vtkSegment, "SetTerminology")  # the slicer-core here is newer: only the list catches it
    assert not [p for p in check_slicer_calls(source, NEWEST) if "SetTerminology" in p]


def test_the_check_finds_a_call_that_a_newer_release_removed(tmp_path):
    """``vtkMRMLLogic`` (Libs/MRML/Core/vtkMRMLLogic.h at v5.6.2 and v5.8.1, gone at v5.10.0) and the
    parameter-node connector of sliders, renamed ``...ToFloatIntConnector`` at v5.10.0."""
    source = tmp_path / "older.py"
    source.write_text("import slicer\n"
                      "slicer.vtkMRMLLogic()\n"
                      "from slicer.parameterNodeWrapper import QDoubleSpinBoxCtkSliderWidgetToFloatConnector\n")
    assert check_slicer_calls(source, "5.8.1") == []
    problems = "\n".join(check_slicer_calls(source, NEWEST))
    assert "older.py:2: slicer.vtkMRMLLogic: no such class or module in Slicer 5.12.3" in problems
    assert "import QDoubleSpinBoxCtkSliderWidgetToFloatConnector: not in Slicer 5.12.3" in problems


@pytest.mark.parametrize("release", RELEASES)
def test_the_api_lists_are_the_supported_releases_with_their_ctk_and_python(release):
    api = RELEASE_APIS[release]
    assert api.version == release and api.api["ctk_commit"] == CTK_COMMITS[release]
    assert api.api["python_version"].startswith(RELEASE_PYTHON[release] + ".")
    segment = api.vtk_classes["vtkSegment"]["methods"]
    assert "SetTag" in segment and "GetTerminologyEntryTagName" in segment
    assert ("SetTerminology" in segment) == (release not in ("5.6.2", "5.8.1"))  # vtkSegment.h from v5.10.0
    assert {"SetMaskMode", "SetMaskSegmentID", "SetOverwriteMode"} <= api.own_names("vtkMRMLSegmentEditorNode")
    assert "EditAllowedInsideSingleSegment" in api.own_names("vtkMRMLSegmentationNode")
    # AttnSeg.py's enter calls it before 5.10 only; the slot stays (deprecated) in 5.10 and 5.12
    assert "turnOffLightboxes()" in api.api["qt_classes"]["qMRMLSegmentEditorWidget"]["slots"]
    # the parameter node method AttnSeg.py connects its panel with (connectParametersToGui, wrapper.py)
    wrapper = api.python["slicer.parameterNodeWrapper"]["functions"]
    assert wrapper["_connectParametersToGui"] == ["self", "mapping"] and wrapper["_disconnectGui"] == ["self", "guiTag"]


def _shipped_python_files() -> list[Path]:
    text = (REPO / "AttnSegExtension" / "CMakeLists.txt").read_text(encoding="utf-8").replace("${MODULE_NAME}", "AttnSeg")
    block = re.search(r"set\(MODULE_PYTHON_SCRIPTS(.*?)\)", text, re.S).group(1)
    return [REPO / "AttnSegExtension" / line.strip() for line in block.splitlines() if line.strip()]


@pytest.mark.parametrize("path", _shipped_python_files(), ids=lambda p: p.name)
def test_code_slicer_runs_is_python_3_9(path):
    """Slicer 5.6 and 5.8 ship Python 3.9: no 3.10+ syntax, and no ``X | Y`` evaluated at run time."""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, feature_version=(3, 9))
    future = "from __future__ import annotations" in source
    for node in ast.walk(tree):
        annotation = getattr(node, "annotation", None) or getattr(node, "returns", None)
        if annotation is not None and not future:
            assert not any(isinstance(n, ast.BinOp) for n in ast.walk(annotation)), \
                f"{path.name}:{node.lineno}: 'X | Y' annotation needs Python 3.10 without the __future__ import"
        if isinstance(node, ast.Call) and ast.unparse(node.func) in ("isinstance", "issubclass"):
            assert not any(isinstance(n, ast.BinOp) for n in ast.walk(node.args[1])), \
                f"{path.name}:{node.lineno}: isinstance with 'X | Y' needs Python 3.10"
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "zip":
            assert not any(k.arg == "strict" for k in node.keywords), f"{path.name}:{node.lineno}: zip(strict=)"
        if isinstance(node, ast.Call) and ast.unparse(node.func) in ("dataclass", "dataclasses.dataclass"):
            assert not any(k.arg in ("slots", "kw_only") for k in node.keywords), f"{path.name}:{node.lineno}"
        if isinstance(node, ast.Attribute):
            assert node.attr not in ("pairwise", "bit_count"), f"{path.name}:{node.lineno}: {node.attr} is 3.10+"

"""What of the Slicer module can be checked without Slicer's Qt: the template's shape (ast), the panel
(.ui XML) against the widget code and the parameter node, the widget calling only logic that exists,
the extension's CMake files against the files on disk (and a CMake run with a stand-in for Slicer's
build macros), the dependency list, and the module's pure helpers executed from their source."""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from AttnSegLib import dependencies
from AttnSegLib import slicer_logic
from AttnSegLib.package import load_package
from conftest import REPO

MODULE = REPO / "AttnSegExtension" / "AttnSeg.py"
UI = REPO / "Resources" / "UI" / "AttnSeg.ui"
MODULE_CMAKE = REPO / "AttnSegExtension" / "CMakeLists.txt"
TOP_CMAKE = REPO / "CMakeLists.txt"
TREE = ast.parse(MODULE.read_text(encoding="utf-8"))
CLASSES = {node.name: node for node in TREE.body if isinstance(node, ast.ClassDef)}
FUNCTIONS = {node.name: node for node in TREE.body if isinstance(node, ast.FunctionDef)}
# Parameters the widget sets by hand: their choices are only known at run time.
MANUAL_PARAMETERS = {"modelName", "mapName"}
# parameterNodeWrapper's GUI connectors: widget class -> the parameter types it can represent.
CONNECTORS = {"qMRMLNodeComboBox": "node", "ctkSliderWidget": "float", "QCheckBox": "bool",
              "QComboBox": "choice", "ctkDirectoryButton": "path"}


def _methods(cls: ast.ClassDef) -> set[str]:
    return {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}


def _bases(cls: ast.ClassDef) -> list[str]:
    return [ast.unparse(b) for b in cls.bases]


def _constant(name: str):
    for node in TREE.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"AttnSeg.py defines no constant {name}")


def _parameter_fields() -> dict[str, str]:
    cls = CLASSES["AttnSegParameterNode"]
    return {n.target.id: ast.unparse(n.annotation) for n in cls.body if isinstance(n, ast.AnnAssign)}


def _ui_widgets() -> dict[str, ElementTree.Element]:
    return {w.get("name"): w for w in ElementTree.parse(UI).getroot().iter("widget")}


def _ui_names_used_by_the_widget() -> set[str]:
    """``self.ui.<name>`` and ``getattr(self.ui, f"<prefix>{i}")`` for i < MAX_MODALITIES."""
    names = set()
    for node in ast.walk(TREE):
        if isinstance(node, ast.Attribute) and ast.unparse(node.value) == "self.ui":
            names.add(node.attr)
        if (isinstance(node, ast.Call) and ast.unparse(node.func) == "getattr" and len(node.args) == 2
                and ast.unparse(node.args[0]) == "self.ui" and isinstance(node.args[1], ast.JoinedStr)):
            prefix = node.args[1].values[0].value
            names.update(f"{prefix}{i}" for i in range(_constant("MAX_MODALITIES")))
    return names


def _helper(name: str, **namespace):
    """A module-level function of AttnSeg.py compiled on its own (it must need nothing but ``namespace``),
    with its decorators."""
    module = ast.Module(body=[FUNCTIONS[name]], type_ignores=[])
    scope = dict(namespace)
    exec(compile(module, str(MODULE), "exec"), scope)
    return scope[name]


def _cmake_list(text: str, variable: str) -> list[str]:
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"no set({variable} ...) in the CMake file"
    return [line.split("#")[0].strip() for line in match.group(1).splitlines() if line.split("#")[0].strip()]


# -- the template -------------------------------------------------------------------------------------
def test_module_has_the_scripted_module_template_classes():
    assert _bases(CLASSES["AttnSeg"]) == ["ScriptedLoadableModule"]
    assert _bases(CLASSES["AttnSegWidget"]) == ["ScriptedLoadableModuleWidget", "VTKObservationMixin"]
    assert _bases(CLASSES["AttnSegLogic"]) == ["ScriptedLoadableModuleLogic"]
    assert _bases(CLASSES["AttnSegTest"]) == ["ScriptedLoadableModuleTest"]
    assert [ast.unparse(d) for d in CLASSES["AttnSegParameterNode"].decorator_list] == ["parameterNodeWrapper"]
    init = ast.unparse(next(n for n in CLASSES["AttnSeg"].body if isinstance(n, ast.FunctionDef)))
    for attribute in ("title", "categories", "contributors", "helpText", "acknowledgementText"):
        assert f"self.parent.{attribute} =" in init
    assert "'Segmentation'" in init


def test_widget_and_test_have_the_template_methods():
    assert {"setup", "cleanup", "enter", "exit", "onSceneStartClose", "onSceneEndClose",
            "initializeParameterNode", "setParameterNode"} <= _methods(CLASSES["AttnSegWidget"])
    assert {"setUp", "runTest"} <= _methods(CLASSES["AttnSegTest"])
    assert any(m.startswith("test_") for m in _methods(CLASSES["AttnSegTest"]))
    assert "getParameterNode" in _methods(CLASSES["AttnSegLogic"])


def test_the_self_test_uses_the_shipped_sample():
    source = ast.unparse(CLASSES["AttnSegTest"])
    for name in re.findall(r"_resourcePath\('([^']+)'\)", source):
        assert (REPO / "Resources" / name).is_file(), name
    assert "SampleData/hippocampus_001_image.nii.gz" in source


def test_parameter_node_holds_the_panel_state():
    fields = _parameter_fields()
    assert {f"inputVolume{i}" for i in range(_constant("MAX_MODALITIES"))} <= set(fields)
    assert fields["segmentation"] == "vtkMRMLSegmentationNode"
    assert fields["device"] == "Annotated[str, Choice(DEVICES)]"
    assert _constant("DEVICES") == ["auto", "cpu", "cuda", "mps"]
    for name in ("mapOpacity", "reviewThreshold"):
        assert fields[name] == "Annotated[float, WithinRange(0.0, 1.0)]"
    assert fields["editDoubtfulOnly"] == "bool" and fields["correctionDirectory"] == "pathlib.Path"


# -- the panel ----------------------------------------------------------------------------------------
def test_every_widget_the_code_uses_is_in_the_ui_file():
    missing = sorted(_ui_names_used_by_the_widget() - set(_ui_widgets()))
    assert not missing, f"AttnSeg.py uses widgets the .ui file lacks: {missing}"


def test_ui_bindings_match_the_parameter_node():
    fields = _parameter_fields()
    bound = {}
    for name, widget in _ui_widgets().items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = widget
    assert set(bound) == set(fields) - MANUAL_PARAMETERS
    for parameter, widget in bound.items():
        kind, annotation = CONNECTORS.get(widget.get("class")), fields[parameter]
        assert kind, f"{parameter}: no parameterNodeWrapper connector for {widget.get('class')}"
        if kind == "node":
            node_types = [s.text for p in widget.findall("property") if p.get("name") == "nodeTypes"
                          for s in p.iter("string")]
            assert node_types == [annotation], parameter
        elif kind == "float":
            assert annotation.startswith("Annotated[float, WithinRange("), parameter  # the slider needs bounds
        elif kind == "choice":
            assert annotation.startswith("Annotated[str, Choice("), parameter
        elif kind == "path":
            assert annotation == "pathlib.Path", parameter
        else:
            assert annotation == kind, parameter
    source = MODULE.read_text(encoding="utf-8")
    for parameter in MANUAL_PARAMETERS:
        assert f"self._parameterNode.{parameter} =" in source


def test_widget_uses_only_parameters_the_parameter_node_has():
    used = {node.attr for node in ast.walk(CLASSES["AttnSegWidget"])
            if isinstance(node, ast.Attribute) and ast.unparse(node.value) == "self._parameterNode"}
    unknown = used - set(_parameter_fields()) - {"connectParametersToGui", "disconnectGui"}
    assert not unknown, f"the widget uses parameters AttnSegParameterNode lacks: {sorted(unknown)}"


def test_ui_file_is_a_mrml_widget_whose_scene_reaches_every_node_selector():
    root = ElementTree.parse(UI).getroot()
    widgets = _ui_widgets()
    assert root.find("widget").get("class") == "qMRMLWidget"
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = {w.get("class") for w in widgets.values()}
    assert {c for c in used if c.startswith(("ctk", "qMRML"))} <= declared
    receivers = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    selectors = {n for n, w in widgets.items() if w.get("class") == "qMRMLNodeComboBox"}
    assert receivers == selectors
    senders = {c.findtext("sender") for c in root.iter("connection")}
    assert senders <= set(widgets)


# -- the widget is thin and calls real logic -----------------------------------------------------------
def test_widget_calls_only_logic_that_exists():
    """The widget calls the module logic's own methods on ``self.logic`` and everything else on its scene logic
    (``self.logic.sceneLogic``); no call is forwarded by name."""
    module_logic = _methods(CLASSES["AttnSegLogic"]) | {"getParameterNode", "sceneLogic"}
    assert "__getattr__" not in module_logic
    for cls, owner in ((CLASSES["AttnSegWidget"], "self.logic"), (CLASSES["AttnSegTest"], "logic")):
        own = {node.attr for node in ast.walk(cls) if isinstance(node, ast.Attribute) and ast.unparse(node.value) == owner}
        assert own <= module_logic, f"{cls.name} calls module logic that does not exist: {sorted(own - module_logic)}"
        scene = {node.attr for node in ast.walk(cls)
                 if isinstance(node, ast.Attribute) and ast.unparse(node.value) in (f"{owner}.sceneLogic", "sceneLogic")}
        missing = sorted(n for n in scene if not hasattr(slicer_logic.SceneLogic, n))
        assert scene and not missing, f"{cls.name} calls scene logic that does not exist: {missing}"


def test_widget_uses_only_what_the_click_refinement_has():
    """``refinement = self._clickRefinement()`` is a :class:`AttnSegLib.slicer_refine.ClickRefinement`: every
    attribute the widget uses on it exists there (the report callback it sets and the report fields too)."""
    from AttnSegLib.slicer_refine import ClickRefinement, ClickReport

    widget = CLASSES["AttnSegWidget"]
    used = {node.attr for node in ast.walk(widget) if isinstance(node, ast.Attribute)
            and ast.unparse(node.value) == "refinement"}
    assert {"startPlacing", "stopPlacing", "placing", "undo", "undoSteps", "classNames", "onReport"} <= used
    settable = {"onReport"}  # set in __init__, not a class attribute
    missing = sorted(n for n in used - settable if not hasattr(ClickRefinement, n))
    assert not missing, f"AttnSeg.py uses what ClickRefinement lacks: {missing}"
    fields = {node.attr for node in ast.walk(widget) if isinstance(node, ast.Attribute)
              and ast.unparse(node.value) == "report"}
    assert fields and fields <= set(ClickReport.__dataclass_fields__), fields - set(ClickReport.__dataclass_fields__)


def test_widget_imports_nothing_heavy_and_the_engine_only_lazily():
    top_level = set()
    for node in TREE.body:
        if isinstance(node, ast.Import):
            top_level.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            top_level.add(node.module)
    assert not top_level & {"numpy", "torch", "SimpleITK", "vtk", "monai", "AttnSegLib.slicer_logic"}
    assert "AttnSegLib.dependencies" in top_level  # standard library only: safe before installing torch
    lazy = [node for node in ast.walk(TREE) if isinstance(node, ast.ImportFrom) and node not in TREE.body]
    for node in lazy:
        module = __import__(node.module, fromlist=[a.name for a in node.names]) if node.module.startswith(
            "AttnSegLib") else None
        for alias in node.names:
            assert module is None or hasattr(module, alias.name), f"{node.module} has no {alias.name}"


_WITHOUT_THE_ENGINE = """
import ast, sys, types
for name in ("torch", "monai", "safetensors"):
    sys.modules[name] = None  # a stock Slicer before Segment installed them: importing them fails
from AttnSegLib.mrml import newScene
try:
    import AttnSegLib.slicer_logic
except ImportError:
    pass
else:
    raise SystemExit("slicer_logic imported without torch: the check below would prove nothing")
module = sys.argv[1]
logic = next(n for n in ast.parse(open(module, encoding="utf-8").read()).body
             if isinstance(n, ast.ClassDef) and n.name == "AttnSegLogic")
method = next(n for n in logic.body if isinstance(n, ast.FunctionDef) and n.name == "segmentEditorNode")
scope = {"slicer": types.SimpleNamespace(mrmlScene=newScene())}
exec(compile(ast.Module(body=[method], type_ignores=[]), module, "exec"), scope)
node = scope["segmentEditorNode"](None)
assert node.IsA("vtkMRMLSegmentEditorNode") and node.GetSingletonTag() == "SegmentEditor"
assert scope["segmentEditorNode"](None) is node
print("built without the engine")
"""


def test_the_panel_is_built_and_entered_without_torch():
    """``setup`` and ``enter`` (through ``_connectEditor``) give the embedded Segment Editor its node before
    torch and MONAI are installed: through ``AttnSegLogic.segmentEditorNode`` (AttnSegLib.mrml), never
    ``sceneLogic``, whose module imports the engine. Run in a Python where importing torch, MONAI and
    safetensors fails, on slicer-core MRML."""
    methods = {f.name: f for f in CLASSES["AttnSegWidget"].body if isinstance(f, ast.FunctionDef)}
    assert "sceneLogic" not in ast.unparse(methods["setup"])
    assert "self.logic.segmentEditorNode()" in ast.unparse(methods["_connectEditor"])
    assert "sceneLogic.segmentEditorNode" not in MODULE.read_text(encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "AttnSegExtension"), str(REPO)]))
    run = subprocess.run([sys.executable, "-c", _WITHOUT_THE_ENGINE, str(MODULE)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0 and "built without the engine" in run.stdout, run.stderr[-2000:]


def test_model_card_html_shows_classes_maps_and_validation_scores():
    card_html = _helper("_modelCardHtml")
    package = load_package(REPO / "Resources" / "Models" / "hippocampus_unet")
    html = card_html(package.summary())
    assert "<b>hippocampus_unet</b> (unet)" in html
    assert "Anterior, Posterior" in html and "background" not in html
    assert "probabilities, uncertainty" in html
    dice = package.card.per_class_dice()["Anterior"]
    assert f"Anterior {dice:.3f}" in html and "40 cases" in html
    assert f"mean {package.card.validation_dice:.3f}" in html  # the accessor `attnseg info` and the web page use


def test_resource_paths_resolve_in_the_source_tree_and_the_installed_layout(tmp_path):
    resource_path = _helper("_resourcePath", os=os, __file__=str(MODULE))
    assert Path(resource_path("UI/AttnSeg.ui")) == UI
    installed = tmp_path / "qt-scripted-modules"
    (installed / "Resources" / "UI").mkdir(parents=True)
    (installed / "Resources" / "UI" / "AttnSeg.ui").write_text("<ui/>")
    resource_path = _helper("_resourcePath", os=os, __file__=str(installed / "AttnSeg.py"))
    assert Path(resource_path("UI/AttnSeg.ui")) == installed / "Resources" / "UI" / "AttnSeg.ui"
    with pytest.raises(FileNotFoundError, match="AttnSeg resource UI/Other.ui is missing"):
        resource_path("UI/Other.ui")


# -- dependencies -------------------------------------------------------------------------------------
def test_dependencies_cover_the_engines_runtime_requirements(monkeypatch):
    declared = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    names = {re.split(r"[<>=!~ ]", spec)[0] for spec in declared}
    # numpy ships with Slicer; tqdm only draws the command line's progress bar.
    listed = {r.spec.split(">")[0] for r in (dependencies.TORCH, *dependencies.PIP_REQUIREMENTS)}
    assert listed == names - {"numpy", "tqdm"}
    assert dependencies.missing_requirements() == []
    absent = dependencies.Requirement("attnseg_no_such_module", "attnseg-no-such-module")
    monkeypatch.setattr(dependencies, "PIP_REQUIREMENTS", (*dependencies.PIP_REQUIREMENTS, absent))
    assert dependencies.missing_requirements() == [absent]


def test_a_package_installed_while_slicer_runs_counts_as_installed(tmp_path, monkeypatch):
    """After pip (a separate process) installs into site-packages, the check sees it even when the folder's
    modification time did not change (a coarse-clock file system): Python's import system caches folder
    listings until ``importlib.invalidate_caches()``, which Slicer 5.6's ``pip_install`` does not call
    (Base/Python/slicer/util.py at v5.6.2; Slicer 5.12's slicer/packaging.py does, for the same reason)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    later = dependencies.Requirement("attnseg_installed_later", "attnseg-installed-later")
    monkeypatch.setattr(dependencies, "PIP_REQUIREMENTS", (*dependencies.PIP_REQUIREMENTS, later))
    assert dependencies.missing_requirements() == [later]
    listed = os.stat(tmp_path)
    (tmp_path / "attnseg_installed_later").mkdir()
    (tmp_path / "attnseg_installed_later" / "__init__.py").write_text("", encoding="utf-8")
    os.utime(tmp_path, ns=(listed.st_atime_ns, listed.st_mtime_ns))  # the folder looks unchanged
    assert dependencies.missing_requirements() == []


# -- the extension's CMake files ----------------------------------------------------------------------
def _module_files() -> tuple[list[str], list[str]]:
    text = MODULE_CMAKE.read_text(encoding="utf-8").replace("${MODULE_NAME}", "AttnSeg")
    return _cmake_list(text, "MODULE_PYTHON_SCRIPTS"), _cmake_list(text, "MODULE_PYTHON_RESOURCES")


def test_module_cmake_lists_every_script_and_resource():
    scripts, resources = _module_files()
    package = REPO / "AttnSegExtension" / "AttnSegLib"
    on_disk = {"AttnSeg.py"} | {str(p.relative_to(REPO / "AttnSegExtension")) for p in package.rglob("*.py")
                                if "__pycache__" not in p.parts and "web" not in p.relative_to(package).parts}
    assert set(scripts) == on_disk, (f"add to MODULE_PYTHON_SCRIPTS: {sorted(on_disk - set(scripts))}; "
                                     f"remove: {sorted(set(scripts) - on_disk)}")
    shipped = {str(p.relative_to(REPO)) for folder in ("Icons", "UI", "Models", "SampleData", "Atlas")
               for p in (REPO / "Resources" / folder).rglob("*") if p.is_file()}
    assert set(resources) == shipped, (f"add to MODULE_PYTHON_RESOURCES: {sorted(shipped - set(resources))}; "
                                       f"remove: {sorted(set(resources) - shipped)}")
    text = MODULE_CMAKE.read_text(encoding="utf-8")
    assert re.search(r"slicerMacroBuildScriptedModule\(\s*NAME \$\{MODULE_NAME\}.*?WITH_GENERIC_TESTS", text, re.S)


def test_extension_cmake_has_the_metadata_the_extension_index_needs():
    text = TOP_CMAKE.read_text(encoding="utf-8")
    values = dict(re.findall(r'set\((EXTENSION_\w+) "([^"]*)"\)', text))
    assert {"EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
            "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"} <= set(values)
    assert values["EXTENSION_CATEGORY"] == "Segmentation" and values["EXTENSION_DEPENDS"] == "PyTorch"
    for url in (values["EXTENSION_ICONURL"], values["EXTENSION_SCREENSHOTURLS"]):
        assert (REPO / url.split("/main/", 1)[1]).is_file(), url
    assert "add_subdirectory(AttnSegExtension)" in text


STAND_IN_SLICER = """
# A stand-in for Slicer's build macros: records what the extension asks for and checks its files.
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR "lib/Slicer-5.8/qt-scripted-modules")
set(Slicer_USE_FILE "${CMAKE_CURRENT_LIST_DIR}/empty.cmake")
set(Slicer_EXTENSION_GENERATE_CONFIG "${CMAKE_CURRENT_LIST_DIR}/empty.cmake")
set(Slicer_EXTENSION_CPACK "${CMAKE_CURRENT_LIST_DIR}/empty.cmake")
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY "WITH_GENERIC_TESTS" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  foreach(script ${MY_SCRIPTS})
    if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${script})
      message(FATAL_ERROR "nonexistent script ${script}")
    endif()
    file(APPEND ${CMAKE_BINARY_DIR}/scripts.txt "${script}\\n")
  endforeach()
  file(WRITE ${CMAKE_BINARY_DIR}/module.txt "${MY_NAME} ${MY_WITH_GENERIC_TESTS}")
endmacro()
function(slicer_add_python_unittest)
  cmake_parse_arguments(MY "" "SCRIPT" "" ${ARGN})
  file(WRITE ${CMAKE_BINARY_DIR}/unittest.txt "${MY_SCRIPT}")
endfunction()
"""


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_configures_and_stages_resources_beside_the_module(tmp_path):
    slicer_dir = tmp_path / "slicer"
    slicer_dir.mkdir()
    (slicer_dir / "SlicerConfig.cmake").write_text(STAND_IN_SLICER)
    (slicer_dir / "empty.cmake").write_text("")
    build = tmp_path / "build"
    run = subprocess.run(["cmake", "-S", str(REPO), "-B", str(build), f"-DSlicer_DIR={slicer_dir}",
                          "-DBUILD_TESTING=ON"], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    scripts, resources = _module_files()
    assert (build / "scripts.txt").read_text(encoding="utf-8").split() == scripts
    assert (build / "module.txt").read_text(encoding="utf-8") == "AttnSeg TRUE"
    assert (build / "unittest.txt").read_text(encoding="utf-8") == "AttnSeg.py"
    module_dir = build / "lib" / "Slicer-5.8" / "qt-scripted-modules"
    for resource in resources:
        assert (module_dir / resource).read_bytes() == (REPO / resource).read_bytes(), resource


# -- the Extensions Index entries -------------------------------------------------------------------
# Slicer/ExtensionsIndex schemas/slicer-extension-catalog-entry-schema-v1.0.1.json: its properties and
# required keys (additionalProperties is false).
CATALOG_KEYS = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                "build_subdirectory", "enabled", "tier"}
CATALOG_REQUIRED = {"$schema", "category", "scm_url"}


def _cmake_metadata() -> dict[str, str]:
    return dict(re.findall(r'set\((EXTENSION_\w+) "([^"]*)"\)', TOP_CMAKE.read_text(encoding="utf-8")))


def test_catalog_entry_follows_the_extensions_index_schema():
    """ExtensionsIndex/AttnSeg.json: what the index reads from Slicer 5.8 on (metadata from the CMake file)."""
    entry = json.loads((REPO / "ExtensionsIndex" / "AttnSeg.json").read_text(encoding="utf-8"))
    assert CATALOG_REQUIRED <= set(entry) <= CATALOG_KEYS
    assert entry["$schema"].endswith("/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json#")
    metadata = _cmake_metadata()
    assert entry["category"] == metadata["EXTENSION_CATEGORY"]
    assert entry["build_dependencies"] == metadata["EXTENSION_DEPENDS"].split() == ["PyTorch"]
    assert entry["scm_url"] == metadata["EXTENSION_HOMEPAGE"] and entry["build_subdirectory"] == "."
    assert isinstance(entry["tier"], int) and 1 <= entry["tier"] <= 5


def test_s4ext_for_the_slicer_5_6_index_matches_the_cmake_metadata():
    """ExtensionsIndex/AttnSeg.s4ext: the Slicer 5.6 branch of the index still reads .s4ext files."""
    lines = [line.split(" ", 1) for line in (REPO / "ExtensionsIndex" / "AttnSeg.s4ext").read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.startswith("#")]
    values = {parts[0]: parts[1].strip() if len(parts) > 1 else "" for parts in lines}
    metadata = _cmake_metadata()
    for key, cmake_key in (("homepage", "HOMEPAGE"), ("category", "CATEGORY"), ("contributors", "CONTRIBUTORS"),
                           ("description", "DESCRIPTION"), ("iconurl", "ICONURL"),
                           ("screenshoturls", "SCREENSHOTURLS"), ("depends", "DEPENDS")):
        assert values[key] == metadata[f"EXTENSION_{cmake_key}"], key
    assert values["scm"] == "git" and values["scmurl"] == json.loads(
        (REPO / "ExtensionsIndex" / "AttnSeg.json").read_text(encoding="utf-8"))["scm_url"]


def test_icon_and_screenshots_are_files_of_this_repository():
    from PIL import Image as Picture

    metadata = _cmake_metadata()
    icon = REPO / metadata["EXTENSION_ICONURL"].split("/main/", 1)[1]
    assert Picture.open(icon).size == (128, 128)  # the size the Extensions Manager shows
    for url in metadata["EXTENSION_SCREENSHOTURLS"].split():
        assert url.startswith("https://raw.githubusercontent.com/AttnSeg/SlicerAttnSeg/main/")
        assert (REPO / url.split("/main/", 1)[1]).is_file(), url


# -- behaviour Slicer's harness would show ------------------------------------------------------------
def _method(class_name: str, name: str, **namespace):
    """A method of a class of AttnSeg.py compiled on its own, with ``namespace`` as its globals."""
    function = next(n for n in CLASSES[class_name].body if isinstance(n, ast.FunctionDef) and n.name == name)
    scope = dict(namespace)
    exec(compile(ast.Module(body=[function], type_ignores=[]), str(MODULE), "exec"), scope)
    return scope[name]


def _self_test_case(missing: list, ran: list, shown: list):
    """AttnSegTest with its ``setUp``, ``runTest`` and ``test_SegmentReviewExport`` compiled from AttnSeg.py
    on ``unittest.TestCase``; ``missing_requirements`` returns ``missing``, ``delayDisplay`` (Qt in
    Slicer's ScriptedLoadableModuleTest) records into ``shown``, the scene clear and the test body into
    ``ran``."""
    import types
    import unittest

    scene = types.SimpleNamespace(Clear=lambda: ran.append("setUp"))
    namespace = dict(unittest=unittest, missing_requirements=lambda: missing,
                     slicer=types.SimpleNamespace(mrmlScene=scene))
    methods = {name: _method("AttnSegTest", name, **namespace) for name in ("setUp", "runTest")}
    return type("AttnSegTest", (unittest.TestCase,), {
        **methods, "delayDisplay": lambda self, message: shown.append(message),
        "test_SegmentReviewExport": lambda self: ran.append("test")})


@pytest.mark.parametrize("harness", ["ctest", "Reload and Test"])
def test_self_test_skips_with_the_reason_when_torch_or_monai_is_missing(harness):
    """Both harnesses skip: the extension's ctest (``slicer_add_python_unittest`` runs
    ``slicer.testing.runUnitTest``: ``unittest.TestLoader().loadTestsFromName("AttnSeg")`` and a
    ``TextTestRunner``, Base/Python/slicer/testing.py at v5.6.2 and v5.12.3), which runs ``setUp`` and
    ``test_SegmentReviewExport`` and never ``runTest``; and Reload and Test, which calls ``runTest``."""
    import io
    import types
    import unittest

    shown, ran = [], []
    case = _self_test_case([dependencies.TORCH, dependencies.PIP_REQUIREMENTS[0]], ran, shown)
    if harness == "ctest":
        module = types.ModuleType("AttnSeg")
        module.AttnSegTest = case
        result = unittest.TextTestRunner(stream=io.StringIO()).run(unittest.TestLoader().loadTestsFromModule(module))
        assert result.wasSuccessful() and result.testsRun == 1
        assert [reason for _, reason in result.skipped] == [shown[0]]
    else:
        with pytest.raises(unittest.SkipTest, match="torch, monai not installed"):
            case().runTest()
    assert "skipped" in shown[0] and "torch, monai not installed" in shown[0] and not ran
    ran.clear()
    case = _self_test_case([], ran, shown)
    if harness == "ctest":
        result = unittest.TextTestRunner(stream=io.StringIO()).run(unittest.TestLoader().loadTestsFromTestCase(case))
        assert result.wasSuccessful() and not result.skipped
    else:
        case().runTest()
    assert ran == ["setUp", "test"]


@pytest.mark.parametrize("version, reset", [((5, 6), True), ((5, 8), True), ((5, 8), False), ((5, 10), False),
                                            ((5, 12), False)])
def test_entering_resets_light_box_views_where_the_segment_editor_cannot_edit_them(version, reset):
    """As the Segment Editor module's ``enter`` (Modules/Scripted/SegmentEditor/SegmentEditor.py): at
    v5.6.2 and v5.8.1 it calls ``turnOffLightboxes()`` and warns when views were reset; at v5.10.0 it
    does not, and the widget's slot only logs that it is deprecated. ``reset``: a view was in light box."""
    import types

    calls, warnings = [], []

    class Editor:
        def turnOffLightboxes(self):
            calls.append("turnOffLightboxes")
            return reset

        def installKeyboardShortcuts(self):
            calls.append("installKeyboardShortcuts")

        def setupViewObservations(self):
            calls.append("setupViewObservations")

    fake_slicer = types.SimpleNamespace(
        app=types.SimpleNamespace(majorVersion=version[0], minorVersion=version[1]),
        util=types.SimpleNamespace(warningDisplay=lambda text, windowTitle: warnings.append((text, windowTitle))))
    enter = _method("AttnSegWidget", "enter", slicer=fake_slicer, _=lambda text: text,
                    LIGHTBOX_EDITING_SLICER=_constant("LIGHTBOX_EDITING_SLICER"))
    widget = types.SimpleNamespace(initializeParameterNode=lambda: calls.append("parameters"),
                                   _connectEditor=lambda: calls.append("editor"),
                                   ui=types.SimpleNamespace(segmentEditorWidget=Editor()))
    enter(widget)
    before_5_10 = version < (5, 10)
    assert calls == ["parameters", "editor", *(["turnOffLightboxes"] if before_5_10 else []),
                     "installKeyboardShortcuts", "setupViewObservations"]
    assert len(warnings) == (1 if before_5_10 and reset else 0)
    assert all("light box" in text and title == "AttnSeg" for text, title in warnings)


class _WrappedParameterNode:
    """What AttnSeg.py uses of a parameterNodeWrapper node, as Base/Python/slicer/parameterNodeWrapper/
    wrapper.py has it in ``release``: ``connectParametersToGui`` connects a mapping under a new tag and
    returns it; ``disconnectGui`` disconnects a tag's widgets and ignores a tag it does not know (None);
    ``connectGui`` connects the same way but returns its tag only from v5.10.0 (Slicer commit b5a65a49a0;
    at v5.6.2 and v5.8.1 ``_connectGui`` drops ``_connectParametersToGui``'s return value)."""

    modelName = ""

    def __init__(self, release: str):
        self.release, self.connected, self._next = release, {}, 0

    def connectParametersToGui(self, mapping: dict) -> int:
        self._next += 1
        self.connected[self._next] = dict(mapping)
        return self._next

    def connectGui(self, gui):
        widgets = {w.property("SlicerParameterName"): w for w in vars(gui).values() if w.property("SlicerParameterName")}
        tag = self.connectParametersToGui(widgets)
        return tag if tuple(int(v) for v in self.release.split(".")[:2]) >= (5, 10) else None

    def disconnectGui(self, tag) -> None:
        self.connected.pop(tag, None)


@pytest.mark.parametrize("release", ["5.6.2", "5.8.1", "5.10.0", "5.12.3"])
def test_leaving_the_module_or_closing_the_scene_disconnects_the_panel_from_the_parameter_node(release):
    """Enter, exit, enter, close the scene: while the module is shown the panel's widgets with a
    ``SlicerParameterName`` (those of the .ui) are connected once, and afterwards not at all, in every
    release (``connectGui``'s tag is None before 5.10, so it could not be disconnected there)."""
    import types

    class Widget:
        def __init__(self, parameter):
            self._parameter = parameter

        def property(self, name):
            return self._parameter if name == "SlicerParameterName" else None

    ui_widgets = _ui_widgets()
    bound = {name: w.findtext("property[@name='SlicerParameterName']/string") for name, w in ui_widgets.items()}
    editor = types.SimpleNamespace(setActiveEffect=lambda effect: None, uninstallKeyboardShortcuts=lambda: None,
                                   removeViewObservations=lambda: None, property=lambda name: None)
    ui = types.SimpleNamespace(**{name: Widget(parameter) for name, parameter in bound.items()})
    ui.segmentEditorWidget = editor
    widget = types.SimpleNamespace(ui=ui, _parameterNode=None, _parameterNodeGuiTag=None,
                                   _populateMaps=lambda: None, _populateRefineClasses=lambda: None,
                                   _updateButtons=lambda: None)
    namespace = {"_parameterWidgets": _helper("_parameterWidgets")}
    set_parameter_node = _method("AttnSegWidget", "setParameterNode", **namespace)
    exit_module = _method("AttnSegWidget", "exit", **namespace)
    node = _WrappedParameterNode(release)
    expected = {parameter for parameter in bound.values() if parameter}
    assert {"inputVolume0", "device", "roi", "segmentation", "mapOpacity", "correctionDirectory"} <= expected
    for _ in range(2):
        set_parameter_node(widget, node)  # enter
        assert [set(mapping) for mapping in node.connected.values()] == [expected]
        exit_module(widget)
        assert node.connected == {}
    set_parameter_node(widget, node)
    set_parameter_node(widget, None)  # the scene closes while the module is shown
    assert node.connected == {} and widget._parameterNode is None


def test_errors_shown_while_building_the_panel_do_not_abort_it():
    """``_showErrors`` shows and logs an error and carries on (slicer.util.tryWithErrorDisplay re-raises)."""
    import contextlib
    import logging
    import types

    displayed, cursor = [], []
    fake_slicer = types.SimpleNamespace(
        util=types.SimpleNamespace(errorDisplay=displayed.append),
        app=types.SimpleNamespace(setOverrideCursor=lambda c: cursor.append("wait"),
                                  restoreOverrideCursor=lambda: cursor.append("restored")))
    show_errors = _helper("_showErrors", contextlib=contextlib, logging=logging, slicer=fake_slicer,
                          qt=types.SimpleNamespace(Qt=types.SimpleNamespace(WaitCursor=3)))
    after = []
    with show_errors("The model package cannot be used.", waitCursor=True):
        raise ValueError("model.json: classes missing")
    after.append("the panel goes on")
    assert after and cursor == ["wait", "restored"]
    assert displayed == ["The model package cannot be used.\n\nmodel.json: classes missing"]
    with show_errors("fine"):
        pass
    assert len(displayed) == 1


def test_install_torch_passes_the_version_requirement():
    source = ast.unparse(CLASSES["AttnSegWidget"])
    assert "installTorch(askConfirmation=False, torchVersionRequirement=torchRequirement)" in source
    assert "torchRequirement = TORCH.spec[len(TORCH.module):]" in source
    assert dependencies.TORCH.spec[len(dependencies.TORCH.module):] == ">=2.2"

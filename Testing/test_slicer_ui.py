"""The panel as Qt builds it, checked against what the widget code does with it (stands in for clicking).

``Resources/UI/AttnSeg.ui`` is loaded with Qt's own ``QUiLoader`` (PySide6, offscreen). CTK and MRML
widgets are unknown to it and become their Qt base class; their signals, slots, invokable methods
and properties come from the Slicer / CTK headers of every supported release (``slicer_releases``:
5.6.2 to 5.12.3), those of Qt classes from Qt's meta-objects. Checked: object names are unique, the
panel has one section each for the model, the inputs, the review and saving, every widget
``AttnSeg.py`` reaches exists with the class its use needs, every signal it connects to and every
member it reads or sets exists on that class, the ``.ui``'s own connections are between a real signal
and a real slot, and every ``SlicerParameterName`` is a parameter of ``AttnSegParameterNode`` with a
parameterNodeWrapper connector in each release. The widget's map code itself runs on the loaded panel
against the real scene logic on slicer-core MRML (Qt properties set as PythonQt sets them), so what
the user reads beside each map is checked too.
"""
from __future__ import annotations

import ast
import collections
import os
import xml.etree.ElementTree as ElementTree

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
from PySide6 import QtWidgets  # noqa: E402
from PySide6.QtCore import QMetaObject, QObject  # noqa: E402
from PySide6.QtUiTools import QUiLoader  # noqa: E402

from conftest import REPO  # noqa: E402
from slicer_releases import APIS, RELEASES  # noqa: E402

UI = REPO / "Resources" / "UI" / "AttnSeg.ui"
MODULE = REPO / "AttnSegExtension" / "AttnSeg.py"
TREE = ast.parse(MODULE.read_text(encoding="utf-8"))
WIDGET_CLASS = next(n for n in TREE.body if isinstance(n, ast.ClassDef) and n.name == "AttnSegWidget")
# parameterNodeWrapper connectors (slicer/parameterNodeWrapper/guiConnectors.py), by widget: the slider's
# was renamed ...ToFloatIntConnector at v5.10.0, when it learnt int parameters (the float path is unchanged).
CONNECTORS = {"qMRMLNodeComboBox": ("qMRMLNodeComboBoxToNodeConnector",),
              "ctkSliderWidget": ("QDoubleSpinBoxCtkSliderWidgetToFloatConnector",
                                  "QDoubleSpinBoxCtkSliderWidgetToFloatIntConnector"),
              "QCheckBox": ("QCheckBoxToBoolConnector",), "QComboBox": ("QComboBoxToStringableConnector",),
              "ctkDirectoryButton": ("ctkDirectoryButtonToPathConnector",)}
SECTIONS = ["Model", "Inputs", "Review", "Refine with clicks", "Correct", "Save correction for training"]


@pytest.fixture(scope="module")
def panel():
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    loader = QUiLoader()
    widget = loader.load(str(UI))
    assert widget is not None, loader.errorString()
    yield widget
    widget.deleteLater()
    app.processEvents()


def _xml_classes() -> dict[str, str]:
    return {w.get("name"): w.get("class") for w in ElementTree.parse(UI).getroot().iter("widget")}


def _qt_class(name: str):
    """The PySide6 class of a Qt class name, or None for a CTK/MRML one."""
    return getattr(QtWidgets, name, None)


def _qt_base(name: str, release: str) -> str:
    """The first Qt class up the CTK/MRML inheritance chain (in ``release``)."""
    while _qt_class(name) is None:
        name = APIS[release]["qt_classes"][name]["bases"][0]
    return name


def _api_members(name: str, kind: str, release: str) -> set[str]:
    qt_api, members = APIS[release]["qt_classes"], set()
    while name in qt_api:
        members |= set(qt_api[name][kind])
        name = qt_api[name]["bases"][0]
    return members


def has_signal(class_name: str, signature: str, release: str) -> bool:
    normalized = QMetaObject.normalizedSignature(signature).data().decode()
    if normalized in _api_members(class_name, "signals", release):
        return True
    meta = _qt_class(_qt_base(class_name, release)).staticMetaObject
    return meta.indexOfSignal(normalized) >= 0


def has_slot(class_name: str, signature: str, release: str) -> bool:
    normalized = QMetaObject.normalizedSignature(signature).data().decode()
    if normalized in _api_members(class_name, "slots", release):
        return True
    meta = _qt_class(_qt_base(class_name, release)).staticMetaObject
    return meta.indexOfSlot(normalized) >= 0


def has_member(class_name: str, member: str, release: str) -> bool:
    """What PythonQt lets Python use in ``release``: properties, slots, invokable methods (and a Qt
    class's methods)."""
    if member in _api_members(class_name, "properties", release) | _api_members(class_name, "invokables", release) \
            or member in {s.split("(")[0] for s in _api_members(class_name, "slots", release)}:
        return True
    qt = _qt_class(_qt_base(class_name, release))
    return qt.staticMetaObject.indexOfProperty(member) >= 0 or hasattr(qt, member)


def _max_modalities() -> int:
    return next(ast.literal_eval(n.value) for n in TREE.body if isinstance(n, ast.Assign)
                and ast.unparse(n.targets[0]) == "MAX_MODALITIES")


def _ui_expression_names(node) -> list[str]:
    """The .ui widget names an expression of the widget code stands for (through its aliases)."""
    text = ast.unparse(node)
    if text.startswith("self.ui.") and text.count(".") == 2:
        return [text.split(".")[2]]
    prefixes = {"self.inputSelectors": "inputVolumeSelector", "self.inputLabels": "inputVolumeLabel"}
    if text in prefixes:
        return [f"{prefixes[text]}{i}" for i in range(_max_modalities())]
    if isinstance(node, ast.Tuple):
        return [name for element in node.elts for name in _ui_expression_names(element)]
    return []


def widget_uses() -> list[tuple[int, str, str, str | None]]:
    """(line, widget name, member, connected signal or None) for what AttnSegWidget does with a widget:
    ``self.ui.x.member``, and the same through ``y = self.ui.x``, ``for y in (self.ui.x, ...)``,
    ``self.inputSelectors`` / ``self.inputLabels`` and loops over them."""
    uses = []
    for function in (n for n in WIDGET_CLASS.body if isinstance(n, ast.FunctionDef)):
        aliases: dict[str, list[str]] = {}
        for node in ast.walk(function):
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                if _ui_expression_names(node.value):
                    aliases[node.targets[0].id] = _ui_expression_names(node.value)
            if isinstance(node, ast.For):
                iterated = node.iter
                if isinstance(iterated, ast.Call) and ast.unparse(iterated.func) == "enumerate":
                    iterated = iterated.args[0]
                target = node.target.elts[-1] if isinstance(node.target, ast.Tuple) and \
                    ast.unparse(node.iter.func if isinstance(node.iter, ast.Call) else node.iter) == "enumerate" \
                    else node.target
                if isinstance(iterated, ast.Call) and ast.unparse(iterated.func) == "zip":
                    for element, source in zip(target.elts, iterated.args):
                        aliases[element.id] = _ui_expression_names(source)
                elif isinstance(target, ast.Name) and _ui_expression_names(iterated):
                    aliases[target.id] = _ui_expression_names(iterated)
        calls = {id(n.func): n for n in ast.walk(function) if isinstance(n, ast.Call)}
        for node in ast.walk(function):
            if not isinstance(node, ast.Attribute):
                continue
            names = _ui_expression_names(node.value) or aliases.get(ast.unparse(node.value), [])
            for name in names:
                signal = None
                call = calls.get(id(node))
                if node.attr == "connect" and call is not None and isinstance(call.args[0], ast.Constant):
                    signal = call.args[0].value
                uses.append((node.lineno, name, node.attr, signal))
    return uses


def test_object_names_are_unique(panel):
    names = [o.objectName() for o in panel.findChildren(QObject) if o.objectName()]
    duplicates = [n for n, c in collections.Counter(names).items() if c > 1]
    assert not duplicates, f"the loaded panel has several objects named {duplicates}"
    xml_names = [e.get("name") for e in ElementTree.parse(UI).getroot().iter() if e.tag in ("widget", "layout", "spacer")]
    assert len(xml_names) == len(set(xml_names))


def test_the_panel_has_one_section_per_step(panel):
    sections = [w for w in panel.findChildren(QtWidgets.QWidget) if _xml_classes().get(w.objectName()) ==
                "ctkCollapsibleButton"]
    assert sorted(w.objectName() for w in sections) == ["correctionCollapsibleButton", "editorCollapsibleButton",
                                                        "inputsCollapsibleButton", "modelCollapsibleButton",
                                                        "refineCollapsibleButton", "reviewCollapsibleButton"]
    root = ElementTree.parse(UI).getroot()
    texts = [w.find("property[@name='text']/string").text for w in root.iter("widget")
             if w.get("class") == "ctkCollapsibleButton"]
    assert texts == SECTIONS
    for name in ("segmentButton", "progressBar", "statusLabel"):  # the run controls belong to Inputs
        assert panel.findChild(QtWidgets.QWidget, name).parent().objectName() == "inputsCollapsibleButton"


@pytest.mark.parametrize("release", RELEASES)
def test_every_widget_the_code_reaches_exists_with_a_class_that_has_what_it_uses(panel, release):
    classes = _xml_classes()
    uses = widget_uses()
    reached = {name for _, name, _, _ in uses}
    assert {"segmentButton", "progressBar", "mapComboBox", "opacitySlider", "inputVolumeSelector3",
            "editDoubtfulOnlyCheckBox", "legendBar"} <= reached  # the alias resolution sees the code
    problems = []
    for line, name, member, signal in uses:
        loaded = panel.findChild(QtWidgets.QWidget, name)
        if loaded is None or name not in classes:
            problems.append(f"AttnSeg.py:{line}: self.ui.{name} is not in the panel")
            continue
        cls = classes[name]
        if _qt_class(cls) is not None:  # a Qt class: the loader built exactly it
            assert loaded.metaObject().className() == cls
        if signal is not None:
            if not has_signal(cls, signal, release):
                problems.append(f"AttnSeg.py:{line}: {name} ({cls}) has no signal {signal} in Slicer {release}")
        elif member != "connect" and not has_member(cls, member, release):
            problems.append(f"AttnSeg.py:{line}: {name} ({cls}) has no {member} in Slicer {release}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("release", RELEASES)
def test_the_check_catches_a_signal_or_member_the_class_lacks(release):
    assert has_signal("qMRMLNodeComboBox", "currentNodeChanged(vtkMRMLNode*)", release)
    assert not has_signal("qMRMLNodeComboBox", "currentNodeChanged(vtkMRMLScalarVolumeNode*)", release)
    assert has_signal("ctkSliderWidget", "valueChanged(double)", release)
    assert not has_signal("ctkSliderWidget", "valueChanged(int)", release)
    assert has_signal("QPushButton", "clicked(bool)", release) and has_signal("QComboBox", "currentIndexChanged(int)",
                                                                               release)
    assert has_member("ctkSliderWidget", "value", release) and has_member("qMRMLNodeComboBox", "currentNode", release)
    assert has_member("ctkCollapsibleButton", "collapsed", release) and has_member("ctkCollapsibleButton", "text",
                                                                                    release)
    assert not has_member("ctkSliderWidget", "checked", release) and not has_member("QLabel", "currentText", release)


@pytest.mark.parametrize("release", RELEASES)
def test_the_ui_connections_join_real_signals_and_slots(release):
    classes = _xml_classes()
    connections = list(ElementTree.parse(UI).getroot().iter("connection"))
    assert connections
    for connection in connections:
        sender, receiver = classes[connection.findtext("sender")], classes[connection.findtext("receiver")]
        assert has_signal(sender, connection.findtext("signal"), release), (sender, connection.findtext("signal"))
        assert has_slot(receiver, connection.findtext("slot"), release), (receiver, connection.findtext("slot"))


@pytest.mark.parametrize("release", RELEASES)
def test_the_ui_sets_only_properties_its_classes_have(release):
    for widget in ElementTree.parse(UI).getroot().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("stdset") == "0":  # a dynamic property (SlicerParameterName)
                continue
            assert has_member(widget.get("class"), prop.get("name"), release), (widget.get("name"), prop.get("name"))


@pytest.mark.parametrize("release", RELEASES)
def test_parameter_names_match_the_parameter_node(panel, release):
    parameter_node = next(n for n in TREE.body if isinstance(n, ast.ClassDef) and n.name == "AttnSegParameterNode")
    fields = {n.target.id for n in parameter_node.body if isinstance(n, ast.AnnAssign)}
    classes = _xml_classes()
    bound = {}
    for widget in panel.findChildren(QtWidgets.QWidget):
        parameter = widget.property("SlicerParameterName")
        if parameter:
            bound[parameter] = classes[widget.objectName()]
    assert bound and set(bound) <= fields, f"no such parameter: {sorted(set(bound) - fields)}"
    assert fields - set(bound) == {"modelName", "mapName"}  # filled by hand: their choices come at run time
    connectors = APIS[release]["python"]["slicer.parameterNodeWrapper"]["classes"]
    for parameter, cls in bound.items():
        assert len(set(CONNECTORS[cls]) & set(connectors)) == 1, f"{parameter}: Slicer {release} cannot connect a {cls}"


def test_the_segment_editor_is_in_the_panel_under_the_review_and_the_module_never_leaves(panel):
    """Slicer's Segment Editor widget (as the Segment Editor module itself builds it) sits in the panel's
    Correct section right under Review and the three rows of Refine with clicks, so Previous/Next region
    stay in view while correcting; the code
    hands it the editor node before the scene, the AttnSeg segmentation and its input, sets it up on
    enter and releases effects, shortcuts and view observations on exit; no button leaves the module."""
    classes = _xml_classes()
    assert classes["segmentEditorWidget"] == "qMRMLSegmentEditorWidget"
    editor = panel.findChild(QtWidgets.QWidget, "segmentEditorWidget")
    assert editor.parent().objectName() == "editorCollapsibleButton"
    order = [w.get("name") for w in ElementTree.parse(UI).getroot().iter("widget")
             if w.get("class") == "ctkCollapsibleButton"]
    review = order.index("reviewCollapsibleButton")
    assert order[review:review + 3] == ["reviewCollapsibleButton", "refineCollapsibleButton", "editorCollapsibleButton"]
    used = collections.defaultdict(list)
    for line, name, member, _ in widget_uses():
        if name == "segmentEditorWidget":
            used[member].append(line)
    for member in ("setMRMLSegmentEditorNode", "setMRMLScene", "setSegmentationNode", "setSourceVolumeNode",
                   "turnOffLightboxes", "installKeyboardShortcuts", "setupViewObservations", "setActiveEffect",
                   "uninstallKeyboardShortcuts", "removeViewObservations"):
        assert used[member], f"AttnSeg.py never calls segmentEditorWidget.{member}"
    assert min(used["setMRMLSegmentEditorNode"]) < min(used["setMRMLScene"])
    methods = {f.name: ast.unparse(f) for f in WIDGET_CLASS.body if isinstance(f, ast.FunctionDef)}
    assert "installKeyboardShortcuts" in methods["enter"] and "removeViewObservations" in methods["exit"]
    assert "selectModule" not in ast.unparse(WIDGET_CLASS) and "openSegmentEditorButton" not in classes


class _PythonQtView:
    """A loaded widget as PythonQt shows it to ``AttnSeg.py``: a Qt property read and set as an attribute
    (``label.text = "..."`` sets the QLabel's text), anything else the widget's own method."""

    def __init__(self, widget):
        object.__setattr__(self, "_widget", widget)

    def __getattr__(self, name):
        value = self._widget.property(name)
        return value if value is not None else getattr(self._widget, name)

    def __setattr__(self, name, value):
        assert self._widget.setProperty(name, value), f"{self._widget.objectName()} has no property {name}"


def _widget_methods(*names: str) -> type:
    """A class holding AttnSegWidget's methods ``names`` compiled from AttnSeg.py as they are."""
    methods = [n for n in WIDGET_CLASS.body if isinstance(n, ast.FunctionDef) and n.name in names]
    assert sorted(m.name for m in methods) == sorted(names)
    cls = ast.ClassDef(name="Widget", bases=[], keywords=[], body=methods, decorator_list=[], type_params=[])
    scope = {"_": lambda text: text}  # slicer.i18n.tr without a translation
    exec(compile(ast.fix_missing_locations(ast.Module(body=[cls], type_ignores=[])), str(MODULE), "exec"), scope)
    return scope["Widget"]


def test_beside_each_map_the_panel_shows_its_unit_meaning_and_what_its_card_measured(panel):
    """The widget's own map code (``_populateMaps``, ``onMapChanged``) run on the loaded panel, with the scene
    logic on a real MRML scene holding the shipped default model's result on the sample: each map the
    user can pick shows its legend range, unit, meaning and measured information as the card gives them."""
    from types import SimpleNamespace

    from AttnSegLib.mrml import newScene
    from AttnSegLib.outputs import information_note
    from AttnSegLib.package import default_package
    from AttnSegLib.slicer_logic import SceneLogic

    package = default_package()
    logic = SceneLogic(newScene())
    result = logic.segment([logic.loadVolume(REPO / "Resources" / "SampleData" / "hippocampus_001_image.nii.gz")],
                           package, device="cpu")
    names = [o.objectName() for o in panel.findChildren(QtWidgets.QWidget) if o.objectName()]
    widget = _widget_methods("_populateMaps", "onMapChanged")()
    widget.ui = SimpleNamespace(**{name: _PythonQtView(panel.findChild(QtWidgets.QWidget, name)) for name in names})
    panel.findChild(QtWidgets.QWidget, "opacitySlider").setProperty("value", 0.5)  # a ctkSliderWidget's value
    widget.logic = SimpleNamespace(sceneLogic=logic)
    widget._parameterNode = SimpleNamespace(mapName="")
    widget._attnsegSegmentation = lambda: result.segmentationNode
    widget._populateMaps()

    combo = panel.findChild(QtWidgets.QComboBox, "mapComboBox")
    label = {name: panel.findChild(QtWidgets.QLabel, name) for name in
             ("legendFirstLabel", "legendLastLabel", "mapUnitLabel", "mapMeaningLabel", "mapInformationLabel")}
    assert [combo.itemText(i) for i in range(combo.count())] == list(result.mapNodes)
    shown = {}
    for index in range(combo.count()):
        combo.setCurrentIndex(index)
        widget.onMapChanged()
        name = combo.currentText()
        shown[name] = {key: value.text() for key, value in label.items()}
        assert widget._parameterNode.mapName == name
        spec = package.card.map_spec(name)
        unit = spec.unit if spec is not None and name != "uncertainty" else None
        assert shown[name]["mapUnitLabel"] == (f"Unit: {unit}" if unit else "")
        assert shown[name]["mapInformationLabel"] == information_note(package.card, name)
        first, last = logic.mapLegend(result.mapNodes[name]).first, logic.mapLegend(result.mapNodes[name]).last
        assert (shown[name]["legendFirstLabel"], shown[name]["legendLastLabel"]) == (f"{first:.3g}", f"{last:.3g}")
    for name in package.card.maps:  # every map the card describes: its display range, unit and figures
        figures = package.card.map_information(name)
        assert (float(shown[name]["legendFirstLabel"]), float(shown[name]["legendLastLabel"])) == pytest.approx(
            package.card.map_spec(name).display_range, rel=1e-2)
        assert package.card.map_meaning(name) in shown[name]["mapMeaningLabel"]
        assert f"{figures['enrichment']:.2f}x its average" in shown[name]["mapInformationLabel"]


@pytest.mark.parametrize("release", RELEASES)
def test_the_refine_section_has_a_class_choice_checkable_place_buttons_and_undo_the_code_connects(panel, release):
    """Refine with clicks: the class, Add points and Remove points (checkable: they show whether the views
    place points into that class's list), Undo click and a status line; AttnSeg.py connects each."""
    classes = _xml_classes()
    expected = {"refineClassComboBox": "QComboBox", "addPointButton": "QPushButton",
                "removePointButton": "QPushButton", "undoClickButton": "QPushButton", "refineStatusLabel": "QLabel"}
    for name, cls in expected.items():
        loaded = panel.findChild(QtWidgets.QWidget, name)
        assert classes.get(name) == cls and loaded is not None, name
        parent = loaded.parent()
        assert parent.objectName() == "refineCollapsibleButton", name
    assert panel.findChild(QtWidgets.QPushButton, "addPointButton").isCheckable()
    assert panel.findChild(QtWidgets.QPushButton, "removePointButton").isCheckable()
    assert not panel.findChild(QtWidgets.QPushButton, "undoClickButton").isCheckable()
    connected = {(name, signal) for _, name, _, signal in widget_uses() if signal is not None}
    assert {("refineClassComboBox", "currentIndexChanged(int)"), ("addPointButton", "toggled(bool)"),
            ("removePointButton", "toggled(bool)"), ("undoClickButton", "clicked(bool)")} <= connected
    for name in ("addPointButton", "removePointButton"):
        assert has_signal(classes[name], "toggled(bool)", release) and has_member(classes[name], "checked", release)

"""Extract the API AttnSeg may call from a 3D Slicer source checkout (and the CTK it pins) into JSON.

What is extracted:

* VTK-style C++ classes (``vtkMRML*``, ``vtkSegment*``, ``vtkSlicer*``, ``vtkOrientedImageData``...) from
  the headers of the folders in ``CPP_FOLDERS``: base classes, public methods (declared ones and those
  the ``vtkGet/Set/Boolean...Macro`` family generates) and public enum values, which is what Slicer's
  Python wrapping exposes;
* Qt widget classes (``qMRML*`` from Slicer, ``ctk*`` from CTK): base classes, signals, public slots,
  ``Q_INVOKABLE`` methods and ``Q_PROPERTY`` names (what PythonQt exposes), for checking the ``.ui``
  file and what the widget code does with each widget;
* the Python modules of ``Base/Python/slicer`` the module imports from, Slicer's SampleData module and
  the PyTorch extension's PyTorchUtils: top-level functions and class methods with their parameter names.

Usage (one JSON per release listed in ``Testing/slicer_releases.py``: 5.6.2, 5.8.1, 5.10.0, 5.12.3, each
with the CTK commit its tag pins and SlicerPyTorch e1c85cc0a62e92fa6c38223cd88c611906adb60e)::

    git -C <Slicer.git> archive v5.6.2 CMakeLists.txt Libs Modules Base | tar -x -C /tmp/slicer-5.6.2
    git -C <CTK.git> archive <CTK commit from SuperBuild/External_CTK.cmake> Libs | tar -x -C /tmp/ctk
    git -C <SlicerPyTorch.git> archive <commit> PyTorchUtils | tar -x -C /tmp/pytorch
    python extract_slicer_api.py /tmp/slicer-5.6.2 --ctk /tmp/ctk --version 5.6.2 --ctk-commit <commit> \\
        --pytorch /tmp/pytorch --pytorch-commit <commit> --output slicer-5.6.2.json

Between releases Markups' MRML moved from ``Modules/Loadable/Markups/MRML`` (5.6) to ``Libs/MRML/Core``
(5.10); both folders are read, so either layout gives the same classes.
"""
from __future__ import annotations

import argparse
import ast
import json
import re
from pathlib import Path

CPP_FOLDERS = (
    "Libs/MRML/Core", "Libs/MRML/Logic", "Libs/vtkSegmentationCore", "Base/Logic",
    "Modules/Loadable/Segmentations/MRML", "Modules/Loadable/Segmentations/Logic",
    "Modules/Loadable/Terminologies/Logic", "Modules/Loadable/Colors/Logic", "Modules/Loadable/Volumes/Logic",
    "Modules/Loadable/Markups/MRML",
)
QT_FOLDERS = ("Libs/MRML/Widgets", "Base/QTGUI", "Modules/Loadable/Markups/Widgets",
              "Modules/Loadable/Segmentations/Widgets")
CTK_FOLDERS = ("Libs/Widgets", "Libs/Core")
PYTHON_MODULES = ("util.py", "i18n.py", "ScriptedLoadableModule.py", "parameterNodeWrapper")

_CLASS = re.compile(r"^class\s+(?:\w+_EXPORT\s+)?(\w+)\s*(?:final\s*)?:\s*public\s+(\w+)(?:\s*,\s*public\s+(\w+))?",
                    re.M)
_ACCESS = re.compile(r"^\s*(public|protected|private)\s*(?:slots|Q_SLOTS)?\s*:", re.M)
_METHOD = re.compile(r"(?<![\w:~])([A-Z]\w*)\s*\(")
_MACROS = {  # macro -> the methods it declares, from its first argument
    "vtkGetMacro": ("Get{}",), "vtkSetMacro": ("Set{}",), "vtkBooleanMacro": ("{}On", "{}Off"),
    "vtkGetStringMacro": ("Get{}",), "vtkSetStringMacro": ("Set{}",), "vtkGetObjectMacro": ("Get{}",),
    "vtkSetObjectMacro": ("Set{}",), "vtkSetClampMacro": ("Set{}", "Get{}MinValue", "Get{}MaxValue"),
    "vtkGetVector2Macro": ("Get{}",), "vtkSetVector2Macro": ("Set{}",), "vtkGetVector3Macro": ("Get{}",),
    "vtkSetVector3Macro": ("Set{}",), "vtkGetVector4Macro": ("Get{}",), "vtkSetVector4Macro": ("Set{}",),
    "vtkGetVector6Macro": ("Get{}",), "vtkSetVector6Macro": ("Set{}",), "vtkGetVectorMacro": ("Get{}",),
    "vtkSetVectorMacro": ("Set{}",), "vtkGetEnumMacro": ("Get{}",), "vtkSetEnumMacro": ("Set{}",),
    "vtkGetSmartPointerMacro": ("Get{}",), "vtkSetSmartPointerMacro": ("Set{}",),
}
_TYPE_MACRO_METHODS = ("IsA", "IsTypeOf", "SafeDownCast", "NewInstance", "GetClassName")
_NOT_METHODS = {"VTK_SIZEHINT", "VTK_NEWINSTANCE", "VTK_EXPECTS", "Q_OBJECT", "Q_PROPERTY", "QVTK_OBJECT"}


def _body(text: str, start: int) -> str:
    """The text of the class body opened after ``start`` (up to its matching brace)."""
    opening = text.index("{", start)
    depth = 0
    for index in range(opening, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[opening + 1:index]
    return text[opening + 1:]


def _strip(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def _sections(body: str, default: str):
    """(access, text) pieces of a class body; nested braces (inline bodies) are kept with their section."""
    position, access = 0, default
    for match in _ACCESS.finditer(body):
        yield access, body[position:match.start()]
        access, position = match.group(1), match.end()
    yield access, body[position:]


def _flat(text: str) -> str:
    """``text`` without what is inside braces (inline function bodies end as ``;``), enum bodies kept."""
    out, keep = [], []  # keep: per open brace, whether its content is kept
    tokens = re.split(r"([{}])", text)
    for i, token in enumerate(tokens):
        outer = all(keep)
        if token == "{":
            is_enum = outer and re.search(r"\benum\b[^;{}]*$", tokens[i - 1] if i else "") is not None
            keep.append(is_enum)
            if is_enum:
                out.append("{")
        elif token == "}":
            kept = keep.pop() if keep else False
            if all(keep):
                out.append("}" if kept else ";")
        elif outer:
            out.append(token)
    return "".join(out)


def cpp_classes(root: Path, folders) -> dict:
    classes = {}
    for folder in folders:
        for header in sorted((root / folder).rglob("*.h")):
            text = _strip(header.read_text(errors="replace"))
            for match in _CLASS.finditer(text):
                name, bases = match.group(1), [b for b in match.groups()[1:] if b]
                body = _body(text, match.end())
                methods, constants, signals, slots, properties = set(), set(), set(), set(), set()
                for access, piece in _sections(body, "private"):
                    for prop in re.findall(r"Q_PROPERTY\(\s*[\w:<>*]+\s+(\w+)", piece):
                        properties.add(prop)
                    if access == "private":
                        continue
                    flat = _flat(piece)
                    for macro, made in _MACROS.items():
                        for argument in re.findall(rf"\b{macro}\s*\(\s*(\w+)", flat):
                            methods.update(m.format(argument) for m in made)
                    if re.search(r"\bvtk\w*TypeMacro\s*\(", flat):
                        methods.update(_TYPE_MACRO_METHODS)
                    if access == "public":
                        for enum in re.findall(r"\benum\b[^{;]*\{([^}]*)\}", flat):
                            constants.update(re.findall(r"^\s*(\w+)", item)[0] for item in enum.split(",")
                                             if re.findall(r"^\s*(\w+)", item))
                        methods.update(m for m in _METHOD.findall(re.sub(r"\benum\b[^{;]*\{[^}]*\}", " ", flat))
                                       if m not in _NOT_METHODS and not m.endswith("Macro"))
                signal_text = re.findall(r"(?:\bsignals|\bQ_SIGNALS)\s*:(.*?)(?=\b(?:public|protected|private)\b"
                                         r"(?:\s+(?:slots|Q_SLOTS))?\s*:|$)", body, re.S)
                for piece in signal_text:
                    signals.update(_signatures(piece))
                slot_text = re.findall(r"public\s+(?:slots|Q_SLOTS)\s*:(.*?)(?=\b(?:public|protected|private|signals|"
                                       r"Q_SIGNALS)\b(?:\s+(?:slots|Q_SLOTS))?\s*:|$)", _strip(body), re.S)
                for piece in slot_text:
                    slots.update(_signatures(piece))
                entry = {"bases": bases, "methods": sorted(methods)}
                if constants:
                    entry["constants"] = sorted(constants)
                if name.startswith(("q", "ctk")):
                    invokables = set(re.findall(r"Q_INVOKABLE\s+[^;(]*?\b(\w+)\s*\(", body))
                    entry = {"bases": bases, "signals": sorted(signals), "slots": sorted(slots),
                             "invokables": sorted(invokables), "properties": sorted(properties)}
                classes[name] = entry
    return classes


def _signatures(text: str) -> set[str]:
    """Normalised Qt signatures ``name(type1,type2)`` of the declarations in ``text``."""
    out = set()
    for name, params in re.findall(r"\b(\w+)\s*\(([^()]*)\)\s*(?:const\s*)?;", _flat(text)):
        types = []
        for param in (p.strip() for p in params.split(",") if p.strip()):
            param = param.split("=")[0].strip()
            param = re.sub(r"\bconst\s+", "", param).replace("&", "").strip()
            pieces = re.match(r"(.*?[\w>*])\s*\b(\w+)$", param)
            typ = pieces.group(1) if pieces and not param.endswith("*") and " " in param else param
            types.append(re.sub(r"\s+", "", typ))
        out.add(f"{name}({','.join(types)})")
    return out


def _parameters(function: ast.FunctionDef) -> list[str]:
    a = function.args
    return [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs] + (["**"] if a.kwarg else [])


def _python_module(files) -> dict:
    """Top-level functions (parameter names) and classes (method -> parameter names) of some files."""
    functions, classes = {}, {}
    for file in files:
        for node in ast.parse(file.read_text()).body:
            if isinstance(node, ast.FunctionDef):
                functions[node.name] = _parameters(node)
            elif isinstance(node, ast.ClassDef):
                classes[node.name] = {n.name: _parameters(n) for n in node.body if isinstance(n, ast.FunctionDef)}
    return {"functions": functions, "classes": classes}


def python_api(root: Path, pytorch: Path) -> dict:
    """The ``slicer`` Python modules used, Slicer's SampleData module and the PyTorch extension's
    PyTorchUtils (the extension AttnSeg declares as its dependency)."""
    api = {}
    base = root / "Base" / "Python" / "slicer"
    for name in PYTHON_MODULES:
        path = base / name
        api["slicer." + name.removesuffix(".py")] = _python_module(sorted(path.rglob("*.py")) if path.is_dir()
                                                                   else [path])
    api["SampleData"] = _python_module([root / "Modules" / "Scripted" / "SampleData" / "SampleData.py"])
    api["PyTorchUtils"] = _python_module([pytorch / "PyTorchUtils" / "PyTorchUtils.py"])
    return api


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("slicer", type=Path, help="Slicer source checkout (at least Libs, Modules, Base)")
    parser.add_argument("--ctk", type=Path, required=True, help="CTK source checkout (Libs)")
    parser.add_argument("--version", required=True, help="the Slicer version of the checkout, e.g. 5.6.2")
    parser.add_argument("--ctk-commit", required=True, help="the CTK commit Slicer's SuperBuild pins")
    parser.add_argument("--pytorch", type=Path, required=True, help="SlicerPyTorch extension checkout")
    parser.add_argument("--pytorch-commit", required=True, help="its commit")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    cmake = (args.slicer / "CMakeLists.txt")
    python = re.search(r'set\(Slicer_REQUIRED_PYTHON_VERSION "([\d.]+)"\)', cmake.read_text()).group(1) \
        if cmake.is_file() else None
    api = {"slicer_version": args.version, "python_version": python, "ctk_commit": args.ctk_commit,
           "pytorch_extension_commit": args.pytorch_commit,
           "vtk_classes": cpp_classes(args.slicer, CPP_FOLDERS),
           "qt_classes": {**cpp_classes(args.ctk, CTK_FOLDERS), **cpp_classes(args.slicer, QT_FOLDERS)},
           "python": python_api(args.slicer, args.pytorch)}
    api["qt_classes"] = {k: v for k, v in api["qt_classes"].items() if k.startswith(("q", "ctk"))}
    args.output.write_text(json.dumps(api, indent=0, sort_keys=True) + "\n")
    print(f"{args.output}: {len(api['vtk_classes'])} VTK classes, {len(api['qt_classes'])} Qt classes, "
          f"{sum(len(m['functions']) for m in api['python'].values())} Python functions")


if __name__ == "__main__":
    main()

"""The ``attnseg`` command: segment, evaluate, refine, info, serve.

Errors a user can fix are printed as one line (``attnseg: error: ...``) with exit status 2, never a
traceback. Outputs are written to a hidden temporary folder beside the target and moved into place
only when the whole case succeeded, so a crash or Ctrl-C never leaves half-written results, and
existing results are never overwritten without ``--overwrite``.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import io
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import localise
from .errors import AttnSegError
from .image import ImageError, case_name, dicom_series, list_images, read_image, write_image
from .package import PackageError, available_packages, default_package_name, load_package
from .swap import replace_folder

# Moved into place in this order: report.json last, so its presence marks a complete result.
OUTPUT_FILES = ("labels.nii.gz", "probabilities.nii.gz", "maps", "preview.png", "volumes.csv", "segmentation.dcm",
                "report.json")
MIN_FREE_BYTES = 64 * 2**20  # below this a disk is full for our purposes; refuse before any work
_MODALITY_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<index>\d{4})$")


class UsageError(AttnSegError):
    """A problem with the command line or the file system the user can fix."""


# -- segment ------------------------------------------------------------------------------------
def _group_cases(inputs: list[Path], modalities: int) -> dict[str, list[Path]]:
    """Case name -> one path per modality.

    Several files: one case, one file per modality in order. A folder: every image is a case for a
    single-modality model; for M modalities files are grouped by the nnU-Net suffix
    ``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``...
    """
    if len(inputs) == 1 and inputs[0].is_dir() and not _is_dicom(inputs[0]):
        files = list_images(inputs[0])
        if not files:
            raise UsageError(f"{inputs[0]}: no images (.nii.gz, .nii, .nrrd, .mha) and no DICOM series in this "
                             "folder; give an image file, a DICOM series folder or a folder of cases")
        if modalities == 1:
            return _batch_cases([(case_name(f), 0, f) for f in files], 1)
        keyed = []
        for f in files:
            match = _MODALITY_SUFFIX.match(case_name(f))
            if not match:
                raise UsageError(f"{f.name}: for a {modalities}-modality model, name the files "
                                 "<case>_0000.nii.gz ... <case>_%04d.nii.gz" % (modalities - 1))
            keyed.append((match["case"], int(match["index"]), f))
        return _batch_cases(keyed, modalities)
    return {case_name(inputs[0]): inputs}


def _batch_cases(files: list[tuple[str, int, Path]], modalities: int) -> dict[str, list[Path]]:
    """(case name, modality index, file) -> case name -> one file per modality, refusing what would
    not give each case its own folder inside ``--output``: two files for the same case and modality
    (``a.nii.gz`` and ``a.nrrd``; names differing only in letter case collide on Windows and macOS
    disks), and names that are not a plain folder name (``..``)."""
    groups: dict[str, dict[int, Path]] = {}
    seen: dict[tuple[str, int], Path] = {}
    for case, index, f in files:
        if case in ("", ".", ".."):
            raise UsageError(f"{f.name}: the case name {case!r} is not a usable folder name inside --output; "
                             "rename the file")
        other = seen.setdefault((case.casefold(), index), f)
        if other != f:
            raise UsageError(f"{other.name} and {f.name} would both be written to case {case!r}; "
                             "rename or move one of them")
        groups.setdefault(case, {})[index] = f
    cases = {}
    for case, by_index in sorted(groups.items()):
        if sorted(by_index) != list(range(modalities)):
            raise UsageError(f"case {case}: found modality files {sorted(by_index)}, "
                             f"the model needs 0..{modalities - 1}")
        cases[case] = [by_index[i] for i in range(modalities)]
    return cases


def _is_dicom(path: Path) -> bool:
    return bool(dicom_series(path))


def _check_output_dir(out: Path, overwrite: bool) -> None:
    existing = [name for name in OUTPUT_FILES if os.path.lexists(out / name)]
    if existing and not overwrite:
        raise UsageError(f"{out} already holds results ({', '.join(existing)}); "
                         "choose another --output or pass --overwrite")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".attnseg-write-test"):
            pass
    except OSError as err:
        raise UsageError(f"cannot write to {out} ({err.strerror}); choose a writable --output") from None
    free = shutil.disk_usage(out).free
    if free < MIN_FREE_BYTES:
        raise UsageError(f"the disk holding {out} is full ({free / 2**20:.1f} MiB free); free some space "
                         "or choose another --output")


@contextlib.contextmanager
def _interrupts_deferred():
    """Hold Ctrl-C and SIGTERM while a case's results move into place, then act on them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            raise KeyboardInterrupt


def _volumes_csv(case: str, volumetry: dict) -> str:
    """A localised whole head's volumetry as one header line and one row (so the files of a batch
    concatenate): ml per side and part, the totals, the left/right asymmetry index (%)."""
    from .maps import volume_name  # imports torch; the CLI's other commands start without it

    columns = {"case": case}
    for side in ("Left", "Right"):
        for part, ml in volumetry.get(side, {}).items():
            columns[f"{side.lower()}_{volume_name(part)}_ml"] = ml
    for part, index in volumetry.get("asymmetry_index_percent", {}).items():
        columns[f"asymmetry_index_{volume_name(part)}_percent"] = "" if index is None else index
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerow(columns.values())
    return buffer.getvalue()


def _volumes_line(result, volumetry: dict | None) -> str:
    from .outputs import class_volumes_ml, volumes_text

    if volumetry is None:
        return volumes_text(class_volumes_ml(result.labels, result.classes))
    sides = [f"{side} {parts['total']:.2f} ml (" + ", ".join(f"{part.lower()} {ml:.2f}" for part, ml in parts.items()
                                                         if part != "total") + ")"
             for side, parts in volumetry.items() if side in ("Left", "Right")]
    index = volumetry.get("asymmetry_index_percent", {}).get("total")
    return ", ".join(sides) + (f", asymmetry index {index:+.1f} %" if index is not None else "")


def _write_case(result, package, out: Path, overwrite: bool, timings: dict, inputs: list[Path],
                preview_image=None, report_extra: dict | None = None, dicom_series_folder: Path | None = None) -> None:
    """Write everything into a hidden staging folder (:func:`_staging_folder`), then swap it in as one
    result set (:func:`_swap_result_set`).

    ``preview_image``: the first modality, to draw ``preview.png`` over (``--preview``);
    ``report_extra``: more top-level entries for report.json (``refine`` adds its clicks);
    ``dicom_series_folder``: the source series of a DICOM Segmentation ``segmentation.dcm`` (``--dicom-seg``).
    """
    from . import outputs

    volumetry = localise.volumetry(result.labels, result.classes)
    staging = _staging_folder(out)
    try:
        t0 = time.perf_counter()
        write_image(result.labels, staging / "labels.nii.gz")
        write_image(result.probabilities, staging / "probabilities.nii.gz")
        for name, image in result.maps.items():
            write_image(image, staging / "maps" / f"{name}.nii.gz")
        if preview_image is not None:
            from .preview import render_preview, render_whole_head_preview

            title = f"{package.name}: {inputs[0].name}"
            if volumetry is not None:
                render_whole_head_preview(preview_image, result, staging / "preview.png", title=title)
            else:
                render_preview(preview_image, result, staging / "preview.png", title=title,
                               class_colors=[tuple(c.get("color", (255, 255, 0))) for c in result.classes],
                               class_names=[c["name"] for c in result.classes], card=package.card)
        if volumetry is not None:
            (staging / "volumes.csv").write_text(_volumes_csv(case_name(inputs[0]), volumetry))
        if dicom_series_folder is not None:
            from .dicom_seg import write_dicom_seg

            write_dicom_seg(result, package, dicom_series_folder, staging / "segmentation.dcm")
        timings["write"] = time.perf_counter() - t0
        report = outputs.report(result, package, inputs, timings, volumetry, report_extra)
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        with _interrupts_deferred():
            _swap_result_set(staging, out, overwrite)
    except OSError as err:
        raise UsageError(f"could not write the results into {out} ({err.strerror or err}); it was left as it "
                         "was — free some disk space or choose another --output") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _holds_only_results(folder: Path) -> bool:
    """True when ``folder`` holds nothing but names of :data:`OUTPUT_FILES` (or nothing)."""
    return all(name in OUTPUT_FILES for name in os.listdir(folder))


def _holds_working_folder(folder: Path) -> bool:
    """True when the working folder is ``folder`` or inside it (or cannot be told)."""
    try:
        return Path.cwd().resolve().is_relative_to(folder)
    except OSError:
        return True


def _staging_folder(out: Path) -> Path:
    """A new hidden folder for a case's results: beside ``out`` (in its parent, on its file system) when
    ``out`` holds nothing but a result set, so that the new set replaces the folder whole; else (the
    user's own files in ``out``, its parent not writable, or ``out`` the working folder, which the user's
    shell would be left in after the old one is deleted) inside ``out``."""
    real = out.resolve()
    if _holds_only_results(real) and real.parent != real and not _holds_working_folder(real):
        with contextlib.suppress(OSError):
            staging = Path(tempfile.mkdtemp(prefix=f".attnseg-{real.name}-", dir=real.parent))
            if os.stat(staging).st_dev == os.stat(real).st_dev:
                return staging
            staging.rmdir()
    return Path(tempfile.mkdtemp(prefix=".attnseg-", dir=out))


def _swap_result_set(staging: Path, out: Path, overwrite: bool) -> None:
    """Replace the whole result set in ``out`` (every name of :data:`OUTPUT_FILES`) by the one in
    ``staging``, or leave ``out`` as it was.

    Staged beside ``out`` (which held nothing but results): the two folders swap in one step
    (:func:`.swap.replace_folder`), so a process killed at any moment leaves ``out`` holding one run's
    results, whole; ``staging`` then names the previous set. Otherwise (the user's own files in
    ``out``) the previous results (a file, a folder or a symbolic link: renamed, never followed) first
    move aside into ``staging``, then the new ones move in, report.json last; any failure moves
    everything back, so ``out`` never holds a mix of two runs (a stale preview.png beside new labels).
    Every move is a rename within one file system.
    """
    real = out.resolve()
    if staging.parent != real:
        appeared = [name for name in OUTPUT_FILES if os.path.lexists(real / name)]
        if appeared and not overwrite:
            raise UsageError(f"{out / appeared[0]} appeared during the run; nothing was overwritten")
        if _holds_only_results(real):
            os.chmod(staging, os.stat(real).st_mode & 0o7777)
            replace_folder(staging, real)
            return
    previous = staging / ".previous"
    previous.mkdir()
    moved_aside, moved_in = [], []
    try:
        for name in OUTPUT_FILES:
            if os.path.lexists(out / name):
                if not overwrite:  # appeared while we worked
                    raise UsageError(f"{out / name} appeared during the run; nothing was overwritten")
                os.replace(out / name, previous / name)
                moved_aside.append(name)
        for name in OUTPUT_FILES:
            if os.path.lexists(staging / name):
                os.replace(staging / name, out / name)
                moved_in.append(name)
    except BaseException:
        for name in reversed(moved_in):
            with contextlib.suppress(OSError):
                os.replace(out / name, staging / name)
        for name in reversed(moved_aside):
            with contextlib.suppress(OSError):
                os.replace(previous / name, out / name)
        raise


def _progress_bar(case: str):
    from tqdm import tqdm

    bar = tqdm(total=100, desc=case, unit="%", disable=not sys.stderr.isatty(), leave=False,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")

    def update(fraction: float, eta, stage: str) -> None:
        bar.n = round(fraction * 100)
        bar.set_postfix_str(f"{stage}, ETA {eta:.0f} s" if eta is not None else stage)

    return bar, update


def _parse_roi(text: str):
    """``CX,CY,CZ,SX,SY,SZ`` (mm, LPS) -> :class:`~AttnSegLib.localise.Box`."""
    try:
        values = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        values = []
    if len(values) != 6:
        raise UsageError(f"--roi {text!r}: give six numbers CX,CY,CZ,SX,SY,SZ: the centre and the size in mm, in "
                         "the image's LPS coordinates (Slicer shows RAS: negate x and y)")
    try:
        return localise.Box.from_centre_size(values[:3], values[3:])
    except ImageError as err:
        raise UsageError(f"--roi {text!r}: {err}") from None


def cmd_segment(args) -> int:
    from .inference import Cancelled, Predictor
    from .outputs import voxels_sha256

    if args.size_factor is not None and not args.roi:
        raise UsageError("--size-factor needs --roi: it says how to sample that box; a whole head without --roi is "
                         "size-normalised by its own registration")
    package = load_package(args.model or default_package_name())
    inputs = [Path(p) for p in args.input]
    for p in inputs:
        if not p.exists():
            raise UsageError(f"{p}: no such file or folder")
    if args.dicom_seg and not _is_dicom(inputs[0]):
        raise UsageError(f"--dicom-seg needs a DICOM series folder as the (first) --input, not {inputs[0]}; give the "
                         "series folder or leave out --dicom-seg")
    if args.dicom_seg and importlib.util.find_spec("highdicom") is None:
        raise UsageError("--dicom-seg needs the highdicom package: pip install 'attnseg[dicom]'")
    cases = _group_cases(inputs, len(package.modalities))
    batch = len(inputs) == 1 and inputs[0].is_dir() and not _is_dicom(inputs[0])
    output = Path(args.output)
    targets = {case: (output / case if batch else output) for case in cases}
    for target in targets.values():
        _check_output_dir(target, args.overwrite)
    predictor = Predictor(package, device=args.device, tta=args.tta, with_maps=not args.no_maps,
                          overlap=args.overlap, batch_size=args.batch_size, localise=not args.whole_volume)
    roi = _parse_roi(args.roi) if args.roi else None
    cancel = threading.Event()
    failures = 0
    for case, paths in cases.items():
        t0 = time.perf_counter()
        try:
            images = [read_image(p) for p in paths]
            timings = {"read": time.perf_counter() - t0}
            bar, update = _progress_bar(case)
            try:
                result = predictor.predict(images, progress=update, cancel=cancel, roi=roi,
                                           size_factor=args.size_factor)
            finally:
                bar.close()
            timings.update(result.timings)
            _write_case(result, package, targets[case], args.overwrite, timings, paths,
                        images[0] if args.preview else None, {"input_voxels_sha256": voxels_sha256(images)},
                        paths[0] if args.dicom_seg else None)
        except ImageError as err:
            if not batch:
                raise
            failures += 1
            print(f"attnseg: error: {case}: {err}", file=sys.stderr)
            with contextlib.suppress(OSError):
                targets[case].rmdir()  # removed only when empty: nothing of this case was written
            continue
        except KeyboardInterrupt:
            cancel.set()
            raise Cancelled() from None
        volumes = _volumes_line(result, localise.volumetry(result.labels, result.classes))
        for notice in result.notices:
            print(f"attnseg: notice: {case}: {notice}", file=sys.stderr)
        print(f"{case}: {targets[case]} ({volumes}; {sum(timings.values()):.1f} s on {predictor.device})")
    return 1 if failures else 0


# -- evaluate -----------------------------------------------------------------------------------
def _pairs(prediction: Path, reference: Path) -> dict[str, tuple[Path | None, Path]]:
    """Case -> (its prediction, or None when there is none, reference): every reference is a case."""
    if prediction.is_dir() != reference.is_dir():
        raise UsageError("give two files or two folders to --prediction and --reference")
    if not prediction.is_dir():
        return {case_name(reference): (prediction, reference)}
    refs = {case_name(p): p for p in list_images(reference)}
    if not refs:
        raise UsageError(f"{reference}: no reference label maps (.nii.gz, .nii, .nrrd, .mha) in this folder")
    named: dict[str, list[Path]] = {}
    for path in list_images(prediction):
        named.setdefault(case_name(path), []).append(path)
    pairs = {case: (_prediction_of(case, ref, prediction, named.get(case, [])), ref) for case, ref in refs.items()}
    if all(pred is None for pred, _ in pairs.values()):
        raise UsageError(f"no prediction in {prediction} matches a reference in {reference} "
                         "(the same case name in any image format, or <case>/labels.nii.gz)")
    return pairs


def _prediction_of(case: str, reference: Path, folder: Path, named: list[Path]) -> Path | None:
    """The prediction in ``folder`` for ``case``: the reference's own file name, else the one image of the case's
    name in another format (``case.nrrd`` for ``case.nii.gz``), else ``<case>/labels.nii.gz``; None when none."""
    if (folder / reference.name).exists():
        return folder / reference.name
    if len(named) > 1:
        raise UsageError(f"{', '.join(p.name for p in named)} in {folder} are all predictions for case {case}; "
                         "keep one of them")
    if named:
        return named[0]
    return folder / case / "labels.nii.gz" if (folder / case / "labels.nii.gz").exists() else None


def _label_values(image, path: Path, what: str):
    """(D, H, W) int64 class values of a label map; refuses values that are not whole numbers."""
    import numpy as np

    array = image.array
    if array.ndim != 3:
        raise UsageError(f"{path}: the {what} has {array.shape[0]} channels; give a label map (one class per voxel)")
    if array.dtype.kind == "f":
        fractional = ~np.isfinite(array) | (array != np.round(array))
        if fractional.any():
            example = float(array[fractional].flat[0])
            raise UsageError(f"{path}: the {what} holds values that are not whole class numbers (e.g. {example:.9g}); "
                             "give a label map, with classes stored as integers")
    return array.astype(np.int64)


def _refuse_unknown_classes(array, path: Path, known: set[int], from_model: bool) -> None:
    import numpy as np

    unknown = sorted(int(v) for v in np.unique(array) if int(v) not in known)
    if unknown:
        more = f" ({len(unknown)} in all)" if len(unknown) > 5 else ""
        raise UsageError(f"{path}: holds class values {', '.join(map(str, unknown[:5]))}{more} that "
                         + ("the model does not have; check --model" if from_model else
                            "no reference holds; is it a label map? pass --model to name the classes"))


def cmd_evaluate(args) -> int:
    import numpy as np

    from .metrics import evaluate_labels, image_diagonal_mm, mean_over_classes

    pairs = _pairs(Path(args.prediction), Path(args.reference))
    if args.model:
        classes = {value: name for value, name in enumerate(load_package(args.model).card.class_names) if value}
    else:  # every class some reference holds, named by its value (read once more below: one case in memory)
        values = set()
        for _, ref_path in pairs.values():
            values.update(np.unique(_label_values(read_image(ref_path), ref_path, "reference")).tolist())
        classes = {v: str(v) for v in sorted(values - {0})}
    known = set(classes) | {0}
    per_case, notices = {}, []
    for case, (pred_path, ref_path) in pairs.items():
        ref = read_image(ref_path)
        ref = ref.with_array(_label_values(ref, ref_path, "reference"))
        _refuse_unknown_classes(ref.array, ref_path, known, bool(args.model))
        diagonal = image_diagonal_mm(ref.geometry)
        if pred_path is None:
            pred = np.zeros_like(ref.array)
            notices.append(f"{case}: no prediction; scored as an empty one (Dice 0, distances {diagonal:.1f} mm, "
                           "the image diagonal)")
        else:
            image = read_image(pred_path)
            if not image.geometry.same_grid(ref.geometry, tolerance=1e-3):
                raise UsageError(f"{case}: prediction and reference are on different grids ({image.geometry.size} "
                                 f"vs {ref.geometry.size}); segment on the reference's image")
            pred = _label_values(image, pred_path, "prediction")
            _refuse_unknown_classes(pred, pred_path, known, bool(args.model))
        per_case[case] = evaluate_labels(pred, ref, labels=classes, empty_distance_mm=diagonal)
        empty = [name for name, m in per_case[case].items() if m["prediction_ml"] == 0 < m["reference_ml"]]
        if pred_path is not None and empty:
            notices.append(f"{case}: nothing predicted for {', '.join(empty)}; scored as Dice 0, distances "
                           f"{diagonal:.1f} mm (the image diagonal)")
    names = list(classes.values())
    mean = {name: {key: _mean([per_case[c][name][key] for c in per_case]) for key in ("dice", "asd_mm", "hd95_mm")}
            for name in names}
    missing = [case for case, (pred_path, _) in pairs.items() if pred_path is None]
    summary = {"cases": per_case, "mean": mean, "mean_foreground_dice": mean_over_classes(mean, "dice"),
               "n_cases": len(per_case), "missing_predictions": missing, "notices": notices}
    for notice in notices:
        print(f"attnseg: notice: {notice}", file=sys.stderr)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    width = max([12, *(len(n) + 2 for n in names)])
    print(f"{'case':<28}{'class':<{width}}{'Dice':>8}{'ASD mm':>10}{'HD95 mm':>10}")
    for case, metrics in list(per_case.items()) + [("mean", mean)]:
        for name, m in metrics.items():
            print(f"{case:<28}{name:<{width}}{_fmt(m['dice']):>8}{_fmt(m['asd_mm']):>10}{_fmt(m['hd95_mm']):>10}")
    return 0


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None  # unrounded: the table rounds once, to 3 decimals


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


# -- info ---------------------------------------------------------------------------------------
def _package_description(package) -> list[str]:
    """What one package is, as lines: where it is, what it reads and writes, how it was made and scored."""
    card = package.card
    metrics, training = card.metrics, card.training
    spacing = list(card.spacing_xyz_mm) if card.spacing_xyz_mm else None
    lines = [f"{package.name}  ({package.path})", f"  {card.description}",
             f"  weights sha256 {package.sha256}",
             f"  architecture {card.architecture} {json.dumps(card.network_kwargs, sort_keys=True)}; "
             f"patch {list(card.patch_size_dhw)} voxels at {spacing} mm, {card.orientation}",
             f"  modalities: {', '.join(card.modality_names)}; classes: {', '.join(card.class_names[1:])}; "
             f"maps: {', '.join(sorted(card.maps)) or '-'}"]
    if card.validation_dice is not None:
        lines.append(f"  {card.validation_split} mean Dice {card.validation_dice:.4f} on "
                     f"{card.validation_cases} cases")
    if "reference" in metrics:
        ref = metrics["reference"]
        lines.append(f"  reference mean Dice {ref['mean_dice']:.4f} on {ref['cases']} cases (parent "
                     f"{ref['parent']}: {ref['parent_mean_dice']:.4f})")
    if training.get("dataset"):
        lines.append(f"  trained on {training['dataset']}")
    lineage = training.get("lineage")
    if lineage:
        lines.append(f"  fine-tuned from {lineage['parent']['name']} (sha256 {lineage['parent']['sha256']}) on "
                     f"{len(lineage['corrections'])} corrected cases")
    return lines


def cmd_info(args) -> int:
    import torch

    from .inference import versions

    if args.model:  # one package, by name or path
        package = load_package(args.model)
        print(json.dumps({**package.summary(), "card": package.card.to_dict()}, indent=2) if args.json
              else "\n".join(_package_description(package)))
        return 0
    packages, problems = [], []
    for path in available_packages():
        try:
            packages.append(load_package(path).summary())
        except PackageError as err:
            problems.append(str(err))
    try:
        default = default_package_name()
    except PackageError:
        default = None
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + (
        ["mps"] if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else [])
    info = {"default_model": default, "models": packages, "unusable_packages": problems,
            "devices": devices, "versions": versions()}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"AttnSeg {info['versions']['attnseg']} (torch {info['versions']['torch']}); devices: {', '.join(devices)}")
    for p in packages:
        star = "*" if p["name"] == default else " "
        dice = p["validation_dice"]
        print(f"{star} {p['name']:<28} {p['architecture']:<17} modalities: {', '.join(p['modalities'])}; "
              f"classes: {', '.join(p['classes'][1:])}; maps: {', '.join(p['maps']) or '-'}"
              + (f"; validation Dice {dice:.3f}" if dice is not None else ""))
    for problem in problems:
        print(f"! {problem}")
    return 0


# -- refine -------------------------------------------------------------------------------------
def _read_result(folder: Path, geometry, class_names: list[str]):
    """(labels Image, probabilities Image, maps name -> Image) of a result folder written by ``segment`` or
    ``refine`` (and perhaps edited by hand since), checked against the image grid and the result's classes."""
    import numpy as np
    import SimpleITK as sitk

    from .image import Image, label_dtype

    try:
        probabilities = Image.from_sitk(sitk.ReadImage(str(folder / "probabilities.nii.gz")))
    except (RuntimeError, ImageError) as err:
        raise UsageError(f"{folder / 'probabilities.nii.gz'}: cannot be read ({str(err).splitlines()[0][:120]}); "
                         "segment the image again") from None
    if probabilities.array.ndim != 4 or probabilities.array.shape[0] != len(class_names):
        raise UsageError(f"{folder}: probabilities.nii.gz holds {probabilities.array.shape[:-3] or 'no'} channels, "
                         f"the result has {len(class_names)} classes; segment the image again")
    if not probabilities.geometry.same_grid(geometry, tolerance=1e-3):
        raise UsageError(f"{folder} does not match the image: the result's grid is {probabilities.geometry.size} "
                         f"voxels at {_fmt_xyz(probabilities.geometry.origin)}, the image's {geometry.size} at "
                         f"{_fmt_xyz(geometry.origin)}; give the --input the result was segmented from")
    labels = read_image(folder / "labels.nii.gz")
    if not labels.geometry.same_grid(probabilities.geometry, tolerance=1e-3):
        raise UsageError(f"{folder / 'labels.nii.gz'}: its grid ({labels.geometry.size} voxels at "
                         f"{_fmt_xyz(labels.geometry.origin)}) is not the result's ({probabilities.geometry.size} at "
                         f"{_fmt_xyz(probabilities.geometry.origin)}); segment the image again")
    values = _label_values(labels, folder / "labels.nii.gz", "result's label map")
    unknown = sorted(int(v) for v in np.unique(values) if not 0 <= v < len(class_names))
    if unknown:
        raise UsageError(f"{folder / 'labels.nii.gz'}: holds label values {', '.join(map(str, unknown[:5]))} that are "
                         f"none of the result's classes (0-{len(class_names) - 1}: {', '.join(class_names)}); give "
                         "each voxel one of them, or segment the image again")
    maps = {}
    for path in sorted((folder / "maps").glob("*.nii.gz")):
        image = read_image(path)
        if not image.geometry.same_grid(probabilities.geometry, tolerance=1e-3):
            raise UsageError(f"{path}: its grid ({image.geometry.size} voxels) is not the result's "
                             f"({probabilities.geometry.size}); remove the map or segment the image again")
        maps[path.name[: -len(".nii.gz")]] = image
    return probabilities.with_array(values.astype(label_dtype(len(class_names)))), probabilities, maps


def _read_report(path: Path) -> dict:
    """A result's report.json, refused in one line when it is not one ``segment`` or ``refine`` wrote: not
    JSON, without the package that made the result (its name and path), or with classes or earlier clicks
    not in the form they are written in."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise UsageError(f"{path}: not valid JSON ({str(err)[:80]}); restore the report AttnSeg wrote, or segment "
                         "the image again") from None
    package = report.get("package") if isinstance(report, dict) else None
    if not (isinstance(package, dict) and all(isinstance(package.get(key), str) for key in ("name", "path"))):
        raise UsageError(f"{path}: does not name the model package of the result (\"package\": name and path); "
                         "restore the report AttnSeg wrote, or segment the image again")
    classes = report.get("classes") or []
    refinement = report.get("refinement", {})
    clicks = refinement.get("clicks", []) if isinstance(refinement, dict) else None
    if not (isinstance(classes, list) and all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in classes)
            and isinstance(clicks, list) and all(_is_click_record(c) for c in clicks)):
        raise UsageError(f"{path}: its classes or earlier clicks are not as AttnSeg writes them (\"classes\": "
                         "[{\"name\": ...}], \"refinement\": {\"clicks\": [{\"position_lps\": [x, y, z], \"class\": "
                         "...}]}); restore the report AttnSeg wrote, or segment the image again")
    return report


def _is_click_record(click) -> bool:
    """Whether a report.json click is {"position_lps": three finite numbers, "class": a name}."""
    if not isinstance(click, dict):
        return False
    position = click.get("position_lps")
    return (isinstance(click.get("class"), str) and isinstance(position, list) and len(position) == 3
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in position))


def _attach_click_values(argv: list[str]) -> list[str]:
    """``--click -10,...`` -> ``--click=-10,...``: LPS coordinates are often negative, and argparse would
    read such a value as an option."""
    out = []
    for arg in argv:
        if out and out[-1] in ("--click", "-c") and re.match(r"^-[\d.]", arg):
            out[-1] = f"{out[-1]}={arg}" if out[-1] == "--click" else f"-c{arg}"
        else:
            out.append(arg)
    return out


def _fmt_xyz(values) -> str:
    return "(" + ", ".join(f"{v:.1f}" for v in values) + ") mm"


def cmd_refine(args) -> int:
    import numpy as np

    from .inference import Result, resolve_device
    from .outputs import voxels_sha256
    from .refine import (Click, Refiner, check_localised_clicks, class_index, click_voxel, find_refinement_package,
                         parse_click)

    folder = Path(args.result)
    if not all((folder / name).is_file() for name in ("report.json", "probabilities.nii.gz", "labels.nii.gz")):
        raise UsageError(f"{folder}: not a complete AttnSeg result (needs report.json, labels.nii.gz and "
                         "probabilities.nii.gz); "
                         "give the --output folder of `attnseg segment`")
    report = _read_report(folder / "report.json")
    package = load_package(report["package"]["path"] if Path(report["package"]["path"]).exists()
                           else report["package"]["name"])
    # the result's classes: a localised whole head has each side's copy of the card's ("Left anterior hippocampus")
    classes = report.get("classes") or package.card.class_dicts
    class_names = [c["name"] for c in classes]
    inputs = [Path(p) for p in args.input]
    images = [read_image(p) for p in inputs]
    if len(images) != len(package.modalities):
        raise UsageError(f"the result's model {package.name} reads {len(package.modalities)} modalit"
                         f"{'y' if len(package.modalities) == 1 else 'ies'}, {len(images)} --input given")
    geometry = images[0].geometry
    labels, probabilities, maps = _read_result(folder, geometry, class_names)
    fingerprint = voxels_sha256(images)
    if report.get("input_voxels_sha256", fingerprint) != fingerprint:
        raise UsageError(f"{folder} was segmented from another image: the --input's voxels differ from those the "
                         "result recorded (report.json's input_voxels_sha256), though the grids match; give the "
                         "--input the result was segmented from")
    history = [Click(tuple(c["position_lps"]), class_index(c["class"], class_names))
               for c in report.get("refinement", {}).get("clicks", [])]
    clicks = [parse_click(text, class_names) for text in args.click]
    for click in clicks:
        click_voxel(click, geometry)  # outside the image: refused before any work
    check_localised_clicks(clicks, classes, report.get("provenance", {}), package.card.class_names)
    output = Path(args.output)
    _check_output_dir(output, args.overwrite)
    method, refinement_package, notices = args.method, None, []
    if method in ("auto", "learned"):
        refinement_package = find_refinement_package(package.card)
        if refinement_package is None and method == "learned":
            raise UsageError(f"no refinement network is installed for {package.name}; use --method random_walker")
        if refinement_package is None:
            method = "random_walker"
            notices.append(f"no refinement network for {package.name}: the random walker refined the clicks")
        else:
            method = "learned"
    refiner = Refiner(method, refinement_package, device=str(resolve_device(args.device)))
    current = Result(labels=labels, probabilities=probabilities, maps=maps,
                     review_map_name=report.get("review_map", report.get("difficulty_map", "uncertainty")), timings={},
                     provenance=report.get("provenance", {}), notices=notices, classes=classes)
    before = labels.array.copy()  # refined in place
    result, refined = refiner.refine_result(images, current, clicks, history, in_place=True)
    relabelled = int(np.count_nonzero(result.labels.array[refined.changed] != before[refined.changed]))
    all_clicks = history + clicks
    extra = {"input_voxels_sha256": fingerprint, "refinement": {
        "method": method,
        "package": refinement_package.name if refinement_package else None,
        "from_result": str(folder),
        "clicks": [{"position_lps": list(c.position_lps), "class": class_names[c.label]} for c in all_clicks],
        "new_clicks": len(clicks),
        "changed_voxels": relabelled,
        "model_maps": "unchanged by the clicks; the uncertainty map is recomputed where the probabilities moved",
    }}
    _write_case(result, package, output, args.overwrite, {"refine": refined.seconds}, inputs,
                images[0] if args.preview else None, report_extra=extra)
    for notice in notices:
        print(f"attnseg: notice: {notice}", file=sys.stderr)
    print(f"{output}: {len(clicks)} click(s) refined with {method} in {refined.seconds:.2f} s; "
          f"{relabelled} voxels changed label")
    return 0


def cmd_serve(args) -> int:
    from .web.app import serve

    serve(host=args.host, port=args.port, data_dir=args.data, allowed_origins=tuple(args.allow_origin),
          token=args.token, corrections_dir=args.corrections)
    return 0


# -- entry point --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnseg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment a volume (one --input per modality) or a folder of cases")
    seg.add_argument("--input", "-i", action="append", required=True,
                     help="image file or DICOM folder (repeat once per modality), or a folder of cases")
    seg.add_argument("--output", "-o", required=True, help="output folder")
    seg.add_argument("--model", "-m", help="package name (see `attnseg info`) or path; default: the shipped default")
    seg.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default auto)")
    seg.add_argument("--tta", action="store_true", help="average over the 8 axis flips (8x slower)")
    seg.add_argument("--no-maps", action="store_true", help="skip the model's own maps (uncertainty is kept)")
    seg.add_argument("--overlap", type=float, help="window overlap in [0, 1) (default: the model card's)")
    seg.add_argument("--batch-size", type=int, help="windows per forward pass (default: the model card's)")
    seg.add_argument("--overwrite", action="store_true", help="replace existing results in --output")
    seg.add_argument("--preview", action="store_true",
                     help="also write preview.png: a slice with the segmentation and every map, or for a whole head "
                          "slices through each side (needs matplotlib)")
    seg.add_argument("--roi", metavar="CX,CY,CZ,SX,SY,SZ",
                     help="segment only inside this box: centre and size in mm, in the image's LPS physical "
                          "coordinates as ITK reads the file (Slicer shows RAS: negate x and y); default: the whole "
                          "input, or for an input much larger than the model's training field of view, boxes found "
                          "by registering the MNI152 template when the model card says how. The box is cut at the "
                          "scan's own size: unlike those boxes it is not size-normalised to the head (no "
                          "registration runs), unless --size-factor is given")
    seg.add_argument("--size-factor", type=float, metavar="F",
                     help="with --roi: the head's size factor, as a localised run of the same scan wrote it "
                          "(report.json, provenance.localisation.size_factor); the box is then sampled "
                          "size-normalised, as the localised boxes are, and reaches the model divided by F: make it "
                          "at least the model's training field of view times F")
    seg.add_argument("--dicom-seg", action="store_true",
                     help="also write segmentation.dcm, a DICOM Segmentation referencing the input DICOM series")
    seg.add_argument("--whole-volume", action="store_true",
                     help="segment the whole input as given even when it is much larger than the model's training "
                          "field of view (a speed baseline: the answer is not meaningful there)")
    seg.set_defaults(func=cmd_segment)

    ev = sub.add_parser("evaluate", help="Dice, ASD and HD95 per class of predictions against references")
    ev.add_argument("--prediction", "-p", required=True, help="label map, or folder of them")
    ev.add_argument("--reference", "-r", required=True, help="reference label map, or folder of them")
    ev.add_argument("--model", "-m", help="package whose classes name and bound the label values (default: the "
                    "values the references hold, as numbers)")
    ev.add_argument("--json", action="store_true", help="machine-readable output")
    ev.set_defaults(func=cmd_evaluate)

    info = sub.add_parser("info", help="installed model packages, devices and versions; or one package (--model)")
    info.add_argument("--model", "-m", help="describe this package (name or path of a folder or .zip)")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)

    ref = sub.add_parser("refine", help="correct a result with clicks (a class name: add; background: remove)")
    ref.add_argument("--input", "-i", action="append", required=True,
                     help="the image the result was segmented from (repeat once per modality)")
    ref.add_argument("--result", "-r", required=True, help="result folder of `attnseg segment` (or of refine)")
    ref.add_argument("--click", "-c", action="append", required=True, metavar="X,Y,Z,CLASS",
                     help="mm in the image's LPS space and a class name or background; repeat for more (a scribble)")
    ref.add_argument("--output", "-o", required=True, help="output folder for the corrected result")
    ref.add_argument("--method", default="auto", choices=("auto", "learned", "random_walker", "sphere"),
                     help="auto: the refinement network when one is installed for the model, else random_walker")
    ref.add_argument("--device", default="cpu", help="auto | cpu | cuda | mps (default cpu: a click is a small crop)")
    ref.add_argument("--overwrite", action="store_true", help="replace existing results in --output")
    ref.add_argument("--preview", action="store_true", help="also write preview.png")
    ref.set_defaults(func=cmd_refine)

    serve = sub.add_parser("serve", help="the AttnSeg web app (trame-slicer) on this machine")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default loopback only; any other needs an access token)")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--data", help="folder of volumes to offer (default: the shipped sample)")
    serve.add_argument("--corrections", metavar="FOLDER",
                       help="folder where 'Save as training case' writes corrected cases (layout 'corrected' of "
                            "training/); without it the page downloads each case as a zip")
    serve.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                       help="a web origin besides the server's own that may use it, e.g. the https://NAME of a "
                            "reverse proxy (repeatable; its host name is then accepted in Host too)")
    serve.add_argument("--token", help="access token the browser must present (?token=...); default: none on "
                                       "loopback, a random one printed with the URL elsewhere; also "
                                       "$ATTNSEG_WEB_TOKEN")
    serve.set_defaults(func=cmd_serve)
    return parser


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    import SimpleITK as sitk

    from .inference import Cancelled

    args = build_parser().parse_args(_attach_click_values(sys.argv[1:] if argv is None else list(argv)))
    for stream in (sys.stdout, sys.stderr):  # a path or message a terminal cannot encode must not crash us
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's multi-line console warnings; errors still raise
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        previous_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)  # a batch system's stop = Ctrl-C
    try:
        return args.func(args)
    except AttnSegError as err:
        print(f"attnseg: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`attnseg info --json | head`): end quietly
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 141  # 128 + SIGPIPE, as a shell reports a command a closed pipe stopped
    except MemoryError as err:
        text = str(err) if "out of memory" in str(err) else (
            f"out of memory ({err or 'allocation failed'}); close other programs or crop the volume")
        print(f"attnseg: error: {text}", file=sys.stderr)
        return 2
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        print(f"attnseg: error: {where}{err.strerror or err}; check the path, its permissions and the free "
              "disk space", file=sys.stderr)
        return 2
    except (Cancelled, KeyboardInterrupt):
        print("attnseg: cancelled; no partial results were written", file=sys.stderr)
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_sigterm)


if __name__ == "__main__":
    sys.exit(main())

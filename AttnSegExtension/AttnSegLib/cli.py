"""The ``attnseg`` command: segment, evaluate, info, serve.

Errors a user can fix are printed as one line (``attnseg: error: ...``) with exit status 2, never a
traceback. Outputs are written to a hidden temporary folder beside the target and moved into place
only when the whole case succeeded, so a crash or Ctrl-C never leaves half-written results, and
existing results are never overwritten without ``--overwrite``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from .image import ImageError, case_name, dicom_series, list_images, read_image, write_image
from .package import PackageError, available_packages, default_package_name, load_package

# Moved into place in this order: report.json last, so its presence marks a complete result.
OUTPUT_FILES = ("labels.nii.gz", "probabilities.nii.gz", "maps", "preview.png", "report.json")
MIN_FREE_BYTES = 64 * 2**20  # below this a disk is full for our purposes; refuse before any work
_MODALITY_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<index>\d{4})$")


class UsageError(Exception):
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
            return {case_name(f): [f] for f in files}
        groups: dict[str, dict[int, Path]] = {}
        for f in files:
            match = _MODALITY_SUFFIX.match(case_name(f))
            if not match:
                raise UsageError(f"{f.name}: for a {modalities}-modality model, name the files "
                                 "<case>_0000.nii.gz ... <case>_%04d.nii.gz" % (modalities - 1))
            groups.setdefault(match["case"], {})[int(match["index"])] = f
        cases = {}
        for case, by_index in sorted(groups.items()):
            if sorted(by_index) != list(range(modalities)):
                raise UsageError(f"case {case}: found modality files {sorted(by_index)}, "
                                 f"the model needs 0..{modalities - 1}")
            cases[case] = [by_index[i] for i in range(modalities)]
        return cases
    return {case_name(inputs[0]): inputs}


def _is_dicom(path: Path) -> bool:
    return bool(dicom_series(path))


def _check_output_dir(out: Path, overwrite: bool) -> None:
    existing = [name for name in OUTPUT_FILES if (out / name).exists()]
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


def _write_case(result, package, out: Path, overwrite: bool, timings: dict, inputs: list[Path],
                preview_image=None) -> None:
    """Write everything into a hidden staging folder, then move each output into ``out``.

    ``preview_image``: the first modality, to draw ``preview.png`` over (``--preview``).
    """
    staging = Path(tempfile.mkdtemp(prefix=".attnseg-", dir=out))
    try:
        t0 = time.perf_counter()
        write_image(result.labels, staging / "labels.nii.gz")
        write_image(result.probabilities, staging / "probabilities.nii.gz")
        for name, image in result.maps.items():
            write_image(image, staging / "maps" / f"{name}.nii.gz")
        if preview_image is not None:
            from .preview import render_preview

            render_preview(preview_image, result, staging / "preview.png", title=f"{package.name}: {inputs[0].name}",
                           class_colors=[tuple(c.get("color", (255, 255, 0))) for c in package.classes],
                           class_names=[c["name"] for c in package.classes])
        timings["write"] = time.perf_counter() - t0
        class_names = [c["name"] for c in package.classes]
        report = {
            "inputs": [str(p) for p in inputs],
            "timings_s": {k: round(v, 4) for k, v in timings.items()},
            "total_s": round(sum(timings.values()), 4),
            "provenance": result.provenance,
            "package": {"name": package.name, "sha256": package.sha256, "path": str(package.path)},
            "class_volumes_ml": result.class_volumes_ml(class_names),
            "maps": {name: package.maps.get(name.split(".")[0], {}).get("meaning", "")
                     if name != "uncertainty" else "normalised entropy of the class probabilities (0 certain, 1 maximal doubt)"
                     for name in result.maps},
            "difficulty_map": result.difficulty_name,
            "notices": result.notices,
        }
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        with _interrupts_deferred():
            for name in OUTPUT_FILES:
                if not (staging / name).exists():
                    continue
                target = out / name
                if target.exists():
                    if not overwrite:  # appeared while we worked
                        raise UsageError(f"{target} appeared during the run; nothing was overwritten")
                    shutil.rmtree(target) if target.is_dir() else target.unlink()
                os.replace(staging / name, target)
    except OSError as err:
        raise UsageError(f"could not write the results into {out} ({err.strerror or err}); nothing was left "
                         "there — free some disk space or choose another --output") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _progress_bar(case: str):
    from tqdm import tqdm

    bar = tqdm(total=100, desc=case, unit="%", disable=not sys.stderr.isatty(), leave=False,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")

    def update(fraction: float, eta, stage: str) -> None:
        bar.n = round(fraction * 100)
        bar.set_postfix_str(f"{stage}, ETA {eta:.0f} s" if eta is not None else stage)

    return bar, update


def cmd_segment(args) -> int:
    from .inference import Cancelled, Predictor

    package = load_package(args.model or default_package_name())
    inputs = [Path(p) for p in args.input]
    for p in inputs:
        if not p.exists():
            raise UsageError(f"{p}: no such file or folder")
    cases = _group_cases(inputs, len(package.modalities))
    batch = len(inputs) == 1 and inputs[0].is_dir() and not _is_dicom(inputs[0])
    output = Path(args.output)
    targets = {case: (output / case if batch else output) for case in cases}
    for target in targets.values():
        _check_output_dir(target, args.overwrite)
    predictor = Predictor(package, device=args.device, tta=args.tta, with_maps=not args.no_maps,
                          overlap=args.overlap, batch_size=args.batch_size)
    cancel = threading.Event()
    failures = 0
    for case, paths in cases.items():
        t0 = time.perf_counter()
        try:
            images = [read_image(p) for p in paths]
            timings = {"read": time.perf_counter() - t0}
            bar, update = _progress_bar(case)
            try:
                result = predictor.predict(images, progress=update, cancel=cancel)
            finally:
                bar.close()
            timings.update(result.timings)
            _write_case(result, package, targets[case], args.overwrite, timings, paths,
                        images[0] if args.preview else None)
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
        volumes = ", ".join(f"{k} {v:.2f} ml" for k, v in result.class_volumes_ml(
            [c["name"] for c in package.classes]).items())
        for notice in result.notices:
            print(f"attnseg: notice: {case}: {notice}", file=sys.stderr)
        print(f"{case}: {targets[case]} ({volumes}; {sum(timings.values()):.1f} s on {predictor.device})")
    return 1 if failures else 0


# -- evaluate -----------------------------------------------------------------------------------
def _pairs(prediction: Path, reference: Path) -> dict[str, tuple[Path, Path]]:
    if prediction.is_dir() != reference.is_dir():
        raise UsageError("give two files or two folders to --prediction and --reference")
    if not prediction.is_dir():
        return {case_name(reference): (prediction, reference)}
    refs = {case_name(p): p for p in list_images(reference)}
    pairs = {}
    for case, ref in refs.items():
        for candidate in (prediction / ref.name, prediction / case / "labels.nii.gz"):
            if candidate.exists():
                pairs[case] = (candidate, ref)
                break
    if not pairs:
        raise UsageError(f"no prediction in {prediction} matches a reference in {reference} "
                         "(same file name, or <case>/labels.nii.gz)")
    return pairs


def cmd_evaluate(args) -> int:
    import numpy as np

    from .metrics import evaluate_labels, mean_over_classes

    pairs = _pairs(Path(args.prediction), Path(args.reference))
    per_case = {}
    for case, (pred_path, ref_path) in pairs.items():
        pred, ref = read_image(pred_path), read_image(ref_path)
        if not pred.geometry.same_grid(ref.geometry, tolerance=1e-3):
            raise UsageError(f"{case}: prediction and reference are on different grids "
                             f"({pred.geometry.size} vs {ref.geometry.size}); segment on the reference's image")
        per_case[case] = evaluate_labels(pred.array.astype(np.int64), ref.array.astype(np.int64), ref.geometry.spacing)
    classes = sorted({name for metrics in per_case.values() for name in metrics})
    mean = {name: {key: _mean([per_case[c][name].get(key) for c in per_case if name in per_case[c]])
                   for key in ("dice", "asd_mm", "hd95_mm")} for name in classes}
    summary = {"cases": per_case, "mean": mean,
               "mean_foreground_dice": mean_over_classes(mean, "dice"), "n_cases": len(per_case)}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{'case':<28}{'class':<12}{'Dice':>8}{'ASD mm':>10}{'HD95 mm':>10}")
    for case, metrics in list(per_case.items()) + [("mean", mean)]:
        for name, m in metrics.items():
            print(f"{case:<28}{name:<12}{_fmt(m['dice']):>8}{_fmt(m['asd_mm']):>10}{_fmt(m['hd95_mm']):>10}")
    return 0


def _mean(values):
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 4) if values else None


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


# -- info ---------------------------------------------------------------------------------------
def cmd_info(args) -> int:
    import torch

    from .inference import versions

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
        dice = p["metrics"].get("validation", {}).get("mean_foreground_dice")
        print(f"{star} {p['name']:<28} {p['architecture']:<17} modalities: {', '.join(p['modalities'])}; "
              f"classes: {', '.join(p['classes'][1:])}; maps: {', '.join(p['maps']) or '-'}"
              + (f"; validation Dice {dice:.3f}" if dice is not None else ""))
    for problem in problems:
        print(f"! {problem}")
    return 0


def cmd_serve(args) -> int:
    from .web.app import serve

    serve(host=args.host, port=args.port, data_dir=args.data, allowed_origins=tuple(args.allow_origin),
          token=args.token)
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
                     help="also write preview.png: a slice with the segmentation and every map (needs matplotlib)")
    seg.set_defaults(func=cmd_segment)

    ev = sub.add_parser("evaluate", help="Dice, ASD and HD95 per class of predictions against references")
    ev.add_argument("--prediction", "-p", required=True, help="label map, or folder of them")
    ev.add_argument("--reference", "-r", required=True, help="reference label map, or folder of them")
    ev.add_argument("--json", action="store_true", help="machine-readable output")
    ev.set_defaults(func=cmd_evaluate)

    info = sub.add_parser("info", help="installed model packages, devices and versions")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)

    serve = sub.add_parser("serve", help="the AttnSeg web app (trame-slicer) on this machine")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default loopback only; any other needs an access token)")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--data", help="folder of volumes to offer (default: the shipped sample)")
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

    args = build_parser().parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # a path or message a terminal cannot encode must not crash us
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's multi-line console warnings; errors still raise
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        previous_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)  # a batch system's stop = Ctrl-C
    try:
        return args.func(args)
    except (UsageError, ImageError, PackageError, ValueError) as err:
        print(f"attnseg: error: {err}", file=sys.stderr)
        return 2
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

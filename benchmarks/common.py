"""What the benchmarks share: the real data, the model packages to measure, thread settings, runs in
fresh processes (peak memory), and fits.

Models: every shipped package taking one image (``AttnSegLib.package.available_packages()``; a
package for more modalities, such as a BraTS model, cannot read the single-image volumes and is left
out, with a note), and for each
architecture with a ``training/configs/hippocampus_<architecture>.yaml`` but no shipped package yet,
an *untrained stand-in*: the network that config builds, with the card ``training`` would write,
saved with ``save_package``. A stand-in costs what the trained package will cost (same layers, same
window, same maps) but its outputs mean nothing; every result names which models were stand-ins.
"""
from __future__ import annotations

import json
import os
import platform
import re
import resource
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
README = REPO / "benchmarks" / "README.md"
CONFIG_DIR = REPO / "training" / "configs"
DEFAULT_CONFIG = "hippocampus_difficulty_aware"  # the default model when Resources/Models names none
MNI_T1 = Path("mni152") / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
BRATS_CASE = Path("brats_sample") / "brats_2013_pat0003_1"


def data_root() -> Path:
    """``$ATTNSEG_DATA`` or ``../shared/data`` beside the repository; a clear error when absent."""
    root = Path(os.environ.get("ATTNSEG_DATA", REPO.parent / "shared" / "data"))
    if not (root / "hippocampus").is_dir():
        raise SystemExit(f"benchmark data not found at {root}: put the shared data folder beside the repository "
                         "(../shared/data) or set ATTNSEG_DATA to it")
    return root


def set_threads(threads: int) -> None:
    """One intra-op thread count for torch here and in every child process (both sides of a ratio)."""
    import torch

    torch.set_num_threads(threads)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        os.environ[name] = str(threads)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MB (``ru_maxrss``: KB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def reset_peak_rss() -> bool:
    """Restart this process's peak-resident count (Linux: ``/proc/self/clear_refs``); False where
    that is not possible, and :func:`peak_since_reset_mb` then reports the peak since the start."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_mb(field: str) -> float:
    """A memory line of ``/proc/self/status`` (kB) in MB; the peak so far where /proc is missing."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return peak_rss_mb()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1)) / 1024


def peak_since_reset_mb() -> float:
    """Peak resident memory since :func:`reset_peak_rss` (``VmHWM``), MB; else since the start."""
    return _status_mb("VmHWM")


def resident_mb() -> float:
    """Resident memory now (``VmRSS``), MB; the peak so far where /proc is missing."""
    return _status_mb("VmRSS")


def run_fresh(script: Path, args: list[str]) -> dict:
    """Run ``python script args`` in a new process and return the JSON object on its last stdout line."""
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=os.environ)
    if done.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def median(values) -> float:
    return float(np.median(np.asarray(list(values), dtype=float)))


def power_law_exponent(x, y) -> float:
    """b of the least-squares fit y = a * x**b in log-log space."""
    return float(np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)[0])


def machine(threads: int) -> dict:
    """What the numbers were measured on (absolute times are only comparable on the same)."""
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2),
            "torch": torch.__version__, "torch_threads": threads,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def write_report(path: Path, report: dict, table: str | None = None) -> Path:
    """``report`` as JSON at ``path`` and ``table`` (Markdown) beside it (``.md``). A table written to
    ``benchmarks/results`` also replaces the README's copy of it, the lines between
    ``<!-- results/<name>.md -->`` and ``<!-- end -->``, so the README quotes the latest run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    if table is None:
        return path
    markdown = path.with_suffix(".md")
    markdown.write_text(table)
    if markdown.parent.resolve() == RESULTS_DIR.resolve() and README.is_file():
        begin, end = f"<!-- results/{markdown.name} -->", "<!-- end -->"
        text = README.read_text()
        start = text.find(begin)
        stop = text.find(end, start)
        if start >= 0 and stop >= 0:
            README.write_text(text[: start + len(begin)] + "\n" + table + text[stop:])
    return path


# -- models -----------------------------------------------------------------------------------------
@dataclass
class BenchmarkModel:
    """A package to measure. ``trained``: False for an untrained stand-in (see the module docstring)."""

    name: str
    architecture: str
    path: Path
    trained: bool
    default: bool

    def describe(self) -> dict:
        return {**asdict(self), "path": str(self.path)}


def _card_without_weights(card: dict) -> dict:
    return {k: v for k, v in card.items() if k not in ("weights_sha256", "schema_version")}


def untrained_package(card: dict, out_dir: Path, seed: int = 0):
    """An untrained network built from ``card`` (its architecture, kwargs, modality and class counts),
    saved as a package in ``out_dir``; the card says it is untrained."""
    import torch

    from AttnSegLib.package import build_from_card, save_package

    torch.manual_seed(seed)
    network = build_from_card(card)
    card = {**_card_without_weights(card), "metrics": {},
            "description": f"UNTRAINED benchmark stand-in: {card['architecture']['name']} with random weights"}
    return save_package(out_dir, card, network.state_dict())


def stand_in_card(config_name: str) -> dict:
    """The card ``training`` writes for ``training/configs/<config_name>.yaml``."""
    import torch

    from AttnSegLib import models
    from training.card import model_card
    from training.config import load_config

    config = load_config(CONFIG_DIR / f"{config_name}.yaml")
    data = config["data"]
    with torch.device("meta"):  # the card needs the network's map descriptions, not its weights
        network = models.build(config["model"]["architecture"], len(data["modalities"]), len(data["classes"]),
                               **config["model"]["kwargs"])
    return model_card(config, network)


def _default_name() -> str:
    from AttnSegLib.package import PackageError, default_package_name

    try:
        return default_package_name()
    except PackageError:
        return DEFAULT_CONFIG


def benchmark_models(workdir: Path, only: str | None = None) -> list[BenchmarkModel]:
    """Shipped single-modality packages, plus stand-ins for the hippocampus-config architectures not
    shipped; the default model first. ``only``: a package name or an architecture name."""
    from AttnSegLib.package import PackageError, available_packages, load_package

    default = _default_name()
    chosen: dict[str, BenchmarkModel] = {}
    for path in available_packages():
        try:
            card = load_package(path).card
        except PackageError as err:
            print(f"benchmark: skipping unusable package {path}: {err}", file=sys.stderr)
            continue
        if len(card["modalities"]) != 1:
            print(f"benchmark: leaving out {card['name']}: it takes {len(card['modalities'])} modalities, "
                  "the volumes measured here have one (two-modality volumes run variants of each architecture)",
                  file=sys.stderr)
            continue
        arch = card["architecture"]["name"]
        if arch not in chosen or card["name"] == default:
            chosen[arch] = BenchmarkModel(card["name"], arch, Path(path), True, card["name"] == default)
    for config in sorted(CONFIG_DIR.glob("hippocampus_*.yaml")):
        card = stand_in_card(config.stem)
        arch = card["architecture"]["name"]
        if arch in chosen:
            continue
        package = untrained_package(card, workdir / "stand_ins" / card["name"])
        chosen[arch] = BenchmarkModel(card["name"], arch, package.path, False, card["name"] == default)
    found = sorted(chosen.values(), key=lambda m: (not m.default, m.name))
    if only is not None:
        found = [m for m in found if only in (m.name, m.architecture)]
        if not found:
            raise SystemExit(f"no model {only!r} to benchmark; known: "
                             f"{', '.join(m.name for m in chosen.values())}")
    return found


def with_modalities(model: BenchmarkModel, modalities: list[dict], workdir: Path) -> BenchmarkModel:
    """An untrained variant of ``model``'s architecture taking these modalities (same kwargs, window,
    classes and maps): the cost of that architecture on multi-modal input."""
    from AttnSegLib.package import load_package

    card = {**load_package(model.path).card, "modalities": modalities,
            "name": f"{model.name}_{len(modalities)}modal"}
    package = untrained_package(card, workdir / "variants" / card["name"])
    return BenchmarkModel(card["name"], model.architecture, package.path, False, model.default)


# -- volumes ----------------------------------------------------------------------------------------
def validation_case_names(package, count: int | None = None) -> list[str]:
    """The first ``count`` (None: all) validation cases ``package``'s card lists; exits with the fix when
    it lists none (a package not exported by training/)."""
    names = ((package.card.get("training") or {}).get("validation_cases") or [])[:count]
    if not names:
        raise SystemExit(f"{package.name}: its card lists no validation cases; benchmark a package training/ exported")
    return names


def hippocampus_cases(count: int) -> list[Path]:
    """The first ``count`` images of MSD Task04 Hippocampus (sorted by name)."""
    images = sorted((data_root() / "hippocampus" / "imagesTr").glob("hippocampus_*.nii.gz"))
    return images[:count]


def mni_t1() -> Path:
    """The ICBM 2009a T1 template, 197x233x189 voxels of 1 mm (a whole head)."""
    return data_root() / MNI_T1


def centre_crop(source: Path, size_xyz, out: Path) -> Path:
    """The central ``size_xyz`` block of ``source`` (same spacing and direction), written to ``out``."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(source))
    start = [max(0, (n - s) // 2) for n, s in zip(image.GetSize(), size_xyz)]
    sitk.WriteImage(sitk.RegionOfInterest(image, [min(s, n) for s, n in zip(size_xyz, image.GetSize())], start),
                    str(out), True)
    return out


def resampled_brats(size_xyz, spacing_xyz, out_dir: Path, modalities=("Flair", "T1c")) -> list[Path]:
    """Two registered BraTS modalities (240x240x155, 1 mm, LPS) resampled (linear) onto a grid of
    ``size_xyz`` voxels of ``spacing_xyz`` mm centred on the scan: a real multi-modal case on the
    anisotropic grid of a 3D acquisition, which the model frame must reorient and resample."""
    import SimpleITK as sitk

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in modalities:
        source = sitk.ReadImage(str(next((data_root() / BRATS_CASE).glob(f"{name}_*.nii.gz"))), sitk.sitkFloat32)
        centre = source.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in source.GetSize()])
        direction = np.asarray(source.GetDirection()).reshape(3, 3)
        half = direction @ (np.asarray(spacing_xyz) * (np.asarray(size_xyz) - 1) / 2)
        origin = tuple(float(c) for c in np.asarray(centre) - half)
        moved = sitk.Resample(source, [int(s) for s in size_xyz], sitk.Transform(), sitk.sitkLinear, origin,
                              tuple(float(s) for s in spacing_xyz), source.GetDirection(), 0.0, sitk.sitkFloat32)
        path = out_dir / f"brats_{'x'.join(map(str, size_xyz))}_{len(paths):04d}.nii.gz"
        sitk.WriteImage(moved, str(path), True)
        paths.append(path)
    return paths

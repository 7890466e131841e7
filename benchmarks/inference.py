"""Click-to-result time and peak memory of AttnSeg against MONAI's bare sliding window, same network.

    python benchmarks/inference.py                  # every architecture, three volumes (tens of minutes)
    python benchmarks/inference.py --quick --json   # default model, hippocampus + a small brain (< 1 min idle)
    python benchmarks/inference.py --model hippocampus_rsanet --device cuda

For each model (shipped packages; untrained stand-ins for architectures not shipped yet, see
``common.py``) and each volume:

* **AttnSeg**: ``attnseg segment --whole-volume`` (the sliding window over the whole input, as the
  baseline does, not the localisation a hippocampus model's card asks for on a whole brain; that is
  ``benchmarks/whole_head.py``), run as a user runs it (``AttnSegLib.cli.main``): read,
  preprocess (reorient, resample, normalise), sliding-window prediction with probabilities and maps,
  back to the input grid (argmax, entropy, maps), write every output. Its stages come from the
  ``report.json`` the command writes; ``total`` is their sum (package loading is reported apart).
  Run with maps and with ``--no-maps`` (the uncertainty map is kept) for the cost of the maps alone.
  Where the map head runs once on the blended result (difficulty_aware), ``maps_cost_fraction`` is
  timed inside the runs with maps (the head and the writing of its files, per case, over the case's
  total): the difference between two processes carries their segmenter's 10 % spread from one process
  to the next, more than the maps cost. ``maps_cost_fraction_between_runs`` is that difference, given
  for every model (the only measure for a network whose maps come out of its windows).
* **MONAI** (the named baseline): the same network's segmenter alone (``network.segment``: no
  map-only head, so the maps' cost shows against it), read from the same package, run through
  ``monai.inferers.sliding_window_inference`` alone on the case already in the model frame, with the
  predictor's window, overlap, window batch, Gaussian blending and precision, returning logits only.
  A lone window runs its convolutions through oneDNN (its up-sampling and 1x1x1 convolutions as matrix
  products) on both sides (``inference.lone_window``: PyTorch's CPU convolution is 2.5x slower on one
  small 3D window), so the ratio shows AttnSeg's own costs.

Every run is a fresh process (its ``ru_maxrss`` is the peak resident memory of that configuration,
Python and its libraries included; ``python_imports`` is that floor). Runs are interleaved (MONAI,
AttnSeg, AttnSeg without maps, then again) so load on a shared machine hits both sides alike;
ratios use medians over ``--repeats`` (``--repeats-others`` for the models other than the default):
``ratio_vs_monai`` is the ratio of the two sides' medians. ``spread`` gives the min / median / max
over the repeats of each side's per-case time, and of the ratio and the maps' share within each
interleaved repeat (whose median need not equal the figure from the medians), so a noisy machine
shows; the table and the progress lines print them as (median; min to max).
Both sides run with the same torch (and ITK) thread count.
``--clock cpu`` times every stage by the process's CPU time instead of the wall clock: on a machine
other jobs share, their load stretches wall time by whatever share of the cores they take (runs
minutes apart then differ by 2x), but not the CPU time of single-threaded work, which on an idle
machine equals its wall time up to waits on the disk.

Volumes: ``hippocampus`` (MSD Task04 cases, ~35x50x35, one window each; per-case medians),
``whole_brain`` (the MNI152 T1, 197x233x189, 1 mm; ``--quick``: its central 80x96x80 block) and
``two_modality`` (BraTS FLAIR + T1c resampled to 144x192x256 voxels of 1x1x0.6 mm, LPS, which the
model frame reorients and resamples; run with an untrained two-modality variant of each architecture).

The last stdout line with ``--json`` is one JSON object; ``ratio_vs_monai``, ``stages_s``,
``peak_rss_mb`` and ``maps_cost_fraction`` at its top level are those of the default model on the
whole-brain volume. Results go to ``benchmarks/results/inference.{json,md}`` (not for ``--quick``
unless ``--output`` is given). ``--merge`` joins the reports of separate runs with the same settings
(one per model, say, run side by side) into one:

    python benchmarks/inference.py --clock cpu --model hippocampus_unet --output /tmp/unet.json   # and so on
    python benchmarks/inference.py --merge /tmp/unet.json /tmp/rsanet.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

STAGES = ("read", "preprocess", "predict", "postprocess", "write")
TWO_MODALITIES = [{"name": "FLAIR", "contrast": "FLAIR MRI", "normalization": "zscore_nonzero"},
                  {"name": "T1c", "contrast": "T1-weighted MRI with contrast", "normalization": "zscore_nonzero"}]
VOLUMES = ("hippocampus", "whole_brain", "two_modality")
TARGETS = {"ratio_vs_monai": 1.2, "maps_cost_fraction": 0.10, "peak_rss_mb": 4096.0}


# -- one measurement, in a fresh process ------------------------------------------------------------
def worker(spec: dict) -> dict:
    """Run one configuration (``spec["side"]``: attnseg | monai) and return its measurements."""
    common.set_threads(spec["threads"])
    from AttnSegLib.cli import main  # noqa: F401  (imported before the floor is read)
    from AttnSegLib.inference import Predictor  # noqa: F401

    floor = common.peak_rss_mb()
    measure = _attnseg_run if spec["side"] == "attnseg" else _monai_run
    out = measure(spec)
    return {**out, "side": spec["side"], "peak_rss_mb": round(common.peak_rss_mb(), 1),
            "python_imports_rss_mb": round(floor, 1)}


def _clock(spec: dict):
    """The stage timer: wall time, or this process's CPU time (``--clock cpu``)."""
    return time.process_time if spec["clock"] == "cpu" else time.perf_counter


def _attnseg_run(spec: dict) -> dict:
    from AttnSegLib.cli import main

    if spec["clock"] == "cpu":
        # The CLI and the Predictor time their stages with time.perf_counter; in this measuring
        # process (and only here) that clock reads CPU time, so report.json holds CPU seconds.
        time.perf_counter = time.process_time
    clock = _clock(spec)
    output = Path(spec["output"])
    argv = ["segment", *sum((["-i", p] for p in spec["inputs"]), []), "-o", str(output), "-m", spec["package"],
            "--device", spec["device"], "--overwrite", "--whole-volume"] + ([] if spec["maps"] else ["--no-maps"])
    with _maps_timer(clock) as maps_s:
        start = clock()
        if main(argv) != 0:
            raise RuntimeError(f"attnseg {' '.join(argv)} failed")
        elapsed = clock() - start
    reports = sorted(output.glob("*/report.json")) or [output / "report.json"]
    cases = [json.loads(r.read_text())["timings_s"] for r in reports]
    total = sum(sum(c.values()) for c in cases)
    in_run = spec["maps"] and len(maps_s) == len(cases)  # a network whose map head runs on the blended result
    return {"cases": cases, "load_s": round(elapsed - total, 3), "maps_s": maps_s if in_run else None}


@contextlib.contextmanager
def _maps_timer(clock):
    """Per case, the seconds spent on the model maps in this run: the map head on the blended result
    (``inference.maps_on_blended``, called once per case) and the writing of its map files (every file
    under ``maps/`` but the uncertainty, which ``--no-maps`` writes too). Yields the list, filled as the
    run goes; it stays empty for a network whose maps come out of its windows (they cannot be timed
    apart there, and only the difference between runs with and without maps measures them)."""
    from AttnSegLib import cli, inference

    maps_s: list[float] = []
    blended, write = inference.maps_on_blended, cli.write_image

    def timed_maps(*args, **kwargs):
        start = clock()
        try:
            return blended(*args, **kwargs)
        finally:
            maps_s.append(clock() - start)

    def timed_write(image, path, *args, **kwargs):
        start = clock()
        try:
            return write(image, path, *args, **kwargs)
        finally:
            if maps_s and Path(path).parent.name == "maps" and not Path(path).name.startswith("uncertainty."):
                maps_s[-1] += clock() - start

    inference.maps_on_blended, cli.write_image = timed_maps, timed_write
    try:
        yield maps_s
    finally:
        inference.maps_on_blended, cli.write_image = blended, write


def _monai_run(spec: dict) -> dict:
    import torch
    from monai.inferers import sliding_window_inference

    from AttnSegLib.image import read_image
    from AttnSegLib.inference import Predictor, count_windows, lone_window
    from AttnSegLib.package import load_package
    from AttnSegLib.preprocess import to_model_frame

    predictor = Predictor(load_package(spec["package"]), device=spec["device"])  # the same settings
    network, device, card = predictor.network, predictor.device, predictor.card
    autocast = predictor.half and device.type == "cuda"

    def logits(window: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.float16, enabled=autocast):
            return lone_window(network.segment, window)

    clock, cases, windows = _clock(spec), [], 0
    for paths in spec["cases"]:
        prepared = to_model_frame([read_image(p) for p in paths], card["modalities"], card.get("spacing_xyz_mm"),
                                  card.get("orientation"), card.get("crop_to_nonzero", False))
        x = torch.from_numpy(prepared.array)[None].to(device)
        windows += count_windows(x.shape[2:], predictor.patch_size, predictor.overlap)
        _synchronize(device)
        start = clock()
        with torch.inference_mode():
            sliding_window_inference(x, predictor.patch_size, predictor.batch_size, logits, predictor.overlap,
                                     mode="gaussian")
        _synchronize(device)
        cases.append({"sliding_window": clock() - start})
    return {"cases": cases, "windows": windows, "model_frame_dhw": list(x.shape[2:]),
            "gpu_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None}


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


# -- orchestration ----------------------------------------------------------------------------------
class Volume:
    """A named input: ``cases`` is a list of cases, each a list of one path per modality."""

    def __init__(self, name: str, description: str, cases: list[list[Path]], size_xyz, modalities: int):
        self.name, self.description, self.cases = name, description, cases
        self.size_xyz, self.modalities = list(size_xyz), modalities

    def attnseg_inputs(self, workdir: Path) -> list[str]:
        """One ``-i`` per modality, or a folder of single-modality cases (the CLI's batch mode)."""
        if len(self.cases) == 1:
            return [str(p) for p in self.cases[0]]
        folder = workdir / f"{self.name}_cases"
        folder.mkdir(parents=True, exist_ok=True)
        for (path,) in self.cases:
            link = folder / path.name
            if not link.exists():
                link.symlink_to(path.resolve())
        return [str(folder)]


def volumes(names, quick: bool, workdir: Path, hippocampus_count: int) -> list[Volume]:
    """The volumes named (``--quick``: no two-modality volume, a central block of the brain)."""
    import SimpleITK as sitk

    found = []
    if "hippocampus" in names:
        cases = common.hippocampus_cases(hippocampus_count)
        found.append(Volume("hippocampus", f"MSD Task04 hippocampus, {len(cases)} cases (~35x50x35, 1 mm)",
                            [[p] for p in cases], sitk.ReadImage(str(cases[0])).GetSize(), 1))
    if "whole_brain" in names and quick:
        size = (80, 96, 80)
        brain = common.centre_crop(common.mni_t1(), size, workdir / "mni152_t1_centre.nii.gz")
        found.append(Volume("whole_brain", f"MNI152 T1, central {'x'.join(map(str, size))} block (quick)",
                            [[brain]], size, 1))
    elif "whole_brain" in names:
        found.append(Volume("whole_brain", "MNI152 T1 2009a, 197x233x189, 1 mm", [[common.mni_t1()]],
                            (197, 233, 189), 1))
    if "two_modality" in names and not quick:
        size, spacing = (144, 192, 256), (1.0, 1.0, 0.6)
        paths = common.resampled_brats(size, spacing, workdir / "two_modality")
        found.append(Volume("two_modality", "BraTS 2013 pat0003 FLAIR + T1c resampled to 144x192x256 voxels of "
                            "1x1x0.6 mm (LPS)", [paths], size, 2))
    return found


def measure(model: common.BenchmarkModel, volume: Volume, args, workdir: Path) -> dict:
    """Interleaved fresh-process runs of MONAI, AttnSeg with maps and AttnSeg without, repeated."""
    script = Path(__file__).resolve()
    base = {"package": str(model.path), "device": args.device, "threads": args.threads, "clock": args.clock}
    inputs = volume.attnseg_inputs(workdir)
    runs = {"monai": [], "attnseg": [], "attnseg_no_maps": []}
    for repeat in range(args.repeats if model.default else args.repeats_others):
        specs = {
            "monai": {**base, "side": "monai", "cases": [[str(p) for p in c] for c in volume.cases]},
            "attnseg": {**base, "side": "attnseg", "inputs": inputs, "maps": True,
                        "output": str(workdir / "out" / f"{model.name}_{volume.name}_maps")},
            "attnseg_no_maps": {**base, "side": "attnseg", "inputs": inputs, "maps": False,
                                "output": str(workdir / "out" / f"{model.name}_{volume.name}_no_maps")},
        }
        for key, spec in specs.items():
            runs[key].append(common.run_fresh(script, ["--worker", json.dumps(spec)]))
            if not args.json:
                print(f"  {model.name} / {volume.name} / {key} run {repeat + 1}: "
                      f"{_per_case_total(runs[key][-1]):.2f} s per case", file=sys.stderr)
    return summarise(model, volume, runs)


def _per_case_total(run: dict) -> float:
    """Median over the run's cases of one case's total (the first case carries any warm-up)."""
    key = "sliding_window" if run["side"] == "monai" else None
    return common.median(c[key] if key else sum(c.values()) for c in run["cases"])


def spread(values) -> dict:
    """Min / median / max of the repeats' figures (seconds or ratios)."""
    values = sorted(values)
    return {"min": round(values[0], 4), "median": round(common.median(values), 4), "max": round(values[-1], 4)}


def _maps_share_in_run(runs: list[dict]) -> float | None:
    """The maps' share of a case's total, timed inside the runs with maps (:func:`_maps_timer`): the median
    over the runs of the median over their cases, or None when the maps could not be timed apart. Unlike
    the difference between separate processes with and without maps, whose segmenter time alone moves
    by 10 % from one process to the next, it does not carry that noise."""
    if any(r["maps_s"] is None for r in runs):
        return None
    return round(common.median(common.median(m / sum(c.values()) for m, c in zip(r["maps_s"], r["cases"]))
                               for r in runs), 4)


def summarise(model: common.BenchmarkModel, volume: Volume, runs: dict) -> dict:
    attnseg = common.median(_per_case_total(r) for r in runs["attnseg"])
    no_maps = common.median(_per_case_total(r) for r in runs["attnseg_no_maps"])
    monai = common.median(_per_case_total(r) for r in runs["monai"])
    stages, stages_no_maps = (
        {s: common.median(common.median(c.get(s, 0.0) for c in r["cases"]) for r in runs[key]) for s in STAGES}
        for key in ("attnseg", "attnseg_no_maps"))
    stage_sum = sum(stages.values())
    between_runs = round(1 - no_maps / attnseg, 4)
    in_run = _maps_share_in_run(runs["attnseg"])
    return {
        "model": model.name, "architecture": model.architecture, "trained": model.trained, "default": model.default,
        "volume": volume.name, "size_xyz": volume.size_xyz, "cases": len(volume.cases),
        "windows_per_case": runs["monai"][0]["windows"] / len(volume.cases),
        "model_frame_dhw": runs["monai"][0]["model_frame_dhw"], "repeats": len(runs["monai"]),
        "attnseg_s": round(attnseg, 4), "attnseg_no_maps_s": round(no_maps, 4), "monai_s": round(monai, 4),
        "ratio_vs_monai": round(attnseg / monai, 4),
        "ratio_vs_monai_no_maps": round(no_maps / monai, 4),
        "maps_ratio": round(attnseg / no_maps, 4),
        "maps_cost_fraction": in_run if in_run is not None else between_runs,
        "maps_cost_fraction_between_runs": between_runs,
        "maps_cost_measured": "in the run" if in_run is not None else "between runs",
        "stages_s": {s: round(v, 4) for s, v in stages.items()},
        "stage_fractions": {s: round(v / stage_sum, 4) for s, v in stages.items()},
        "stages_no_maps_s": {s: round(v, 4) for s, v in stages_no_maps.items()},
        "predict_over_monai": round(stages["predict"] / monai, 4),
        "load_s": common.median(r["load_s"] for r in runs["attnseg"]),
        "peak_rss_mb": {"attnseg": max(r["peak_rss_mb"] for r in runs["attnseg"]),
                        "attnseg_no_maps": max(r["peak_rss_mb"] for r in runs["attnseg_no_maps"]),
                        "monai": max(r["peak_rss_mb"] for r in runs["monai"]),
                        "python_imports": min(r["python_imports_rss_mb"] for r in runs["monai"])},
        "gpu_peak_mb_monai": runs["monai"][0]["gpu_peak_mb"],
        "spread": {
            **{key: spread(_per_case_total(r) for r in runs[key]) for key in runs},
            # repeat i's runs were interleaved, so their ratio compares runs made under the same load
            "ratio_vs_monai": spread(_per_case_total(a) / _per_case_total(m)
                                     for a, m in zip(runs["attnseg"], runs["monai"])),
            "maps_cost_fraction_between_runs": spread(1 - _per_case_total(n) / _per_case_total(a)
                                                      for a, n in zip(runs["attnseg"], runs["attnseg_no_maps"])),
            **({"maps_cost_fraction": spread(_maps_share_in_run([r]) for r in runs["attnseg"])}
               if in_run is not None else {}),
        },
    }


def headline(results: list[dict]) -> dict:
    """The top-level figures: the default model on the whole-brain volume (or the first result when
    that was not run), and the targets (the headline, and the worst result: ratio and maps over every
    result, memory over every whole-brain result)."""
    ranked = sorted(results, key=lambda r: (not r["default"], r["volume"] != "whole_brain"))
    main, brain = ranked[0], [r for r in results if r["volume"] == "whole_brain"]
    worst_maps = max(results, key=lambda r: r["maps_cost_fraction"])
    worst_ratio = max(results, key=lambda r: r["ratio_vs_monai"])
    targets = {
        f"AttnSeg / MONAI <= {TARGETS['ratio_vs_monai']} ({main['model']}, {main['volume']})":
            main["ratio_vs_monai"] <= TARGETS["ratio_vs_monai"],
        f"AttnSeg / MONAI <= {TARGETS['ratio_vs_monai']} (worst: {worst_ratio['model']} on {worst_ratio['volume']}, "
        f"{worst_ratio['ratio_vs_monai']:.2f})": worst_ratio["ratio_vs_monai"] <= TARGETS["ratio_vs_monai"],
        f"maps <= 10 % of total ({main['model']}, {main['volume']})":
            main["maps_cost_fraction"] <= TARGETS["maps_cost_fraction"],
        f"maps <= 10 % of total (worst: {worst_maps['model']} on {worst_maps['volume']}, "
        f"{100 * worst_maps['maps_cost_fraction']:.1f} %)":
            worst_maps["maps_cost_fraction"] <= TARGETS["maps_cost_fraction"],
    }
    if brain:
        worst = max(brain, key=lambda r: r["peak_rss_mb"]["attnseg"])
        targets[f"peak memory < 4 GB on the whole-brain volume (worst: {worst['model']}, "
                f"{worst['peak_rss_mb']['attnseg']:.0f} MB)"] = worst["peak_rss_mb"]["attnseg"] < TARGETS["peak_rss_mb"]
    return {
        "headline_model": main["model"], "headline_volume": main["volume"],
        "ratio_vs_monai": main["ratio_vs_monai"], "maps_cost_fraction": main["maps_cost_fraction"],
        "maps_ratio": main["maps_ratio"], "stages_s": main["stages_s"], "stage_fractions": main["stage_fractions"],
        "peak_rss_mb": main["peak_rss_mb"]["attnseg"], "monai_s": main["monai_s"], "attnseg_s": main["attnseg_s"],
        "targets": targets,
    }


MERGED_SETTINGS = ("benchmark", "quick", "device", "threads", "clock")


def merge(reports: list[dict]) -> dict:
    """One report from the reports of separate runs with the same settings: every result, the
    headline and targets recomputed over them all. Reports with other settings are refused."""
    first = reports[0]
    for report in reports[1:]:
        differing = [key for key in MERGED_SETTINGS if report[key] != first[key]]
        if differing:
            raise SystemExit(f"cannot merge runs made with different {', '.join(differing)}; "
                             "run them with the same options")
    results = sorted((r for report in reports for r in report["results"]),
                     key=lambda r: (VOLUMES.index(r["volume"]), not r["default"], r["model"]))
    return {
        **{key: first[key] for key in MERGED_SETTINGS},
        "repeats": max(r["repeats"] for r in reports), "repeats_others": max(r["repeats_others"] for r in reports),
        "machine": {**first["machine"], "load_average_1min": max(r["machine"]["load_average_1min"] for r in reports)},
        "models": list({m["name"]: m for report in reports for m in report["models"]}.values()),
        "stand_ins": sorted({name for report in reports for name in report["stand_ins"]}),
        "volumes": {name: text for report in reports for name, text in report["volumes"].items()},
        **headline(results), "results": results, "merged_runs": len(reports),
        "elapsed_s": round(sum(r["elapsed_s"] for r in reports), 1),
    }


def markdown(report: dict) -> str:
    runs = report.get("merged_runs", 1)
    lines = [
        f"Measured by `python benchmarks/inference.py{' --quick' if report['quick'] else ''}` on "
        f"{report['machine']['processor']} "
        f"({report['machine']['cpu_count']} cores, load average {report['machine']['load_average_1min']}), "
        f"device {report['device']}, {report['threads']} torch thread(s), {report['clock']} clock; medians of "
        f"{report['repeats']} (default model) and {report['repeats_others']} (other models) interleaved "
        "fresh-process run(s) per configuration" + (f", from {runs} runs made side by side" if runs > 1 else "")
        + "; AttnSeg s and MONAI s per case; in brackets the figure of each interleaved repeat: median; min to max.",
        "",
        "Maps cost: timed inside the runs with maps where the map head runs on the blended result "
        "(difficulty_aware), else the difference between the runs with and without maps; beside it, that "
        "difference for every model.",
        "",
        "| model | volume | windows | AttnSeg s | MONAI s | AttnSeg / MONAI | maps cost | maps cost between runs "
        "| slowest stage besides predict | peak MB AttnSeg / MONAI |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in report["results"]:
        others = {s: v for s, v in r["stage_fractions"].items() if s != "predict"}
        slowest = max(others, key=others.get)
        name = r["model"] + ("" if r["trained"] else " (untrained stand-in)")
        lines.append(
            f"| {name} | {r['volume']} | {r['windows_per_case']:.0f} | {r['attnseg_s']:.2f} | {r['monai_s']:.2f} | "
            f"**{r['ratio_vs_monai']:.2f}** {_range(r, 'ratio_vs_monai')} | "
            f"{100 * r['maps_cost_fraction']:.1f} % {_range(r, 'maps_cost_fraction', 100)} | "
            f"{100 * r.get('maps_cost_fraction_between_runs', r['maps_cost_fraction']):.1f} % "
            f"{_range(r, 'maps_cost_fraction_between_runs', 100)} | {slowest} {100 * others[slowest]:.1f} % | "
            f"{r['peak_rss_mb']['attnseg']:.0f} / {r['peak_rss_mb']['monai']:.0f} |")
    lines += ["", "Targets:", ""]
    lines += [f"- {'met' if ok else '**not met**'}: {name}" for name, ok in report["targets"].items()]
    return "\n".join(lines) + "\n"


def _range(result: dict, key: str, scale: float = 1.0) -> str:
    """``key``'s spread over the repeats as "(median per repeat; min to max)", when the result has one
    (reports before it had none; the maps' spread came later than the ratio's)."""
    values = result.get("spread", {}).get(key)
    if not values:
        return ""
    low, middle, high = (scale * values[k] for k in ("min", "median", "max"))
    digits = 1 if scale != 1.0 else 2
    return f"({middle:.{digits}f}; {low:.{digits}f} to {high:.{digits}f})"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="default model only, hippocampus and a central block of the brain, one run")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--model", help="only this package or architecture (default: all; --quick: the default)")
    parser.add_argument("--volume", action="append", choices=VOLUMES,
                        help="only this volume (repeatable; default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides (default 1)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="time stages by wall clock (default) or by process CPU time, which other "
                             "processes on a shared machine do not inflate")
    parser.add_argument("--repeats", type=int,
                        help="interleaved runs per configuration of the default model (default 3; --quick 1)")
    parser.add_argument("--repeats-others", type=int, default=1,
                        help="interleaved runs per configuration of every other model (default 1)")
    parser.add_argument("--hippocampus-cases", type=int, help="hippocampus cases per run (default 10; --quick 3)")
    parser.add_argument("--output", type=Path, help="results JSON (default benchmarks/results/inference.json; "
                        "--quick: none); a Markdown table is written beside it")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="REPORT",
                        help="join these results JSON files of runs with the same settings into --output")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one measurement, run by the parent
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.device == "cuda":
        parser.error("--clock cpu measures CPU work; on --device cuda use the wall clock")
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.hippocampus_cases = args.hippocampus_cases or (3 if args.quick else 10)
    if args.output is None and (args.merge or not args.quick):
        args.output = common.RESULTS_DIR / "inference.json"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.merge:
        report = merge([json.loads(path.read_text()) for path in args.merge])
        common.write_report(args.output, report, markdown(report))
        print(json.dumps(report) if args.json else markdown(report))
        return 0
    common.set_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="attnseg-bench-") as tmp:
        workdir = Path(tmp)
        models = common.benchmark_models(workdir, args.model)
        if args.quick and args.model is None:
            models = [m for m in models if m.default]
        results, described = [], {}
        for volume in volumes(args.volume or VOLUMES, args.quick, workdir, args.hippocampus_cases):
            described[volume.name] = volume.description
            for model in models:
                if volume.modalities != 1:
                    model = common.with_modalities(model, TWO_MODALITIES, workdir)
                results.append(measure(model, volume, args, workdir))
                if not args.json:
                    r = results[-1]
                    print(f"{r['model']:<32} {volume.name:<13} AttnSeg {r['attnseg_s']:8.2f} s  "
                          f"MONAI {r['monai_s']:8.2f} s  "
                          f"ratio {r['ratio_vs_monai']:.3f} {_range(r, 'ratio_vs_monai')}  "
                          f"maps {100 * r['maps_cost_fraction']:5.1f} % {_range(r, 'maps_cost_fraction', 100)}  "
                          f"peak {r['peak_rss_mb']['attnseg']:.0f} MB")
        report = {
            "benchmark": "inference", "quick": args.quick, "device": args.device, "threads": args.threads,
            "clock": args.clock, "repeats": args.repeats, "repeats_others": args.repeats_others,
            "machine": common.machine(args.threads),
            "models": [m.describe() | {"path": Path(m.path).name} for m in models],
            "stand_ins": [m.name for m in models if not m.trained],
            "volumes": described, **headline(results),
            "results": results, "elapsed_s": round(time.perf_counter() - started, 1),
        }
    if report["stand_ins"]:
        print(f"note: untrained stand-ins (no shipped package yet): {', '.join(report['stand_ins'])}", file=sys.stderr)
    if args.output:
        common.write_report(args.output, report, markdown(report))
    if args.json:
        print(json.dumps(report))
    else:
        print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

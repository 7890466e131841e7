"""Whole-head T1 to both hippocampi: CPU time of the localised prediction, registration as its own stage.

    python benchmarks/whole_head.py                  # MNI152, both MS patients, a skull-on head; 3 repeats
    python benchmarks/whole_head.py --quick --json   # MNI152 only, one repeat of each side

* **AttnSeg (localised)**: ``Predictor.predict`` of the default package on the whole head, as ``attnseg
  segment`` calls it: register the MNI152 template (``localise``), segment one crop per hippocampus
  (``preprocess``, ``predict``, ``postprocess``), everything back on the input grid. File reading and
  writing are left out (the same on both sides; ``benchmarks/inference.py`` measures them).
* **Baseline (named)**: the same package's sliding window over the whole head, un-localised
  (``Predictor(localise=False)``, what ``attnseg segment`` did before localisation: about 160 ml of
  "hippocampus"), on the MNI152 template.

Both sides run in this process, one torch and ITK thread, interleaved repeat by repeat, timed by the
process's CPU clock (``time.process_time``; the predictor's stage timer reads that clock here only), so
other jobs on a shared machine do not stretch the figures. Medians over ``--repeats``. The target: at
most 10 s of CPU for a whole head (``TARGET_CPU_S``). Results go to ``benchmarks/results/whole_head.{json,md}``
(not for ``--quick`` unless ``--output`` is given).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TARGET_CPU_S = 10.0
PATIENT_T1 = "ms_lesions/{}/T1_N4_noneck_reduced_winsor_regtoFLAIR_brain_N4_regtoMNI.nii.gz"
# a head with its skull, scalp, face and neck (PyDeface's mean T1 at 1.5 mm; Testing/data/skull_on_head/README.md)
SKULL_ON_HEAD = common.REPO / "Testing" / "data" / "skull_on_head" / "pydeface_mean_head_1p5mm.nii.gz"
STAGES = ("localise", "preprocess", "predict", "postprocess")


def volumes(quick: bool) -> dict[str, Path]:
    out = {"mni152": common.mni_t1()}
    if not quick:
        for patient in ("patient07", "patient19"):
            out[patient] = common.data_root() / PATIENT_T1.format(patient)
        out["skull_on_head"] = SKULL_ON_HEAD
    return out


def cpu_run(predictor, image) -> tuple[float, dict, object]:
    start = time.process_time()
    result = predictor.predict([image])
    return time.process_time() - start, result.timings, result


def measure(repeats: int, quick: bool, threads: int) -> dict:
    common.set_threads(threads)
    time.perf_counter = time.process_time  # the predictor's stage timer reads CPU time in this process
    from AttnSegLib.image import read_image
    from AttnSegLib.inference import Predictor
    from AttnSegLib.localise import volumetry
    from AttnSegLib.package import default_package

    package = default_package()
    localised = Predictor(package, device="cpu")
    baseline = Predictor(package, device="cpu", localise=False)
    images = {name: read_image(path) for name, path in volumes(quick).items()}
    localised.predict([images["mni152"]])  # warm up: template read, first torch calls
    runs: dict[str, list] = {name: [] for name in images}
    baseline_runs, baseline_ml = [], None
    for _ in range(repeats):
        for name, image in images.items():
            seconds, timings, result = cpu_run(localised, image)
            runs[name].append({"cpu_s": seconds, "stages": timings,
                               "volumetry": volumetry(result.labels, result.classes)})
        seconds, _, result = cpu_run(baseline, images["mni152"])
        baseline_runs.append(seconds)
        baseline_ml = result.class_volumes_ml(result.class_names)
    baseline_s = common.median(baseline_runs)
    cases = {}
    for name, measured in runs.items():
        cpu = common.median(r["cpu_s"] for r in measured)
        cases[name] = {
            "voxels": list(images[name].geometry.size), "spacing_mm": list(images[name].geometry.spacing),
            "cpu_s": round(cpu, 3), "runs_cpu_s": [round(r["cpu_s"], 3) for r in measured],
            "stages_cpu_s": {s: round(common.median(r["stages"].get(s, 0.0) for r in measured), 3) for s in STAGES},
            "volumetry": measured[-1]["volumetry"],
            "within_target": cpu <= TARGET_CPU_S,
        }
    mni = cases["mni152"]["cpu_s"]
    return {
        "clock": "cpu", "threads": threads, "repeats": repeats, "quick": quick, "model": package.name,
        "target_cpu_s": TARGET_CPU_S, "cases": cases,
        "baseline": {"name": "un-localised whole-volume sliding window (Predictor(localise=False)) on mni152",
                     "cpu_s": round(baseline_s, 3), "runs_cpu_s": [round(s, 3) for s in baseline_runs],
                     "class_volumes_ml": baseline_ml},
        "ratio_vs_baseline": round(mni / baseline_s, 4),
        "speedup_vs_baseline": round(baseline_s / mni, 2),
        "machine": common.machine(threads),
    }


def table(report: dict) -> str:
    lines = [f"Default model `{report['model']}`, CPU seconds (one thread), median of {report['repeats']} "
             f"run(s); baseline: {report['baseline']['name']}, {report['baseline']['cpu_s']:.1f} s, answering "
             + ", ".join(f"{k} {v:.0f} ml" for k, v in report["baseline"]["class_volumes_ml"].items()) + ".",
             "",
             "| volume | voxels | total CPU s | registration s | crops: predict s | other s | vs baseline | "
             "left ml | right ml | asymmetry % |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, case in report["cases"].items():
        stages, v = case["stages_cpu_s"], case["volumetry"]
        other = case["cpu_s"] - stages["localise"] - stages["predict"]
        ratio = case["cpu_s"] / report["baseline"]["cpu_s"]
        lines.append(f"| {name} | {'x'.join(map(str, case['voxels']))} | {case['cpu_s']:.2f} | "
                     f"{stages['localise']:.2f} | {stages['predict']:.2f} | {other:.2f} | {ratio:.3f}x | "
                     f"{v['Left']['total']:.2f} | {v['Right']['total']:.2f} | "
                     f"{v['asymmetry_index_percent']['total']:+.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the MNI152 template only, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", help="JSON path (default benchmarks/results/whole_head.json; none for --quick)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON line last")
    args = parser.parse_args(argv)
    report = measure(1 if args.quick else args.repeats, args.quick, args.threads)
    output = Path(args.output) if args.output else (None if args.quick else common.RESULTS_DIR / "whole_head.json")
    if output is not None:
        common.write_report(output, report, table(report))
    print(table(report))
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

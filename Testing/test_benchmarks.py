"""The benchmark scripts run end to end on real data and report what their README promises.

No timing is asserted (a shared machine makes absolute and relative times noise); the tests check
that every figure is produced, consistent with the others, and that the counted FLOPs (exact, not
timed) show the non-local baseline growing faster than the slice attention it is compared with.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = {"read", "preprocess", "predict", "postprocess", "write"}


def run_script(name: str, *args: str) -> dict:
    """Run ``benchmarks/<name>`` and return the JSON object its last stdout line holds."""
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / name), *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=900)
    assert done.returncode == 0, f"{name} failed:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def quick_report(data_dir) -> dict:
    return run_script("inference.py", "--quick", "--json")


def test_quick_inference_reports_the_ratio_stages_memory_and_maps_cost(quick_report):
    report = quick_report
    assert report["quick"] is True and report["device"] == "cpu" and report["threads"] == 1
    for key in ("ratio_vs_monai", "maps_cost_fraction", "maps_ratio", "peak_rss_mb", "monai_s", "attnseg_s"):
        assert isinstance(report[key], float), key
    assert report["ratio_vs_monai"] > 0 and report["monai_s"] > 0
    assert report["ratio_vs_monai"] == pytest.approx(report["attnseg_s"] / report["monai_s"], rel=1e-3)
    assert set(report["stages_s"]) == STAGES
    assert sum(report["stage_fractions"].values()) == pytest.approx(1.0, abs=1e-3)
    assert report["headline_volume"] == "whole_brain"
    assert report["targets"] and all(isinstance(ok, bool) for ok in report["targets"].values())
    for result in report["results"]:  # the spread over the repeats, which the table prints
        for key in ("monai", "attnseg", "attnseg_no_maps", "ratio_vs_monai", "maps_cost_fraction",
                    "maps_cost_fraction_between_runs"):
            spread = result["spread"][key]
            assert spread["min"] <= spread["median"] <= spread["max"], key


def test_quick_inference_measures_the_default_model_on_both_volumes_in_fresh_processes(quick_report):
    results = {r["volume"]: r for r in quick_report["results"]}
    assert set(results) == {"hippocampus", "whole_brain"}
    assert {r["model"] for r in results.values()} == {quick_report["headline_model"]}
    brain, hippocampus = results["whole_brain"], results["hippocampus"]
    assert brain["model_frame_dhw"] == [80, 96, 80]  # the central block, already RAS at 1 mm
    assert brain["windows_per_case"] > hippocampus["windows_per_case"] >= 1
    assert hippocampus["cases"] == 3
    for r in results.values():
        memory = r["peak_rss_mb"]
        # Each side ran in its own process: every peak includes the libraries, none is the same number.
        assert memory["attnseg"] > memory["python_imports"] > 0 and memory["monai"] > memory["python_imports"]
        assert r["maps_ratio"] == pytest.approx(r["attnseg_s"] / r["attnseg_no_maps_s"], rel=1e-3)
        # the default's map head runs on the blended result, so its cost is timed inside the runs with maps
        assert r["maps_cost_measured"] == "in the run" and 0 < r["maps_cost_fraction"] < 0.5
        assert r["maps_cost_fraction_between_runs"] == pytest.approx(1 - r["attnseg_no_maps_s"] / r["attnseg_s"],
                                                                     abs=1e-3)
    stand_ins = set(quick_report["stand_ins"])
    assert all(m["trained"] == (m["name"] not in stand_ins) for m in quick_report["models"])


def test_runs_made_apart_merge_into_the_report_one_run_would_give(quick_report, tmp_path):
    parts = []
    for volume in ("whole_brain", "hippocampus"):
        part = tmp_path / f"{volume}.json"
        part.write_text(json.dumps({**quick_report, "results": [r for r in quick_report["results"]
                                                                   if r["volume"] == volume]}))
        parts.append(str(part))
    merged = run_script("inference.py", "--merge", *parts, "--output", str(tmp_path / "merged.json"), "--json")
    assert merged["merged_runs"] == 2 and merged["results"] == quick_report["results"]
    for key in ("headline_model", "ratio_vs_monai", "stages_s", "peak_rss_mb", "maps_cost_fraction", "targets"):
        assert merged[key] == quick_report[key], key
    assert "from 2 runs made side by side" in (tmp_path / "merged.md").read_text()
    other_clock = tmp_path / "other_clock.json"
    other_clock.write_text(json.dumps({**quick_report, "clock": "cpu" if quick_report["clock"] == "wall" else "wall"}))
    refused = subprocess.run([sys.executable, str(REPO / "benchmarks" / "inference.py"), "--merge", parts[0],
                              str(other_clock), "--output", str(tmp_path / "refused.json")],
                             capture_output=True, text=True, cwd=REPO)
    assert refused.returncode != 0 and "clock" in refused.stderr and not (tmp_path / "refused.json").exists()


def test_tiny_scaling_run_fits_exponents_and_plots(tmp_path, data_dir):
    report = run_script("scaling.py", "--sizes", "40", "--block-sizes", "6", "10", "--blocks", "rsa", "non_local",
                        "--output", str(tmp_path), "--json")
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "scaling.json").read_text())["exponents"] == report["exponents"]
    (row,) = report["pipeline"]
    assert row["size"] == 40 and row["voxels"] == 40 ** 3 and set(row["stages_s"]) == STAGES
    assert row["peak_rss_mb"] > row["python_imports_rss_mb"]
    measured = {(r["block"], r["size"]) for r in report["blocks"]}
    assert measured == {(block, n) for block in ("rsa", "non_local") for n in (6, 10)}
    flops = report["exponents"]
    # The non-local block's S x S attention makes its FLOPs grow faster with the voxels than slice attention's.
    assert flops["non_local"]["flops"] > flops["rsa"]["flops"] >= 0.9


def test_quick_accuracy_scores_a_package_against_the_unet_and_its_doubt_maps(tmp_path, data_dir):
    report = run_script("accuracy.py", "--model", "hippocampus_difficulty_aware", "--cases", "3",
                        "--output", str(tmp_path / "accuracy.json"), "--json")
    assert report["cases"] == 3 and len(report["case_names"]) == 3
    assert report["classes"] == ["Anterior", "Posterior"]
    rows = {r["model"]: r for r in report["rows"]}
    assert set(rows) == {"hippocampus_unet", "hippocampus_difficulty_aware"}
    assert report["baseline"] == "hippocampus_unet"
    for r in rows.values():
        assert all(0.5 < r["dice"][c] <= 1 for c in report["classes"]), r["dice"]  # trained: far above chance
        assert r["mean_dice"] == pytest.approx(sum(r["dice"].values()) / 2, abs=1e-3)
        assert all(r[m][c] >= 0 for m in ("asd_mm", "hd95_mm") for c in report["classes"])
        detection = r["error_detection_auroc"]
        # Measured here on the maps, beside what the card states; the review map is one of those measured.
        assert detection["review_map"] in detection["measured"]
        assert all(0 <= auroc <= 1 for auroc in detection["measured"].values())
        assert set(detection["measured"]) <= set(detection["card"])
        # What a reviewer needs: each map beside the boundary baseline, effort curves, calibration.
        review = r["review"]
        assert {"uncertainty", "boundary distance"} <= set(review["maps"]) and 0 <= review["ece_foreground"] <= 1
        assert 0 < review["wrong_fraction"] < 0.1
        for figures in review["maps"].values():
            assert 0 <= figures["average_precision"] <= 1 and 0 <= figures["auroc"] <= 1
            curve = figures["effort_curve"]
            assert len(curve) == len(review["effort_fractions"]) and curve[0] == 0
            assert all(a <= b for a, b in zip(curve, curve[1:]))  # reviewing more never finds fewer errors
    assert "difficulty" in rows["hippocampus_difficulty_aware"]["error_detection_auroc"]["measured"]
    versus = rows["hippocampus_difficulty_aware"]["versus_baseline"]
    assert 0 <= versus["wilcoxon_p"] <= 1 and versus["cases_better"] + versus["cases_worse"] <= 3
    assert "versus_baseline" not in rows["hippocampus_unet"]
    table = (tmp_path / "accuracy.md").read_text()
    assert "nnU-Net (published)" in table and "hippocampus_difficulty_aware" in table
    for plot in ("accuracy_reliability.png", "accuracy_review_effort.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_review_effort_counts_visits_for_each_grouping(tmp_path, data_dir):
    report = run_script("review_effort.py", "--cases", "2", "--output", str(tmp_path / "review_effort.json"))
    assert report["cases"] == 2 and report["review_map"] == "uncertainty"
    for grouping in ("components", "merged", "compact"):
        for reach in ("inside", "nearby"):
            summary = report["summary"][grouping][reach]
            assert 0 <= summary["mean_seen_fraction"] <= 1 and summary["median_regions"] >= 1
    # Merging fragments leaves fewer regions than the raw components; cutting the merged groups into
    # compact places leaves regions no wider than 15 mm, and regions seen with their surroundings
    # hold more of the errors than the regions alone.
    summary = {g: report["summary"][g]["inside"] for g in ("components", "merged", "compact")}
    assert summary["merged"]["median_regions"] < summary["components"]["median_regions"]
    assert summary["compact"]["widest_mm"] <= 15 < summary["merged"]["widest_mm"]
    compact = report["summary"]["compact"]
    assert compact["nearby"]["mean_seen_fraction"] >= compact["inside"]["mean_seen_fraction"]
    assert (tmp_path / "review_effort.md").read_text().startswith("Review effort of")


def test_review_ceiling_tables_the_error_rate_by_the_models_own_error_probability(tmp_path, data_dir):
    run_script("review_ceiling.py", "--cases", "2", "--output", str(tmp_path / "review_ceiling.json"))
    report = json.loads((tmp_path / "review_ceiling.json").read_text())
    bins = report["bins"]
    assert all(b["voxels"] > 0 for b in bins) and [b["from"] for b in bins] == sorted(b["from"] for b in bins)
    assert sum(b["share_of_errors"] for b in bins) == pytest.approx(1.0, abs=1e-3)
    # the calibrated probabilities: the error rate climbs with the error probability, and the
    # confidently labelled voxels are nearly all right
    assert bins[0]["from"] == 0 and bins[0]["error_rate"] < 0.05 < bins[-1]["error_rate"]
    assert report["confident_share_of_errors"] == pytest.approx(bins[0]["share_of_errors"], abs=1e-3)
    top = report["precision_of_top"]
    assert 0 < top["0.012"] <= top["0.001"] <= 1 and 0 < report["review_map_auprc"] < 1
    places = report["confident_errors"]
    assert places["voxels"] > 0
    assert 0 <= places["within_0_mm"] <= places["within_1_mm"] <= places["within_2_mm"] <= 1
    assert 0 <= places["other_foreground_class"] <= 1
    assert (tmp_path / "review_ceiling.md").read_text().startswith("How high the review map's AUPRC can go")

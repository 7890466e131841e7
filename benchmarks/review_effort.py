"""How many doubtful regions a reader must visit to see 80 % of the voxels the model got wrong.

    python benchmarks/review_effort.py                     # writes benchmarks/results/review_effort.{md,json}
    python benchmarks/review_effort.py --cases 3 --output /tmp/review_effort.json   # a quick check

Cases: the first ``--cases`` validation cases the package's card lists (``training.validation_cases``),
run through the product path (``Predictor.predict`` on the original image); the wrong voxels are
where its labels differ from the expert label. The review map is the one the card names
(``inference.review_map``, the Predictor's ``review_map_name``).

Three groupings of the same voxels (review map >= ``--threshold``), each ranked by doubt mass:

* **components**: every 26-connected component, however small, the first 50 of them (what the panels
  listed first: ``doubtful_regions(..., min_volume_ml=0, merge_mm=0, radius_mm=None)`` capped at 50);
* **merged**: fragments closer than ``MERGE_MM`` joined, regions under ``MIN_VOLUME_ML`` left out, no
  cap, each group whole (``radius_mm=None``): on these cases one band around the whole structure;
* **compact**: the review's defaults (``AttnSegLib.review``): the merged groups cut into regions at
  most ``2 * RADIUS_MM`` across, centred where the doubt is densest.

A reader visits regions in rank order. A wrong voxel counts as *seen* when it lies in a visited
region (``inside``) or within ``--reach-mm`` of one (``nearby``: what the slice views show around a
region). The figure is the number of visits after which 80 % of the case's wrong voxels are seen;
``null`` when all the regions together do not reach 80 % (the fraction seen after the last is given).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TARGET = 0.8
BEFORE_CAP = 50
GROUPINGS = ("components", "merged", "compact")


def visits_to_target(wrong: np.ndarray, labels: np.ndarray, regions, reach_voxels: tuple[int, int, int]) -> dict:
    """Visits (rank order) until ``TARGET`` of ``wrong`` (D, H, W bool) is seen; ``labels`` from
    ``region_labels`` (``rank + 1`` on each region's voxels)."""
    total = int(wrong.sum())
    seen = np.zeros_like(wrong)
    structure = np.ones([2 * r + 1 for r in reach_voxels], bool)
    for visit, region in enumerate(regions, 1):
        footprint = labels == region.rank + 1
        if any(reach_voxels):
            footprint = ndimage.binary_dilation(footprint, structure)
        seen |= footprint
        if (seen & wrong).sum() >= TARGET * total:
            return {"visits": visit, "seen_fraction": round(float((seen & wrong).sum() / total), 3)}
    return {"visits": None, "seen_fraction": round(float((seen & wrong).sum() / max(total, 1)), 3)}


def measure_case(result, reference, threshold: float, reach_mm: float) -> dict:
    from AttnSegLib.review import region_labels

    review_map = result.maps[result.review_map_name]
    wrong = result.labels.array != reference.array
    spacing_dhw = review_map.geometry.spacing[::-1]
    reach = tuple(int(round(reach_mm / s)) for s in spacing_dhw)
    out = {"wrong_voxels": int(wrong.sum()),
           "wrong_at_or_above_threshold": round(float((review_map.array[wrong] >= threshold).mean()), 3)}
    groupings = {"components": dict(min_volume_ml=0.0, merge_mm=0.0, radius_mm=None),
                 "merged": dict(radius_mm=None), "compact": {}}
    for name, options in groupings.items():
        labels, regions = region_labels(review_map, threshold, **options)
        listed = regions[:BEFORE_CAP] if name == "components" else regions
        voxel_counts = [r.voxels for r in regions]
        out[name] = {"regions": len(regions), "listed": len(listed),
                     "regions_under_5_voxels": int(sum(c < 5 for c in voxel_counts)),
                     "largest_ml": round(max((r.volume_ml for r in regions), default=0.0), 4),
                     "first_extent_mm": [round((stop - start) * s, 1) for (start, stop), s in
                                         zip(regions[0].bbox_ijk, review_map.geometry.spacing)] if regions else None,
                     "widest_mm": round(max((max((stop - start) * s for (start, stop), s in
                                                 zip(r.bbox_ijk, review_map.geometry.spacing)) for r in regions),
                                            default=0.0), 1),
                     "inside": visits_to_target(wrong, labels, listed, (0, 0, 0)),
                     "nearby": visits_to_target(wrong, labels, listed, reach)}
    return out


def summary(per_case: dict, grouping: str, reach: str) -> dict:
    rows = [case[grouping] for case in per_case.values()]
    visits = [r[reach]["visits"] for r in rows]
    reached = [v for v in visits if v is not None]
    return {"cases_reaching_80": len(reached), "median_visits": float(np.median(reached)) if reached else None,
            "max_visits": max(reached) if reached else None,
            "mean_seen_fraction": round(float(np.mean([r[reach]["seen_fraction"] for r in rows])), 3),
            "median_regions": float(np.median([r["regions"] for r in rows])),
            "widest_mm": max(r["widest_mm"] for r in rows)}


def markdown(report: dict) -> str:
    lines = [f"Review effort of `{report['model']}` (review map `{report['review_map']}` >= {report['threshold']}) "
             f"on {report['cases']} validation cases of MSD Task04 Hippocampus: regions a reader visits, most "
             f"doubtful first, until 80 % of the wrong voxels are seen inside the visited regions or within "
             f"{report['reach_mm']} mm of them.", "",
             "| grouping | regions per case (median) | widest region (mm) | cases reaching 80 % inside "
             "| mean seen inside, all regions | cases reaching 80 % within reach "
             "| visits to 80 % within reach (median / max) |",
             "|---|---|---|---|---|---|---|"]
    for grouping in GROUPINGS:
        inside, nearby = report["summary"][grouping]["inside"], report["summary"][grouping]["nearby"]
        lines.append(f"| {grouping} | {inside['median_regions']:g} | {inside['widest_mm']:g} "
                     f"| {inside['cases_reaching_80']} / {report['cases']} "
                     f"| {100 * inside['mean_seen_fraction']:.0f} % | {nearby['cases_reaching_80']} / {report['cases']} "
                     f"| {nearby['median_visits']} / {nearby['max_visits']} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="package name or folder (default: the default package)")
    parser.add_argument("--cases", type=int, default=10, help="the first N validation cases of the card (default 10)")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--reach-mm", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=common.RESULTS_DIR / "review_effort.json")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    common.set_threads(args.threads)
    from AttnSegLib.image import read_image
    from AttnSegLib.inference import Predictor
    from AttnSegLib.package import default_package, load_package

    package = load_package(args.model) if args.model else default_package()
    names = common.validation_case_names(package, args.cases)
    root = common.data_root() / "hippocampus"
    predictor = Predictor(package, device="cpu")
    per_case = {}
    for name in names:
        result = predictor.predict([read_image(root / "imagesTr" / f"{name}.nii.gz")])
        per_case[name] = measure_case(result, read_image(root / "labelsTr" / f"{name}.nii.gz"), args.threshold,
                                      args.reach_mm)
        print(name, json.dumps(per_case[name]), file=sys.stderr, flush=True)
    report = {"model": package.name, "review_map": result.review_map_name, "threshold": args.threshold,
              "reach_mm": args.reach_mm, "cases": len(names), "target": TARGET, "machine": common.machine(args.threads),
              "summary": {g: {reach: summary(per_case, g, reach) for reach in ("inside", "nearby")}
                          for g in GROUPINGS},
              "per_case": per_case}
    common.write_report(args.output, report, markdown(report))
    print(json.dumps({k: report[k] for k in ("model", "review_map", "threshold", "cases", "summary")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

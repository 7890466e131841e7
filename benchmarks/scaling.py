"""How time and memory grow with the volume: the whole pipeline, and the attention blocks alone
against a naive non-local block.

    python benchmarks/scaling.py                              # 64^3 .. 256^3, blocks 8^3 .. 48^3
    python benchmarks/scaling.py --sizes 48 64 --block-sizes 4 6 --output /tmp/scaling   # a tiny run

**Pipeline.** ``attnseg segment`` with maps (``inference.py``'s AttnSeg side, one fresh process per
size, the default model or ``--model``) on the MNI152 T1 centred in an N^3 grid of 1 mm (cropped or
zero-padded, so the model frame is N^3 too). Total time, each stage, and peak resident memory; the
exponent b of time ~ voxels^b (and of peak memory above the imports' floor) is fitted in log-log.

**Attention blocks.** Each block alone, eval forward on a feature map (1, C, n, n, n), one fresh
process per block and size: median time of three forwards, peak resident memory above what the process
held before the first forward, and FLOPs (``FlopCounterMode``: matrix products and convolutions).

* ``rsa``: RSANet's recurrent slice attention (``RecurrentSliceAttention``): three n x n slice
  attention matrices;
* ``sam``: CGA U-Net's supervised attention module, the category-guided intra-class update of the
  feature map given the category attention S (K = 3 classes at the same n^3; S comes from the SAM's
  own conv path on the image, which is a plain conv stack);
* ``dspa``: MDA-U-Net's dense spatial position attention (K = 10 dense features);
* ``non_local``: the baseline every one of these papers argues against, an embedded-Gaussian
  non-local block (Wang et al., CVPR 2018), written here: 1x1x1 convs to C/2, an S x S softmax
  attention over all S = n^3 voxels, 1x1x1 conv back, residual. Sizes whose S x S matrix would
  pass ``--non-local-limit-mb`` are skipped.

Writes ``scaling.json`` and ``scaling.png`` to ``--output`` (default ``benchmarks/results``).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

INFERENCE = Path(__file__).resolve().parent / "inference.py"
BLOCKS = ("rsa", "sam", "dspa", "non_local")
CHANNELS = 32
CLASSES = 3


# -- the baseline and the blocks ------------------------------------------------------------------
def non_local_block(channels: int):
    """Embedded-Gaussian non-local block; see the module docstring. (N, C, n, n, n) -> same."""
    from torch import nn

    class NonLocal(nn.Module):
        def __init__(self):
            super().__init__()
            inner = max(channels // 2, 1)
            self.query, self.key, self.value = (nn.Conv3d(channels, inner, 1) for _ in range(3))
            self.project = nn.Conv3d(inner, channels, 1)

        def forward(self, x):
            q, k, v = (conv(x).flatten(2) for conv in (self.query, self.key, self.value))  # (N, C/2, S)
            weights = (q.transpose(1, 2) @ k).softmax(dim=-1)                               # (N, S, S)
            out = (v @ weights.transpose(1, 2)).view(x.shape[0], -1, *x.shape[2:])          # (N, C/2, n, n, n)
            return x + self.project(out)

    return NonLocal()


def block_call(name: str, size: int, device: str = "cpu"):
    """(module, inputs): the block ``name`` on a (1, C, n, n, n) feature map, ready for ``module(*inputs)``."""
    import torch

    from AttnSegLib.models.blocks import DensePositionAttention, RecurrentSliceAttention
    from AttnSegLib.models.cga_unet import SupervisedAttentionModule

    torch.manual_seed(0)
    x = torch.randn(1, CHANNELS, size, size, size, device=device)
    if name == "rsa":
        return RecurrentSliceAttention(CHANNELS).to(device).eval(), (x,)
    if name == "sam":
        attention = torch.rand(1, CLASSES, size, size, size, device=device)
        return SupervisedAttentionModule(1, CLASSES).to(device).eval(), (x, attention)
    if name == "dspa":
        return DensePositionAttention(CHANNELS).to(device).eval(), (x,)
    if name == "non_local":
        return non_local_block(CHANNELS).to(device).eval(), (x,)
    raise ValueError(f"unknown block {name!r}; known: {', '.join(BLOCKS)}")


def block_flops(name: str, size: int) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    module, inputs = block_call(name, size, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(*inputs)
    return counter.get_total_flops()


def non_local_matrix_mb(size: int) -> float:
    return (size ** 3) ** 2 * 4 / 2**20


def block_worker(spec: dict) -> dict:
    """In a fresh process: time and peak memory of one block at one size."""
    common.set_threads(spec["threads"])
    import torch

    module, inputs = block_call(spec["block"], spec["size"])
    clock = time.process_time if spec["clock"] == "cpu" else time.perf_counter
    common.reset_peak_rss()
    before = common.resident_mb()
    times = []
    with torch.inference_mode():
        for _ in range(4):
            start = clock()
            module(*inputs)
            times.append(clock() - start)
    return {"block": spec["block"], "size": spec["size"], "time_s": common.median(times[1:]),
            "peak_extra_mb": round(common.peak_since_reset_mb() - before, 1)}


# -- the pipeline ---------------------------------------------------------------------------------
def mni_cube(size: int, out: Path) -> Path:
    """The MNI152 T1 centred in a size^3 grid of 1 mm (cropped or zero-padded), written to ``out``."""
    import SimpleITK as sitk

    source = sitk.ReadImage(str(common.mni_t1()))
    array = sitk.GetArrayFromImage(source)
    cube = np.zeros((size,) * 3, dtype=array.dtype)
    src, dst = [], []
    for n in array.shape:
        take = min(n, size)
        src.append(slice((n - take) // 2, (n - take) // 2 + take))
        dst.append(slice((size - take) // 2, (size - take) // 2 + take))
    cube[tuple(dst)] = array[tuple(src)]
    image = sitk.GetImageFromArray(cube)
    image.SetSpacing(source.GetSpacing())
    image.SetDirection(source.GetDirection())
    shift = [(s.start - d.start) for s, d in zip(reversed(src), reversed(dst))]  # (i, j, k) voxels
    image.SetOrigin(source.TransformContinuousIndexToPhysicalPoint(shift))
    sitk.WriteImage(image, str(out), True)
    return out


def pipeline(sizes: list[int], model: common.BenchmarkModel, args, workdir: Path) -> list[dict]:
    rows = []
    for size in sizes:
        volume = mni_cube(size, workdir / f"mni_{size}.nii.gz")
        spec = {"side": "attnseg", "package": str(model.path), "device": args.device, "threads": args.threads,
                "clock": args.clock,
                "inputs": [str(volume)], "maps": True, "output": str(workdir / f"out_{size}")}
        run = common.run_fresh(INFERENCE, ["--worker", json.dumps(spec)])
        stages = run["cases"][0]
        rows.append({"size": size, "voxels": size ** 3, "total_s": round(sum(stages.values()), 4),
                     "stages_s": stages, "peak_rss_mb": run["peak_rss_mb"],
                     "python_imports_rss_mb": run["python_imports_rss_mb"]})
        print(f"pipeline {size:>4}^3: {rows[-1]['total_s']:8.2f} s, peak {run['peak_rss_mb']:.0f} MB", file=sys.stderr)
    return rows


def blocks(names: list[str], sizes: list[int], args) -> list[dict]:
    rows = []
    for name in names:
        for size in sizes:
            if name == "non_local" and non_local_matrix_mb(size) > args.non_local_limit_mb:
                print(f"{name} {size}^3 skipped: its {non_local_matrix_mb(size):.0f} MB attention matrix passes "
                      f"--non-local-limit-mb {args.non_local_limit_mb:.0f}", file=sys.stderr)
                continue
            spec = {"block": name, "size": size, "threads": args.threads, "clock": args.clock}
            row = common.run_fresh(Path(__file__).resolve(), ["--worker", json.dumps(spec)])
            row.update(voxels=size ** 3, gflops=block_flops(name, size) / 1e9)
            rows.append(row)
            print(f"{name:>9} {size:>3}^3: {row['time_s'] * 1e3:9.1f} ms, +{row['peak_extra_mb']:.0f} MB, "
                  f"{row['gflops']:.3f} GFLOPs", file=sys.stderr)
    return rows


# -- fits and the plot ----------------------------------------------------------------------------
def exponents(rows: list[dict], key: str, floor_key: str | None = None) -> float | None:
    """b of value ~ voxels^b over ``rows`` (value minus ``floor_key`` when given; needs two points)."""
    points = [(r["voxels"], r[key] - (r[floor_key] if floor_key else 0.0)) for r in rows]
    points = [(v, y) for v, y in points if y > 0]
    return round(common.power_law_exponent(*zip(*points)), 3) if len(points) >= 2 else None


def memory_line(rows: list[dict]) -> dict | None:
    """Least-squares peak MB = fixed + per_voxel * voxels, and where that line reaches 4 GB."""

    if len(rows) < 2:
        return None
    per_voxel, fixed = np.polyfit([r["voxels"] for r in rows], [r["peak_rss_mb"] for r in rows], 1)
    reaches = (4096 - fixed) / per_voxel if per_voxel > 0 else None
    return {"fixed_mb": round(float(fixed), 1), "bytes_per_voxel": round(float(per_voxel) * 2**20, 1),
            "voxels_at_4gb": None if reaches is None else int(reaches),
            "cube_edge_at_4gb": None if reaches is None else int(round(reaches ** (1 / 3)))}


def fits(pipeline_rows: list[dict], block_rows: list[dict]) -> dict:
    out = {"pipeline": {"time": exponents(pipeline_rows, "total_s"),
                        "predict": exponents([{**r, "predict": r["stages_s"]["predict"]} for r in pipeline_rows],
                                             "predict"),
                        "memory_above_imports": exponents(pipeline_rows, "peak_rss_mb", "python_imports_rss_mb"),
                        "memory_line": memory_line(pipeline_rows)}}
    for name in sorted({r["block"] for r in block_rows}):
        rows = [r for r in block_rows if r["block"] == name]
        out[name] = {"time": exponents(rows, "time_s"), "memory": exponents(rows, "peak_extra_mb"),
                     "flops": exponents(rows, "gflops")}
    return out


def versus_non_local(block_rows: list[dict]) -> list[dict]:
    """Non-local cost / block cost at every size both were measured at."""
    baseline = {r["size"]: r for r in block_rows if r["block"] == "non_local"}
    out = []
    for r in block_rows:
        other = baseline.get(r["size"])
        if r["block"] == "non_local" or other is None:
            continue
        ratio = {key: round(other[key] / r[key], 1) if r[key] > 0 else None
                 for key in ("time_s", "peak_extra_mb", "gflops")}
        out.append({"block": r["block"], "size": r["size"], **ratio})
    return out


def markdown(report: dict) -> str:
    fit = report["exponents"]
    lines = [f"Measured by `python benchmarks/scaling.py` ({report['threads']} thread(s), {report['clock']} clock, "
             f"device {report['device']}); b is the fitted exponent of cost ~ voxels^b.", ""]
    if report["pipeline"]:
        line = fit["pipeline"]["memory_line"]
        memory = "" if line is None else (
            f" Peak memory fits {line['fixed_mb']:.0f} MB + {line['bytes_per_voxel']:.0f} bytes per voxel"
            + ("" if line["cube_edge_at_4gb"] is None else
               f", which reaches 4 GB at about {line['voxels_at_4gb'] / 1e6:.0f} M voxels "
               f"({line['cube_edge_at_4gb']}^3)") + ".")
        lines += [f"`attnseg segment` with maps, {report['model']}"
                  + ("" if report["model_trained"] else " (untrained stand-in)")
                  + f": time b = {fit['pipeline']['time']} (predict b = {fit['pipeline']['predict']}), "
                  f"peak memory above the imports b = {fit['pipeline']['memory_above_imports']}." + memory, "",
                  "| cube | voxels | total s | predict s | write s | peak MB |", "|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['size']}^3 | {r['voxels']:,} | {r['total_s']:.2f} | {r['stages_s']['predict']:.2f} | "
                  f"{r['stages_s']['write']:.2f} | {r['peak_rss_mb']:.0f} |" for r in report["pipeline"]]
        lines.append("")
    if report["blocks"]:
        lines += [f"Attention blocks alone on (1, {report['channels']}, n, n, n):", "",
                  "| block | time b | memory b | FLOPs b |", "|---|---:|---:|---:|"]
        lines += [f"| {name} | " + " | ".join("n/a" if f[k] is None else f"{f[k]:.2f}"
                                              for k in ("time", "memory", "flops")) + " |"
                  for name, f in fit.items() if name != "pipeline"]
        ratios = report["versus_non_local"]
        if ratios:
            lines += ["", "Non-local block cost / block cost at the same size:", "",
                      "| block | n | time | peak memory | FLOPs |", "|---|---:|---:|---:|---:|"]
            lines += [f"| {r['block']} | {r['size']} | " + " | ".join(
                "n/a" if r[key] is None else f"{r[key]:g}x" for key in ("time_s", "peak_extra_mb", "gflops")) + " |"
                      for r in ratios]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    rows, fit = report["pipeline"], report["exponents"]

    def loglog(ax, x, y, label, **style):
        ax.loglog(x, y, marker="o", label=label, **{"ls": "-", **style})
        ax.set_xlabel("voxels")
        ax.grid(True, which="both", alpha=0.3)

    if rows:
        voxels = [r["voxels"] for r in rows]
        loglog(axes[0, 0], voxels, [r["total_s"] for r in rows], f"total (b = {fit['pipeline']['time']})")
        loglog(axes[0, 0], voxels, [r["stages_s"]["predict"] for r in rows],
               f"predict (b = {fit['pipeline']['predict']})")
        axes[0, 0].set_title(f"attnseg segment, {report['model']}: time (s)")
        line = fit["pipeline"]["memory_line"]
        loglog(axes[0, 1], voxels, [r["peak_rss_mb"] for r in rows],
               f"peak RSS (above imports: b = {fit['pipeline']['memory_above_imports']})"
               + ("" if line is None else f"\n~ {line['fixed_mb']:.0f} MB + {line['bytes_per_voxel']:.0f} B/voxel"))
        axes[0, 1].axhline(4096, color="red", ls="--", label="4 GB target")
        axes[0, 1].set_title("peak resident memory (MB)")
        edges = [r["size"] for r in rows]
        for stage in (s for s in rows[0]["stages_s"] if s != "predict"):
            axes[0, 2].plot(edges, [100 * r["stages_s"][stage] / r["total_s"] for r in rows], marker="o", label=stage)
        axes[0, 2].set_xlabel("cube edge (voxels)")
        axes[0, 2].set_title("stages besides predict: % of total")
        axes[0, 2].grid(True, alpha=0.3)
    for name in sorted({r["block"] for r in report["blocks"]}):
        block = [r for r in report["blocks"] if r["block"] == name]
        voxels = [r["voxels"] for r in block]
        style = {"color": "black", "ls": "--"} if name == "non_local" else {}
        loglog(axes[1, 0], voxels, [r["time_s"] * 1e3 for r in block], f"{name} (b = {fit[name]['time']})", **style)
        loglog(axes[1, 1], voxels, [max(r["peak_extra_mb"], 0.1) for r in block], f"{name} (b = {fit[name]['memory']})",
               **style)
        loglog(axes[1, 2], voxels, [r["gflops"] for r in block], f"{name} (b = {fit[name]['flops']})", **style)
    axes[1, 0].set_title(f"attention blocks, C = {CHANNELS}: time (ms)")
    axes[1, 1].set_title("peak memory above the input (MB)")
    axes[1, 2].set_title("GFLOPs")
    for ax in axes.flat:
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.suptitle(f"AttnSeg scaling ({report['machine']['processor']}, {report['threads']} thread(s), "
                 f"{report['clock']} clock; "
                 "b: exponent of cost ~ voxels^b)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[64, 96, 128, 160, 192, 224, 256],
                        help="pipeline cube edges in voxels (none: skip the pipeline)")
    parser.add_argument("--block-sizes", type=int, nargs="*", default=[8, 12, 16, 24, 32, 48],
                        help="attention-block feature-map edges (none: skip the blocks)")
    parser.add_argument("--blocks", nargs="*", choices=BLOCKS, default=list(BLOCKS))
    parser.add_argument("--non-local-limit-mb", type=float, default=1024.0,
                        help="largest non-local attention matrix to allocate (default 1024 MB)")
    parser.add_argument("--model", help="package or architecture for the pipeline (default: the default model)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall clock (default) or process CPU time (see inference.py)")
    parser.add_argument("--output", type=Path, default=common.RESULTS_DIR, help="folder for scaling.json/.png")
    parser.add_argument("--json", action="store_true", help="print the report as the last line")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one block measurement, run by the parent
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(block_worker(json.loads(args.worker))))
        return 0
    common.set_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="attnseg-scaling-") as tmp:
        workdir = Path(tmp)
        model = None
        if args.sizes:
            models = common.benchmark_models(workdir, args.model)
            model = next((m for m in models if m.default), models[0]) if args.model is None else models[0]
        pipeline_rows = pipeline(sorted(args.sizes), model, args, workdir) if model else []
        block_rows = blocks(args.blocks, sorted(args.block_sizes), args)
    report = {"benchmark": "scaling", "machine": common.machine(args.threads), "threads": args.threads,
              "clock": args.clock,
              "device": args.device, "model": model.name if model else None,
              "model_trained": model.trained if model else None, "channels": CHANNELS,
              "pipeline": pipeline_rows, "blocks": block_rows, "exponents": fits(pipeline_rows, block_rows),
              "versus_non_local": versus_non_local(block_rows)}
    common.write_report(args.output / "scaling.json", report, markdown(report))
    plot(report, args.output / "scaling.png")
    for name, fit in report["exponents"].items():
        print(f"{name:>10}: " + ", ".join(f"{k} ~ voxels^{v}" for k, v in fit.items()))
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

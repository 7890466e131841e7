"""Parameter counts and FLOPs of every registered architecture, and of their attention blocks alone.

    python benchmarks/model_complexity.py            # tables
    python benchmarks/model_complexity.py --json     # one JSON document

Settings (batch 1, eval-mode forward, each architecture with its registry defaults):

* ``brats``: a 128^3 patch of 4 modalities, 4 classes (the BraTS setting the papers quote);
* ``hippocampus``: the shipped hippocampus config (``--config``): its patch size, modality and class
  counts, and its kwargs for the architecture it names; a patch size that is not a multiple of an
  architecture's ``divisor`` is padded up to one, as the predictor pads.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` on the meta device (nothing is allocated
or run, so 128^3 costs no memory): matrix products and convolutions only, counted as 2 FLOPs per
multiply-add (GMAC = GFLOPs / 2, the unit some papers call FLOPs); normalisation, activations and
softmax are not counted.

Attention blocks: every module of an architecture whose class is in ``ATTENTION_BLOCKS`` is listed
with its input shape, parameters and FLOPs in the ``brats`` setting. Where a paper claims to be
cheaper than non-local attention (MDA-U-Net's dense position attention, RSANet's slice attention),
the block is set against an embedded-Gaussian non-local block (Wang et al. 2018, C/2 inner
channels) on the same input: FLOPs and the number of attention-map entries each needs.
The difficulty-aware network's confidence network ("half the feature maps, one conv per stage, to
save memory") shows up in the per-component table, next to its segmenter.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch
import yaml
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from AttnSegLib import models

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "training" / "configs" / "hippocampus_unet.yaml"

# Class names of the attention blocks to report on their own (blocks.py and the model files).
ATTENTION_BLOCKS = (
    "SqueezeExcitation", "DensePositionAttention", "ChannelSelfAttention", "MultiDimensionalSelfAttention",
    "FactorisedSpatialAttention", "RecurrentSliceAttention", "SupervisedAttentionModule",
)
# Blocks whose paper claims to be cheaper than non-local attention: name -> attention-map entries
# per case for an input of shape (N, C, D, H, W).
NON_LOCAL_CLAIMS = {
    "DensePositionAttention": lambda module, c, d, h, w: 2 * module.assign.out_channels * d * h * w,
    "RecurrentSliceAttention": lambda module, c, d, h, w: d * d + h * h + w * w,
}


class NonLocalBlock(nn.Module):
    """Embedded-Gaussian non-local block (Wang et al., CVPR 2018), the baseline of the attention
    claims: z = W_z softmax(theta(x)^T phi(x)) g(x) + x, 1x1x1 convs with C/2 inner channels.
    (N, C, D, H, W) -> (N, C, D, H, W); its attention map is S x S for S = D*H*W voxels."""

    def __init__(self, channels: int):
        super().__init__()
        inner = max(channels // 2, 1)
        self.theta, self.phi, self.g = (nn.Conv3d(channels, inner, 1) for _ in range(3))
        self.out = nn.Conv3d(inner, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query, key, value = (f(x).flatten(2) for f in (self.theta, self.phi, self.g))  # (N, C/2, S)
        attention = torch.softmax(query.transpose(1, 2) @ key, dim=2)                  # (N, S, S)
        y = (value @ attention.transpose(1, 2)).view(x.shape[0], -1, *x.shape[2:])
        return self.out(y) + x


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def padded(size, divisor: int) -> tuple[int, ...]:
    return tuple(int(math.ceil(s / divisor) * divisor) for s in size)


def count_forward(network: nn.Module, x: torch.Tensor) -> tuple[int, dict[str, int], dict[str, tuple]]:
    """Eval forward of ``network`` on meta ``x`` -> (total FLOPs, FLOPs per module name, input shape
    per attention-block name). Module names are dotted paths inside ``network`` ("" for itself);
    each FLOP is attributed to the innermost module running when it happens, so a module's cost is
    the sum over its name and the names below it, whichever module called it."""
    counter = FlopCounterMode(display=False)
    names = {module: name for name, module in network.named_modules()}
    shapes: dict[str, tuple] = {}
    own: dict[str, int] = defaultdict(int)
    calls: list[list] = []  # [name, total FLOPs at entry, FLOPs of the calls nested in it]

    def enter(module, args):
        name = names[module]
        if type(module).__name__ in ATTENTION_BLOCKS:
            shapes.setdefault(name, tuple(args[0].shape))
        calls.append([name, counter.get_total_flops(), 0])

    def leave(module, args, output):
        name, start, nested = calls.pop()
        inclusive = counter.get_total_flops() - start
        own[name] += inclusive - nested
        if calls:
            calls[-1][2] += inclusive

    hooks = [hook for module in names
             for hook in (module.register_forward_pre_hook(enter), module.register_forward_hook(leave))]
    try:
        with counter, torch.no_grad():
            network(x)
    finally:
        for hook in hooks:
            hook.remove()
    return counter.get_total_flops(), dict(own), shapes


def subtree(flops: dict[str, int], prefix: str) -> int:
    """FLOPs of module ``prefix`` and everything below it."""
    return sum(count for name, count in flops.items() if name == prefix or name.startswith(prefix + "."))


def block_flops(block: nn.Module, shape) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        block(torch.empty(shape, device="meta"))
    return counter.get_total_flops()


def measure(name: str, in_channels: int, num_classes: int, size, kwargs: dict) -> dict:
    with torch.device("meta"):
        network = models.build(name, in_channels, num_classes, **kwargs).eval()
        patch = padded(size, network.divisor)
        flops, per_module, shapes = count_forward(network, torch.empty(1, in_channels, *patch))
    components = [
        {"name": child, "parameters": parameter_count(module), "gflops": subtree(per_module, child) / 1e9}
        for child, module in network.named_children()
    ]
    blocks = []
    for block_name, shape in shapes.items():
        module = network.get_submodule(block_name)
        entry = {"name": block_name, "type": type(module).__name__, "input": list(shape),
                 "parameters": parameter_count(module), "gflops": subtree(per_module, block_name) / 1e9}
        claim = NON_LOCAL_CLAIMS.get(entry["type"])
        if claim is not None:
            n, c, d, h, w = shape
            baseline = NonLocalBlock(c).to("meta")
            entry["attention_entries"] = n * claim(module, c, d, h, w)
            entry["non_local"] = {"parameters": parameter_count(baseline),
                                  "gflops": block_flops(baseline, shape) / 1e9,
                                  "attention_entries": n * (d * h * w) ** 2}
        blocks.append(entry)
    parameters = parameter_count(network)
    return {"architecture": name, "kwargs": kwargs, "in_channels": in_channels, "num_classes": num_classes,
            "patch": list(patch), "parameters": parameters, "megabytes_float32": parameters * 4 / 1e6,
            "gflops": flops / 1e9, "components": components, "attention_blocks": blocks}


def settings(config_path: Path) -> dict[str, dict]:
    config = yaml.safe_load(config_path.read_text())
    try:
        hippocampus = {
            "size": tuple(config["patch_size"]), "in_channels": len(config["data"]["modalities"]),
            "num_classes": len(config["data"]["classes"]),
            "kwargs": {config["model"]["architecture"]: dict(config["model"].get("kwargs") or {})},
            "source": str(config_path.relative_to(REPO) if config_path.is_relative_to(REPO) else config_path),
        }
    except (KeyError, TypeError) as error:
        raise SystemExit(f"{config_path}: not a training config with patch_size, data.modalities, data.classes "
                         f"and model ({error!r}); pass --config training/configs/<name>.yaml")
    brats = {"size": (128, 128, 128), "in_channels": 4, "num_classes": 4, "kwargs": {}, "source": "BraTS-sized"}
    return {"brats": brats, "hippocampus": hippocampus}


def run(config_path: Path) -> dict:
    results = {}
    for setting, spec in settings(config_path).items():
        results[setting] = {
            "source": spec["source"], "size": list(spec["size"]), "in_channels": spec["in_channels"],
            "num_classes": spec["num_classes"],
            "architectures": [measure(name, spec["in_channels"], spec["num_classes"], spec["size"],
                                      spec["kwargs"].get(name, {})) for name in models.names()],
        }
    return {"torch": torch.__version__, "flops_convention": "2 FLOPs per multiply-add; convs and matmuls only",
            "settings": results}


def print_tables(report: dict) -> None:
    for setting, result in report["settings"].items():
        modalities = f"{result['in_channels']} modalit{'y' if result['in_channels'] == 1 else 'ies'}"
        print(f"\n== {setting}: {modalities}, {result['num_classes']} classes, "
              f"patch {'x'.join(map(str, result['size']))} ({result['source']})")
        print(f"{'architecture':<18}{'patch':>14}{'parameters':>13}{'MB fp32':>9}{'GFLOPs':>10}")
        for arch in result["architectures"]:
            print(f"{arch['architecture']:<18}{'x'.join(map(str, arch['patch'])):>14}{arch['parameters']:>13,}"
                  f"{arch['megabytes_float32']:>9.2f}{arch['gflops']:>10.2f}")
    brats = report["settings"]["brats"]
    print("\n== components (top-level submodules), brats setting")
    for arch in brats["architectures"]:
        parts = ", ".join(f"{c['name']} {c['parameters']:,} p / {c['gflops']:.2f} GF" for c in arch["components"])
        print(f"{arch['architecture']:<18}{parts}")
    print("\n== attention blocks alone, brats setting (input: the block's forward input)")
    print(f"{'architecture':<18}{'block':<24}{'type':<31}{'input':>20}{'parameters':>12}{'GFLOPs':>12}")
    for arch in brats["architectures"]:
        for block in arch["attention_blocks"]:
            print(f"{arch['architecture']:<18}{block['name']:<24}{block['type']:<31}"
                  f"{'x'.join(map(str, block['input'])):>20}{block['parameters']:>12,}{block['gflops']:>12.4f}")
            if "non_local" in block:
                baseline = block["non_local"]
                print(f"{'':<18}{'  non-local block (Wang et al.) on the same input':<75}"
                      f"{baseline['parameters']:>12,}{baseline['gflops']:>12.4f}")
                print(f"{'':<18}  ratio non-local / block: FLOPs x{baseline['gflops'] / max(block['gflops'], 1e-12):,.0f}, "
                      f"attention-map entries x{baseline['attention_entries'] / block['attention_entries']:,.0f} "
                      f"({baseline['attention_entries']:,} vs {block['attention_entries']:,})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="training config giving the hippocampus patch size, modalities and classes")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    report = run(args.config.resolve())
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        print()
    else:
        print_tables(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

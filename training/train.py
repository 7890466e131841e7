"""Train a network from a config.

    python -m training.train --config training/configs/hippocampus_unet.yaml [--output runs/x] [--resume]
    torchrun --nproc_per_node 4 -m training.train --config ...     (DistributedDataParallel)

``--config`` may be a path or a name in ``training/configs``; with ``--resume`` and ``--output`` it may be
left out, and the run's own ``config.yaml`` is used.
"""
from __future__ import annotations

import argparse
import sys

import torch

from AttnSegLib.package import PackageError

from .config import ConfigError, load_config, resolve_path
from .data import DatasetError
from .engine import ResumeError, Trainer


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (path or name in training/configs)")
    parser.add_argument("--output", help="run folder (default: the config's output_dir)")
    parser.add_argument("--resume", action="store_true", help="continue the run in the output folder exactly")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default auto)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (e.g. 1 on a shared machine)")
    parser.add_argument("--stop-at", type=int, metavar="ITER",
                        help="stop at this iteration with a resumable checkpoint (train in time-limited slices)")
    parser.add_argument("--strict", action="store_true",
                        help="refuse a corrections folder with an unusable case (default: skip it with a warning)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (log files)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.config:
            config = load_config(args.config)
        elif args.resume and args.output:
            config = load_config(resolve_path(args.output) / "config.yaml")
        else:
            raise ConfigError("give --config (or --resume with --output to continue a run with its own config)")
        trainer = Trainer(config, args.output, resume=args.resume, device=args.device,
                          progress=not args.no_progress, strict=args.strict)
        for key, (old, new) in trainer.resume_changes.items():
            print(f"resuming with {key} changed from {old!r} to {new!r} (recorded in the run's config.yaml "
                  "and history)")
        best = trainer.fit(stop_at=args.stop_at)
    except (ConfigError, DatasetError, ResumeError, PackageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    total = trainer.config["training"]["iterations"]
    if trainer.is_main and trainer.iteration < total and args.stop_at is not None:
        print(f"stopped at iteration {trainer.iteration} of {total} (--stop-at {args.stop_at}); the checkpoint "
              f"is in {trainer.checkpoints}; continue with: python -m training.train --output {trainer.output} "
              "--resume")
    if trainer.is_main and best.get("iteration") is not None:
        print(f"best validation mean Dice {best['mean_dice']:.4f} at iteration {best['iteration']}; "
              f"run folder {trainer.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

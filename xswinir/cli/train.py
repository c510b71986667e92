"""``xswinir train``: train SwinIR with the combined loss on Ray Train (local single-node or a cluster)."""

from __future__ import annotations

import argparse

from xswinir.config import Config, load_config
from xswinir.errors import UserError
from xswinir.lease import Lease
from xswinir.paths import experiment_path, location_of, log_dir

HELP = "train SwinIR on Ray Train, locally or on a cluster"


def add_set_argument(parser: argparse.ArgumentParser, what: str = "a config value",
                     example: str = "train.lr=1e-4") -> None:
    """``--set KEY=VALUE`` (repeatable) into ``args.overrides``: the one definition every sub-command uses."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override {what}, e.g. --set {example} (repeatable; the value is YAML)")


def add_config_arguments(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument("--config", "-c", default=default,
                        help="YAML config file, or the name of a shipped one (demo, swinir_s_x2, xswinir_blur_noise)")
    add_set_argument(parser)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--num-workers", type=int, help="Ray Train workers (run.num_workers)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker (run.use_gpu)")
    parser.add_argument("--address", help="join the Ray cluster at this address instead of starting a local one")
    parser.add_argument("--storage", help="folder or URI (s3://, gs://) for checkpoints (run.storage)")
    parser.add_argument("--name", help="run name (run.name); a rerun with the same name needs --resume")
    parser.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    for flag, key in (("num_workers", "run.num_workers"), ("address", "run.address"), ("storage", "run.storage"),
                      ("name", "run.name")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    if getattr(args, "gpu", False):
        overrides.append("run.use_gpu=true")
    return load_config(args.config, overrides)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)  # before Ray is imported: a bad config is refused in a second
    if args.print_config:
        print(cfg.to_yaml())
        return 0

    # Here, not at the top: torch and Ray stay off the command line's start-up path (`xswinir --help`).
    import ray.train

    from xswinir.metrics import VAL_PSNR_BICUBIC_Y, VAL_PSNR_Y
    from xswinir.trainer import failure_message, fit

    # One process per run folder: a second `train --name` would interleave its checkpoints with this one's.
    with Lease(experiment_path(cfg.run.storage, cfg.run.name), "xswinir train",
               hint="wait for it to end, or choose another run name (--name)"):
        try:
            result = fit(cfg, resume=args.resume)
        except ray.train.TrainingFailedError as err:
            raise UserError(failure_message(err, log_dir(cfg.run.storage, cfg.run.name, cfg.run.log_dir))) from err
    metrics = result.metrics or {}
    print(f"run: {cfg.run.name}  step: {metrics.get('step')}  "
          f"val Y-PSNR: {metrics.get(VAL_PSNR_Y, float('nan')):.3f} dB "
          f"(bicubic {metrics.get(VAL_PSNR_BICUBIC_Y, float('nan')):.3f} dB)")
    if result.checkpoint is not None:
        print(f"checkpoint: {location_of(result.checkpoint.filesystem, result.checkpoint.path)}")  # s3://... kept
    return 0

"""``xswinir tune``: a Ray Tune sweep (Optuna TPE + ASHA) over training configs, with a λ = 0 baseline."""

from __future__ import annotations

import argparse

from xswinir.cli.train import add_set_argument
from xswinir.lease import Lease

HELP = "hyper-parameter sweep on Ray Tune + Optuna (λ, patch size, ...), always against a λ=0 baseline"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default="sweep_demo",
                        help="sweep YAML, or the name of a shipped one (default: %(default)s)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted sweep <storage>/<name>; errored trials run again. Refused if "
                             "the files Ray would unpickle differ from the manifest this machine's key signed")
    parser.add_argument("--address", help="join the Ray cluster at this address instead of starting a local one")
    parser.add_argument("--storage", help="folder or URI (s3://, gs://) the sweep goes under (sweep storage)")
    parser.add_argument("--name", help="sweep name: its folder under the storage")
    parser.add_argument("--num-samples", type=int, help="trials in all, the baseline included")
    add_set_argument(parser, "a training config value in every trial", "run.use_gpu=true")


def run(args: argparse.Namespace) -> int:
    # Here, not at the top: torch and Ray stay off the command line's start-up path (`xswinir --help`).
    from xswinir.tune.results import format_table
    from xswinir.tune.sweep import run_sweep
    from xswinir.tune.sweep_config import load_sweep_config

    sweep = load_sweep_config(args.config, args.overrides, storage=args.storage, name=args.name,
                              num_samples=args.num_samples, address=args.address)
    # One driver per sweep folder: two would start the same trials into one Tune experiment.
    with Lease(sweep.experiment_path(), "xswinir tune", hint="wait for it to end, or choose another sweep --name"):
        summary = run_sweep(sweep, resume=args.resume)
    print(format_table(summary.rows, sweep))
    print(f"results: {summary.experiment_path}")
    for name, path in summary.files.items():
        print(f"  {name}: {path}")
    if not summary.finished:
        print(f"the sweep stopped after {len(summary.rows)} of {sweep.num_samples} trials; continue it with "
              f"`xswinir tune --config {args.config} --resume` (and the same --storage/--name)")
        return 130
    if summary.best is None:
        print("no trial reported the metric")
        return 1
    return 0

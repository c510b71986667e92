"""``xswinir study``: does the texture term help? Every arm x every seed on Ray Tune, paired differences."""

from __future__ import annotations

import argparse

from xswinir.cli.train import add_set_argument
from xswinir.config import PACKAGED_CONFIGS
from xswinir.errors import UserError
from xswinir.lease import Lease
from xswinir.storage import check_writable

# HELP is also the command's line in `xswinir --help`, which argparse %-formats: hence "%%" there, and a
# description of its own below (argparse prints descriptions as they are).
HELP = "controlled study on Ray Tune: λ=0 against texture-term arms, several seeds, paired 95%% intervals"
DESCRIPTION = HELP.replace("%%", "%")


def shipped_studies() -> list[str]:
    """The names of the study configs shipped with the package (``study_cpu``, ``study_screen``, ...)."""
    return sorted(path.stem for path in PACKAGED_CONFIGS.glob("study*.yaml"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.add_argument("--config", "-c", default="study_cpu",
                        help=f"study YAML, or the name of a shipped one: {', '.join(shipped_studies())} "
                             "(default: %(default)s)")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted study <storage>/<name>")
    parser.add_argument("--report-only", action="store_true",
                        help="only (re)write study.md/.parquet/.png from the finished trials")
    parser.add_argument("--pick", action="store_true",
                        help="with --report-only: apply the pre-registered pick rule (docs/study_texture/"
                             "PREREGISTRATION.md) to the finished screen and print which arm the confirm stage tests")
    parser.add_argument("--confirm", action="store_true",
                        help="with --report-only: the confirm stage's registered analysis (primary interval, the "
                             "power rule's seed count, the answer, the per-image bootstrap)")
    parser.add_argument("--join", nargs="+", metavar="NAME", dest="joins",
                        help="with --report-only: finished trials of these studies (same storage) count as this "
                             "one's, for seeds run later under another --name; list every seed with --seeds")
    parser.add_argument("--export-models", metavar="DIR",
                        help="then write each finished trial's final EMA weights to DIR/<arm>_s<seed>.safetensors "
                             "with an index, DIR/README.md (a folder or a URI; also with --report-only)")
    parser.add_argument("--address", help="join the Ray cluster at this address instead of starting a local one")
    parser.add_argument("--storage", help="folder or URI (s3://bucket/studies) the study goes under")
    parser.add_argument("--name", help="study name: its folder under the storage")
    parser.add_argument("--seeds", type=int, nargs="+", help="replace the study's seeds")
    add_set_argument(parser, "a training config value in every arm", "train.total_steps=100")


def run(args: argparse.Namespace) -> int:
    # Here, not at the top: torch stays off the command line's start-up path (`xswinir --help`).
    from xswinir.tune.study import (
        MODELS_INDEX,
        confirm_report,
        export_models,
        load_study_config,
        pick_report,
        run_study,
        write_report,
    )

    study = load_study_config(args.config, args.overrides, storage=args.storage, name=args.name, seeds=args.seeds,
                              address=args.address, joins=args.joins)
    for flag in ("pick", "confirm", "joins"):
        if getattr(args, flag) and not args.report_only:
            raise UserError(f"--{flag.rstrip('s')} analyses a finished study: use it with --report-only")
    if args.export_models:
        check_writable(args.export_models)  # before the study runs, not after it
    if args.report_only:
        report = write_report(study)
    else:  # one driver per study folder: two would train the same (arm, seed) runs at once
        with Lease(study.experiment_path(), "xswinir study", hint="wait for it to end, or choose another --name"):
            report = run_study(study, resume=args.resume)
    print(report)
    print(f"results: {study.experiment_path()} (study.md, study.parquet, study_psnr.png, train/<arm>_s<seed>/)")
    if args.pick:
        print(pick_report(study))
    if args.confirm:
        print(confirm_report(study))
    if args.export_models:
        models = export_models(study, args.export_models)
        print(f"models: {len(models)} in {args.export_models} (<arm>_s<seed>.safetensors, {MODELS_INDEX})")
    return 0

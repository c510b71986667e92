"""What Ray Train costs: steps/s of a 1-worker Ray Train run against the same loop in plain PyTorch, and 1
against 2 workers, side by side in one run.

    python -m bench.bench_train [--quick]

Steady-state throughput comes from the trainer's own metrics.jsonl (steps/s per log window, the first window
dropped as warm-up); the fixed start-up cost of a Ray run (ray.init, worker group, first report) is reported
apart, since it does not grow with the run.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import parse_args, print_table, write_json
from xswinir.config import Config, apply_overrides, load_config

OVERRIDES = {
    "run.cpus_per_worker": 1.0,  # two 1-CPU workers fit on a 2-core machine
    "train.log_every": 10,
    "run.progress": False,
    "data.loader_workers": 0,
    "data.val": "skimage:coins",
}


def plain_pytorch_steps_per_s(cfg: Config, steps: int, warmup: int) -> float:
    """The trainer's own parts and step in a plain loop: same model, batches, degradations and loss, no Ray."""
    from xswinir.data import build_train_batches
    from xswinir.texture import load_texture_classifier
    from xswinir.trainer import build_training_parts, run_step

    classifier = load_texture_classifier(cfg.texture.classifier.path) if cfg.texture_enabled else None
    parts = build_training_parts(cfg, torch.device("cpu"), classifier)
    batches = build_train_batches(cfg, rank=0, world_size=1, start_step=0)
    start = time.perf_counter()
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        run_step(parts, parts.model, cfg.train, step, 0, next(batches))
    return steps / (time.perf_counter() - start)


def ray_steps_per_s(cfg: Config, workdir: Path, name: str) -> tuple[float, float]:
    """Steady-state steps/s and the whole wall time of one Ray Train run."""
    from xswinir.paths import log_dir
    from xswinir.trainer import fit
    from xswinir.training_log import METRICS_FILE, read_metrics

    cfg = apply_overrides(cfg, {"run.name": name, "run.storage": str(workdir / "runs"),
                                "run.log_dir": str(workdir / name)})
    start = time.perf_counter()
    fit(cfg)
    wall = time.perf_counter() - start
    metrics = log_dir(cfg.run.storage, cfg.run.name, cfg.run.log_dir) / METRICS_FILE
    rates = [r["steps_per_s"] for r in read_metrics(metrics) if "steps_per_s" in r]
    return statistics.median(rates[1:]), wall


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "bench/results/train.json")
    import ray

    steps = 40 if args.quick else 150
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        cfg = apply_overrides(load_config("demo"), {**OVERRIDES, "train.total_steps": steps + 10,
                                                    "train.val_every": steps + 10})
        # One classifier for all variants, trained before any timing.
        from xswinir.texture.payload import classifier_payload

        cfg = apply_overrides(cfg, {"run.storage": str(workdir / "runs")})
        cfg = apply_overrides(cfg, {"texture.classifier.path": str(classifier_payload(cfg).path)})
        # Ray gives each worker OMP_NUM_THREADS = its CPUs (run.cpus_per_worker = 1): the plain loop gets the same.
        torch.set_num_threads(int(cfg.run.cpus_per_worker))
        plain = plain_pytorch_steps_per_s(cfg, steps, warmup=10)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        one, wall_one = ray_steps_per_s(cfg, workdir, "one_worker")
        two_cfg = apply_overrides(cfg, {"run.num_workers": 2})
        two, wall_two = ray_steps_per_s(two_cfg, workdir, "two_workers")
        ray.shutdown()
    batch = cfg.train.batch_size
    rows = [
        {"variant": "plain PyTorch loop", "workers": 1, "steps_per_s": plain, "samples_per_s": plain * batch,
         "vs_plain": 1.0, "wall_s": None},
        {"variant": "Ray Train", "workers": 1, "steps_per_s": one, "samples_per_s": one * batch,
         "vs_plain": one / plain, "wall_s": wall_one},
        {"variant": "Ray Train (DDP, gloo)", "workers": 2, "steps_per_s": two, "samples_per_s": two * batch,
         "vs_plain": two / plain, "wall_s": wall_two},
    ]
    print_table(rows, f"demo config, total batch {batch}, {steps} timed steps, torch threads {torch.get_num_threads()}")
    print(f"Ray overhead per step (1 worker): {100 * (1 - one / plain):.1f} %  (goal: at most 10 %)")
    write_json(args.json, "train", rows, steps=steps, batch_size=batch)


if __name__ == "__main__":
    main()

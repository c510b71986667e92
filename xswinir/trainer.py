"""The XSwinIR trainer on Ray Train: the same code on a laptop and on a GPU cluster.

One step reads in the order things happen::

    lr -> batch -> degrade (on the device) -> SwinIR -> combined loss -> backward -> clip -> step -> EMA

and every ``train.val_every`` steps: validate the EMA model (Y-PSNR/SSIM against plain bicubic), write a
checkpoint, ``ray.train.report``. Ray touch points carry Ray's numbered comments (``# [1] ...``).

Resuming is exact: the batch and the degradations of step t depend only on (seed, t, rank), and a checkpoint
holds the weights, the EMA weights, the optimizer, the step and the RNG states. A run restarted with the
same name and storage (``--resume``), or restarted by Ray after a worker failure, continues from the latest
checkpoint and sees the same data it would have seen.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from xswinir.checkpoint import classifier_from_payload, classifier_payload, load_checkpoint, save_checkpoint
from xswinir.config import Config, RunConfig, TrainConfig
from xswinir.errors import UserError
from xswinir.evaluation import build_validation_set, validate
from xswinir.storage import is_remote, log_dir, storage_path

log = logging.getLogger(__name__)

# Fault injection for the recovery tests and for trying out a cluster's failure handling: the first attempt
# of a run raises in rank 0 after this many steps.
FAILURE_ENV = "XSWINIR_INJECT_FAILURE_AT_STEP"


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """The learning rate of step ``step`` (0-based): linear warm-up, then multistep or cosine decay.

    A pure function of the step, so a resumed run continues the schedule without state.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.scheduler == "multistep":
        return cfg.lr * cfg.gamma ** bisect.bisect_right(cfg.milestones, step)
    progress = (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def step_seed(seed: int, step: int, rank: int) -> int:
    """A seed for the random draws of one step on one rank (degradations), independent of history."""
    return (seed * 1_000_003 + step) * 1_009 + rank


def train_step(
    model: nn.Module,
    degrader: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    generator: torch.Generator,
    grad_clip: float | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """One optimisation step on one batch; returns detached 0-dim tensors (no CPU-GPU sync).

    Args:
        batch: ``gt`` (B, C, H, W) in [0, 1], and for the texture term ``region``, ``gt_offset``,
            ``region_valid`` (see ``xswinir.data``), already on the model's device.
        generator: draws the per-sample degradation parameters.
    """
    gt = batch["gt"]
    with torch.no_grad():
        lq, _ = degrader(gt, generator)
    with torch.autocast(gt.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        sr = model(lq)
    total, parts = loss_fn(
        sr.float(), gt, batch.get("region"), batch.get("gt_offset"), batch.get("region_valid"), lq=lq
    )
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    out = {"loss": total.detach(), **{f"loss_{k}" if k in ("pixel", "texture") else k: v.detach()
                                      for k, v in parts.items()}}
    if grad_clip:
        out["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return out


@dataclass
class TrainingParts:
    """Everything one worker trains with, built from the config."""

    model: nn.Module
    ema: Any  # timm.utils.ModelEmaV3
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    degrader: nn.Module


def build_training_parts(cfg: Config, device: torch.device, classifier: nn.Module | None) -> TrainingParts:
    """The model, its EMA, Adam, the combined loss and the degrader of a run, on ``device``."""
    from timm.utils import ModelEmaV3

    from xswinir.degradations import build_degrader
    from xswinir.losses import build_loss
    from xswinir.model import build_swinir

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_swinir(cfg.model).to(device)
    return TrainingParts(
        model=model,
        ema=ModelEmaV3(model, decay=cfg.train.ema_decay),
        optimizer=torch.optim.Adam(model.parameters(), lr=cfg.train.lr, betas=cfg.train.betas,
                                   weight_decay=cfg.train.weight_decay),
        loss_fn=build_loss(cfg, classifier).to(device),
        degrader=build_degrader(cfg.degradation, cfg.scale).to(device),
    )


def run_step(parts: TrainingParts, model: nn.Module, cfg: TrainConfig, step: int, rank: int,
             batch: dict[str, torch.Tensor], autocast_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Step ``step`` of the schedule: learning rate, degradation seed, :func:`train_step`, EMA update.

    Args:
        model: ``parts.model`` itself, or its DDP wrapper.
        batch: already on the model's device.
    """
    lr = learning_rate(step, cfg)
    for group in parts.optimizer.param_groups:
        group["lr"] = lr
    device = batch["gt"].device
    generator = torch.Generator(device=device).manual_seed(step_seed(cfg.seed, step, rank))
    out = train_step(model, parts.degrader, parts.loss_fn, parts.optimizer, batch, generator, cfg.grad_clip,
                     autocast_dtype)
    parts.ema.update(parts.model, step=step)
    return out


def _train_batches(cfg: Config, rank: int, world_size: int, start_step: int) -> Iterator[dict[str, torch.Tensor]]:
    from xswinir.shards import is_shard_source

    if is_shard_source(cfg.data.train):
        import ray.train

        from xswinir.shards import batches_from_ray_shard

        # [2] Each worker streams its own share of the Parquet shards through Ray Data.
        return batches_from_ray_shard(ray.train.get_dataset_shard("train"), cfg, rank, start_step)
    from xswinir.data import build_train_batches

    return build_train_batches(cfg, rank, world_size, start_step)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train worker function: builds everything from the config dict and trains."""
    import ray.train
    import ray.train.torch

    from xswinir.metrics import VAL_PSNR_Y
    from xswinir.training_log import MetricsWriter

    cfg = Config.from_dict(loop_config["config"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    per_worker_batch = cfg.train.batch_size // world_size
    if rank == 0:
        log.info("world size %d: batch %d per worker, %d in total", world_size, per_worker_batch,
                 cfg.train.batch_size)

    classifier, classifier_dir = classifier_from_payload(loop_config.get("classifier"), device)
    parts = build_training_parts(cfg, device, classifier)
    model, ema, optimizer = parts.model, parts.ema, parts.optimizer

    # [1] Resume from the latest checkpoint: after a worker failure, or a relaunch with the same name.
    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            start_step = load_checkpoint(Path(directory), model, ema.module, optimizer)
        log.info("rank %d resumed at step %d", rank, start_step)

    # [3] Wrap in DDP (only when world size > 1) and move to the device.
    ddp_model = ray.train.torch.prepare_model(model)
    batches = _train_batches(cfg, rank, world_size, start_step)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" and cfg.train.bf16 else None
    writer = MetricsWriter(loop_config["log_dir"], start_step) if rank == 0 else None
    val_set = build_validation_set(cfg, parts.degrader, device) if rank == 0 else None
    failure_step = int(os.environ.get(FAILURE_ENV, "0"))
    failure_marker = Path(loop_config["log_dir"]) / ".failure_injected"

    window_start, window_steps = time.perf_counter(), 0
    sums: dict[str, torch.Tensor] = {}
    for step in range(start_step, cfg.train.total_steps):
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        out = run_step(parts, ddp_model, cfg.train, step, rank, batch, autocast_dtype)
        for key, value in out.items():
            sums[key] = sums.get(key, 0.0) + value
        window_steps += 1
        done = step + 1

        if rank == 0 and failure_step and done == failure_step and not failure_marker.exists():
            failure_marker.touch()
            raise RuntimeError(f"failure injected at step {done} ({FAILURE_ENV})")

        if writer is not None and (done % cfg.train.log_every == 0 or done == cfg.train.total_steps):
            elapsed = time.perf_counter() - window_start
            # .item() syncs with the device: only on log steps.
            metrics = {f"train/{k}": (v / window_steps).item() for k, v in sums.items()}
            metrics.update({"lr": learning_rate(step, cfg.train), "steps_per_s": window_steps / max(elapsed, 1e-9)})
            writer.write(done, metrics)
            window_start, window_steps, sums = time.perf_counter(), 0, {}

        if done % cfg.train.val_every == 0 or done == cfg.train.total_steps:
            report: dict[str, Any] = {"step": done}
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    report.update(validate(ema.module, val_set, cfg.scale, cfg.data.val_tile))
                    writer.write(done, {k: v for k, v in report.items() if k != "step"})
                    save_checkpoint(Path(tmp), cfg, model, ema.module, optimizer, done, classifier_dir)
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                    log.info("step %d: %s = %.3f dB", done, VAL_PSNR_Y, report[VAL_PSNR_Y])
                # [4] Every rank reports; rank 0 attaches the checkpoint.
                ray.train.report(report, checkpoint=ckpt)
    if writer is not None:
        writer.close()


def init_ray(run: RunConfig) -> None:
    """Starts a local single-node Ray (no address) or joins the cluster at ``run.address``.

    Inside a Ray Job, ``RAY_ADDRESS`` names the job's cluster: the run joins it, and passes no runtime
    environment of its own, which would clash with the job's.
    """
    import ray

    if ray.is_initialized():
        return
    address = run.address or os.environ.get("RAY_ADDRESS")
    try:
        if address is None:
            # "local" always starts a fresh instance, never a `ray start` cluster that happens to run here.
            ray.init(address="local", runtime_env={"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}})
        else:
            ray.init(address=address)
    except (ConnectionError, RuntimeError) as err:
        raise UserError(f"cannot connect to the Ray cluster at {address}: {err}") from err


def build_trainer(cfg: Config, callbacks: list | None = None, classifier: dict[str, bytes] | None = None):
    """A Ray Train ``TorchTrainer`` for the config; Ray Tune builds one per trial with this."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from xswinir.shards import is_shard_source, read_shards

    datasets, dataset_config = None, None
    if is_shard_source(cfg.data.train):
        from ray.data import ExecutionOptions

        datasets = {"train": read_shards(cfg.data.train)}
        # A resumed run skips the rows it has already seen: only exact when Ray Data keeps the row order.
        dataset_config = ray.train.DataConfig(execution_options=ExecutionOptions(preserve_order=True))
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "classifier": classifier, "log_dir": str(log_dir(cfg.run))},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu,
            resources_per_worker={"CPU": cfg.run.cpus_per_worker, **({"GPU": 1} if cfg.run.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage_path(cfg.run),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            # A worker group that can never be scheduled must fail, not retry forever (Ray's default).
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures, controller_failure_limit=3),
            callbacks=callbacks,
            worker_runtime_env={"env_vars": {FAILURE_ENV: os.environ[FAILURE_ENV]}} if FAILURE_ENV in os.environ
            else None,
        ),
        datasets=datasets,
        dataset_config=dataset_config,
    )


def run_exists(run: RunConfig) -> bool:
    if is_remote(run.storage):
        return False  # checked by Ray itself on remote storage
    return (Path(storage_path(run)) / run.name).is_dir() and any((Path(storage_path(run)) / run.name).iterdir())


def fit(cfg: Config, resume: bool = False, callbacks: list | None = None, classifier_cache: Path | None = None):
    """Trains on Ray (local single-node when ``cfg.run.address`` is None) and returns the ``ray.train.Result``.

    ``classifier_cache`` holds texture classifiers trained on the fly (default ``<storage>/classifiers``);
    the trials of a sweep share one.

    Raises:
        UserError: the run exists and ``resume`` is False, or ``resume`` is True and there is nothing to
            resume; the cluster cannot be reached.
    """
    from xswinir.training_log import CURVES_FILE, METRICS_FILE, ProgressFollower, plot_training_curves

    if run_exists(cfg.run) and not resume:
        raise UserError(
            f"run '{cfg.run.name}' already exists in {storage_path(cfg.run)}: pass --resume to continue it, or "
            "choose another run.name"
        )
    if resume and not is_remote(cfg.run.storage) and not run_exists(cfg.run):
        raise UserError(f"nothing to resume: no run '{cfg.run.name}' in {storage_path(cfg.run)}")
    cfg, classifier = classifier_payload(cfg, classifier_cache)
    log.info("config:\n%s", cfg.to_yaml())
    init_ray(cfg.run)
    trainer = build_trainer(cfg, callbacks, classifier)
    metrics_path = log_dir(cfg.run) / METRICS_FILE
    local = cfg.run.address is None
    if local and cfg.run.progress:
        with ProgressFollower(metrics_path, cfg.train.total_steps):
            result = trainer.fit()
    else:
        result = trainer.fit()
    curves = plot_training_curves(metrics_path, log_dir(cfg.run) / CURVES_FILE)
    if curves is not None:
        log.info("training curves: %s", curves)
    return result

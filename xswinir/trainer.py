"""The XSwinIR trainer on Ray Train: the same code on a laptop and on a GPU cluster.

One step reads in the order things happen::

    lr -> batch -> degrade (on the device) -> SwinIR -> combined loss -> backward -> clip -> step -> EMA

and every ``train.val_every`` steps: validate the EMA model (Y-PSNR/SSIM against plain bicubic), write a
checkpoint, ``ray.train.report``. Ray touch points carry Ray's numbered comments (``# [1] ...``).

Resuming is exact: every random draw of step t (the batch, its crops, the degradations, stochastic depth)
comes from generators seeded with (seed, t, rank), never from history, and a checkpoint holds the weights,
the EMA weights, the optimizer, the step and every rank's RNG states. A run restarted with the same name and
storage (``--resume``), or restarted by Ray after a worker failure, continues from the newest checkpoint that
passes verification (see ``xswinir.checkpoint.checkpoint_problem``) and computes what the uninterrupted run
would have computed: bit for bit on the CPU (``tests/test_trainer.py``); GPU kernels that are not
deterministic may differ in the last bits.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import logging.handlers
import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from xswinir.checkpoint import (
    MANIFEST_FILE,
    CheckpointError,
    checkpoint_problem,
    classifier_from_payload,
    classifier_payload,
    filesystem_and_path,
    list_checkpoints,
    load_checkpoint,
    load_pretrained,
    newest_good_checkpoint,
    rng_state,
    save_checkpoint,
)
from xswinir.config import Config, RunConfig, TrainConfig
from xswinir.errors import UserError
from xswinir.evaluation import build_validation_set, validate
from xswinir.storage import check_writable, log_dir, storage_path

if TYPE_CHECKING:
    import pyarrow.fs as pafs

log = logging.getLogger(__name__)

# Fault injection for the recovery tests and for trying out a cluster's failure handling: the first attempt
# of a run raises in rank 0 after this many steps.
FAILURE_ENV = "XSWINIR_INJECT_FAILURE_AT_STEP"
# Ray Train V2's run snapshot in the run folder (ray.train.v2._internal.constants): the checkpoints Ray knows.
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
# Seed streams of one step: independent draws for the degradations and for the model (stochastic depth).
DEGRADE_STREAM, MODEL_STREAM = 0, 1


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


def step_seed(seed: int, step: int, rank: int, stream: int = DEGRADE_STREAM) -> int:
    """A seed for one stream of random draws of one step on one rank, independent of history."""
    return ((seed * 1_000_003 + step) * 1_009 + rank) * 8 + stream


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
        batch: ``gt`` (B, C, H, W) in [0, 1], for paired data ``lq`` (then the degrader is not used), and
            for the texture term ``region``, ``gt_offset``, ``region_valid`` (see ``xswinir.data``), already
            on the model's device.
        generator: draws the per-sample degradation parameters.
    """
    gt = batch["gt"]
    if "lq" in batch:  # paired data (data.train_lq): the LQ crops come with the batch
        lq = batch["lq"]
    else:
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
    model = build_swinir(cfg.model)
    if cfg.model.init_from:
        # Before the EMA copy, so that the EMA starts from the pretrained weights too; the optimizer starts
        # afresh (its state only comes back with --resume, which then overwrites these weights).
        load_pretrained(model, cfg.model.init_from, strict=cfg.model.init_strict)
    model = model.to(device)
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
    # Stochastic depth draws from the global RNG (CPU and CUDA): seeded per step, it does not depend on what
    # ran before (a DataLoader started on resume, validation), so a resumed run draws what a straight one does.
    torch.manual_seed(step_seed(cfg.seed, step, rank, MODEL_STREAM))
    out = train_step(model, parts.degrader, parts.loss_fn, parts.optimizer, batch, generator, cfg.grad_clip,
                     autocast_dtype)
    parts.ema.update(parts.model, step=step)
    return out


def _gather(obj: Any, world_size: int) -> list[Any]:
    """``obj`` of every rank, indexed by rank (a collective: every rank calls it)."""
    if world_size == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def _local_copy(path: str, filesystem: pafs.FileSystem) -> Iterator[Path]:
    """A checkpoint folder as a local folder: itself on a local disk, else downloaded to a temporary one."""
    import pyarrow.fs as pafs

    if isinstance(filesystem, pafs.LocalFileSystem):
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="xswinir_checkpoint_") as tmp:
        pafs.copy_files(path, tmp, source_filesystem=filesystem, destination_filesystem=pafs.LocalFileSystem())
        yield Path(tmp)


def resume_training(parts: TrainingParts, checkpoint: str, filesystem: pafs.FileSystem | None = None,
                    rank: int = 0) -> int:
    """Loads ``checkpoint`` into ``parts``, or the newest older checkpoint of its run folder that passes.

    Each candidate is checked on the storage (manifest, names, sizes) and then, once local, by sha256, so
    what is loaded is what was saved. Rank 0 logs one warning per skipped checkpoint; nothing is deleted.

    Args:
        checkpoint: a checkpoint folder inside ``filesystem`` (local when None), e.g. Ray's latest.

    Returns:
        The number of completed steps of the checkpoint loaded.

    Raises:
        CheckpointError: neither ``checkpoint`` nor any older checkpoint of its run folder passes.
    """
    import pyarrow.fs as pafs

    fs = filesystem or pafs.LocalFileSystem()
    checkpoint = str(checkpoint).rstrip("/")
    run_path = checkpoint.rsplit("/", 1)[0]
    older = [p for p in list_checkpoints(run_path, fs) if p < checkpoint]
    problems = []
    for path in [checkpoint, *reversed(older)]:
        problem = checkpoint_problem(path, fs, hashes=False)
        if problem is None:
            with _local_copy(path, fs) as directory:
                problem = checkpoint_problem(directory)
                if problem is None:
                    return load_checkpoint(directory, parts.model, parts.ema.module, parts.optimizer, rank)
        if rank == 0:
            log.warning("skipping checkpoint %s: %s", path, problem)
        problems.append(problem)
    raise CheckpointError(f"none of the {len(problems)} checkpoint(s) in run folder {run_path} passes verification "
                          f"(the newest: {problems[0]}); nothing was deleted")


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train worker function: builds everything from the config dict and trains."""
    import ray.train
    import ray.train.torch

    from xswinir.data import build_train_batches
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

    # [1] Resume from the latest checkpoint: after a worker failure, or a relaunch with the same name. Ray
    # knows none when fit() set its snapshot aside; then the driver's verified choice is the one.
    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        start_step = resume_training(parts, checkpoint.path, checkpoint.filesystem, rank)
    elif loop_config.get("resume_from"):
        fs, path = filesystem_and_path(loop_config["resume_from"])
        start_step = resume_training(parts, path, fs, rank)
    if start_step:
        log.info("rank %d resumed at step %d", rank, start_step)

    # [3] Wrap in DDP (only when world size > 1) and move to the device.
    ddp_model = ray.train.torch.prepare_model(model)
    # Folders and shards alike: DataLoader worker processes decode off this loop, several crops per image.
    batches = build_train_batches(cfg, rank, world_size, start_step)
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
            rng_states = _gather(rng_state(), world_size)
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    report.update(validate(ema.module, val_set, cfg.scale, cfg.data.val_tile))
                    writer.write(done, {k: v for k, v in report.items() if k != "step"})
                    save_checkpoint(Path(tmp), cfg, model, ema.module, optimizer, done, classifier_dir, rng_states)
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                    log.info("step %d: %s = %.3f dB", done, VAL_PSNR_Y, report[VAL_PSNR_Y])
                # [4] Every rank reports; rank 0 attaches the checkpoint.
                ray.train.report(report, checkpoint=ckpt)
    if writer is not None:
        writer.close()


def init_ray(run: RunConfig, logs: Path | None = None) -> None:
    """Starts a local single-node Ray (no address) or joins the cluster at ``run.address``.

    A local Ray keeps its own logs (its start-up lines, worker output, Ray Train's reports) out of the
    console: they stay in Ray's session folder, linked as ``logs/ray`` when ``logs`` is given. With debug
    logging on (``xswinir -v``) they are shown as Ray shows them. Inside a Ray Job, ``RAY_ADDRESS`` names the
    job's cluster: the run joins it, and passes no runtime environment of its own, which would clash with the
    job's.
    """
    import ray

    if ray.is_initialized():
        return
    address = run.address or os.environ.get("RAY_ADDRESS")
    verbose = log.isEnabledFor(logging.DEBUG)
    # Held until the session folder exists, so that what ray.init itself logs goes there too. With
    # configure_logging=False the "ray" logger has no handler during ray.init: its lines reach the last resort.
    held = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1)
    last_resort = logging.lastResort
    try:
        if address is None:
            if not verbose:
                logging.lastResort = held
            # "local" always starts a fresh instance, never a `ray start` cluster that happens to run here.
            ray.init(address="local", runtime_env={"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}},
                     log_to_driver=verbose, configure_logging=verbose)
        else:
            ray.init(address=address)
    except (ConnectionError, RuntimeError) as err:
        raise UserError(f"cannot connect to the Ray cluster at {address}: {err}") from err
    finally:
        logging.lastResort = last_resort
    if address is None:
        _keep_ray_logs(held if not verbose else None, logs)


def _keep_ray_logs(held: logging.handlers.MemoryHandler | None, logs: Path | None) -> None:
    """Links the local Ray's session logs into ``logs``; with ``held``, the driver's own Ray log lines (those
    of ray.init included) go to ``driver.log`` there instead of the console."""
    import ray

    ray_logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    if held is not None:
        to_file = logging.FileHandler(ray_logs / "driver.log")
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        held.setTarget(to_file)
        held.close()  # flushes what ray.init logged
        logging.getLogger("ray").addHandler(to_file)
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)
        link = logs / "ray"
        link.unlink(missing_ok=True)
        link.symlink_to(ray_logs, target_is_directory=True)
    log.debug("Ray's logs: %s", ray_logs)


def failure_limit(run: RunConfig) -> int:
    """``run.max_failures``, or its default: 5 restarts when joining a cluster, 2 on a local Ray.

    On a cluster preemptions and lost nodes are normal over a long run; on one machine a failure is mostly
    a bug that comes back, so a couple of restarts ride out a passing one without looping on a real one.
    """
    if run.max_failures is not None:
        return run.max_failures
    joins_cluster = (run.address or os.environ.get("RAY_ADDRESS")) is not None
    return 5 if joins_cluster else 2


def build_trainer(cfg: Config, callbacks: list | None = None, classifier: dict[str, bytes] | None = None,
                  resume_from: str | None = None):
    """A Ray Train ``TorchTrainer`` for the config; Ray Tune builds one per trial with this.

    Args:
        resume_from: the checkpoint folder to start from when Ray's snapshot names none (see :func:`fit`): an
            absolute path or a URI, since a relative storage path means nothing in a worker's folder.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "classifier": classifier, "log_dir": str(log_dir(cfg.run)),
                           "resume_from": resume_from},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu,
            resources_per_worker={"CPU": cfg.run.cpus_per_worker, **({"GPU": 1} if cfg.run.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage_path(cfg.run),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            # A worker group that can never be scheduled must fail, not retry forever (Ray's default).
            failure_config=ray.train.FailureConfig(max_failures=failure_limit(cfg.run), controller_failure_limit=3),
            callbacks=callbacks,
            worker_runtime_env={"env_vars": {FAILURE_ENV: os.environ[FAILURE_ENV]}} if FAILURE_ENV in os.environ
            else None,
        ),
    )


def run_location(run: RunConfig) -> str:
    """The run folder, ``<storage>/<name>``: a local path or a URI."""
    return f"{storage_path(run).rstrip('/')}/{run.name}"


def _run_checkpoints(run: RunConfig) -> tuple[pafs.FileSystem, str, list[str]]:
    import pyarrow as pa

    try:
        fs, path = filesystem_and_path(run_location(run))
        return fs, path, list_checkpoints(path, fs)
    except (OSError, pa.ArrowException) as err:
        raise UserError(f"cannot list the run folder {run_location(run)}: {err}") from err


def _finished(fs: pafs.FileSystem, checkpoints: list[str]) -> list[str]:
    """The checkpoint folders that got as far as their manifest (intact or not)."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info([f"{path}/{MANIFEST_FILE}" for path in checkpoints])
    return [path for path, info in zip(checkpoints, infos, strict=True) if info.type == pafs.FileType.File]


def run_exists(run: RunConfig) -> bool:
    """True once the run has finished a checkpoint: a run that failed before its first one can be rerun."""
    fs, _, checkpoints = _run_checkpoints(run)
    return bool(_finished(fs, checkpoints))


def _ray_snapshot_checkpoints(fs: pafs.FileSystem, run_path: str) -> tuple[set[str], str | None] | None:
    """The checkpoint folder names Ray's run snapshot refers to and its latest; None without a snapshot.

    Raises:
        ValueError: the snapshot is not what Ray 2.60 writes.
    """
    import pyarrow.fs as pafs

    path = f"{run_path}/{RAY_SNAPSHOT_FILE}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        state = json.loads(f.read())
    latest = (state.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    names = {r["checkpoint_dir_name"] for r in state["checkpoint_results"] + state["pending_training_results"]}
    return names | ({latest} if latest else set()), latest


def _prepare_ray_snapshot(fs: pafs.FileSystem, run_path: str, resume_from: str | None) -> None:
    """Sets Ray's run snapshot aside unless every checkpoint it names passes and its latest is ``resume_from``.

    Ray refuses to start from a snapshot that names a missing checkpoint, would hand a damaged latest one to
    the workers, and deletes the checkpoints it knows beyond ``run.keep_checkpoints``. Renamed (not deleted),
    the snapshot is out of Ray's sight: Ray starts a new one, the workers start from ``resume_from``, and the
    older checkpoints stay until the user removes them.
    """
    import pyarrow as pa

    try:
        found = _ray_snapshot_checkpoints(fs, run_path)
        if found is None:
            return
        names, latest = found
        reason = None if latest == resume_from else f"its latest checkpoint is {latest}, not {resume_from}"
        for name in sorted(names):
            if reason is None and checkpoint_problem(f"{run_path}/{name}", fs, hashes=False) is not None:
                reason = f"it names {name}, which fails verification"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        reason = f"it is not readable ({type(err).__name__}: {err})"
    if reason is None:
        return
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d_%H-%M-%S")
    aside = f"{run_path}/{RAY_SNAPSHOT_FILE.removesuffix('.json')}.set-aside-{stamp}.json"
    try:
        fs.move(f"{run_path}/{RAY_SNAPSHOT_FILE}", aside)
    except (OSError, pa.ArrowException) as err:
        raise UserError(f"cannot set Ray's run snapshot aside in {run_path} ({err})") from err
    log.info("Ray's run snapshot set aside as %s: %s", aside, reason)


def _resume_point(fs: pafs.FileSystem, run_path: str, checkpoints: list[str]) -> str:
    """The name of the newest checkpoint that passes a names-and-sizes check; one warning per newer one."""
    good, skipped = newest_good_checkpoint(checkpoints, fs, hashes=False)
    for path, problem in skipped:
        log.warning("skipping checkpoint %s: %s", path, problem)
    if good is None:
        raise CheckpointError(f"none of the {len(checkpoints)} checkpoint(s) in run folder {run_path} passes "
                              f"verification (the newest: {skipped[0][1]}); nothing was deleted")
    return good.rsplit("/", 1)[-1]


def fit(cfg: Config, resume: bool = False, callbacks: list | None = None, classifier_cache: Path | None = None):
    """Trains on Ray (local single-node when ``cfg.run.address`` is None) and returns the ``ray.train.Result``.

    ``classifier_cache`` holds texture classifiers trained on the fly (default ``<storage>/classifiers``);
    the trials of a sweep share one.

    A run "exists" once it has finished a checkpoint: a run that failed before is simply run again (what it
    left, such as an unfinished checkpoint folder, stays where it is).
    With ``resume`` the checkpoints are verified here, before Ray reads them: the newest that passes is the
    start (one warning per newer one skipped), and Ray's run snapshot is set aside if it names anything else
    (see :func:`_prepare_ray_snapshot`); the workers check the sha256 of what they load
    (:func:`resume_training`).

    Raises:
        UserError: the run exists and ``resume`` is False; ``resume`` is True and there is no run folder, or
            no checkpoint in it passes verification; the cluster cannot be reached.
    """
    import pyarrow.fs as pafs

    from xswinir.data import check_train_source
    from xswinir.training_log import CURVES_FILE, METRICS_FILE, ProgressFollower, plot_training_curves

    check_writable(storage_path(cfg.run), log_dir(cfg.run))  # before Ray: not a PermissionError inside it
    check_train_source(cfg)  # a bad source fails here in one line, not inside Ray
    if cfg.model.init_from:  # so does a model.init_from that does not fit
        from xswinir.model import build_swinir

        load_pretrained(build_swinir(cfg.model), cfg.model.init_from, strict=cfg.model.init_strict)
    fs, run_path, checkpoints = _run_checkpoints(cfg.run)
    finished = _finished(fs, checkpoints)
    if finished and not resume:
        raise UserError(
            f"run '{cfg.run.name}' already exists in {storage_path(cfg.run)}: pass --resume to continue it, or "
            "choose another run.name"
        )
    resume_from = None
    if resume and finished:
        resume_from = _resume_point(fs, run_path, checkpoints)
    elif resume and fs.get_file_info(run_path).type == pafs.FileType.Directory:
        log.warning("run '%s' has no finished checkpoint: it starts from step 0", cfg.run.name)
    elif resume:
        raise UserError(f"nothing to resume: no run '{cfg.run.name}' in {storage_path(cfg.run)}")
    _prepare_ray_snapshot(fs, run_path, resume_from)
    if resume_from is not None:
        resume_from = f"{run_location(cfg.run)}/{resume_from}"
    cfg, classifier = classifier_payload(cfg, classifier_cache)
    log.debug("config:\n%s", cfg.to_yaml())  # also saved in every checkpoint
    init_ray(cfg.run, log_dir(cfg.run))
    trainer = build_trainer(cfg, callbacks, classifier, resume_from)
    metrics_path = log_dir(cfg.run) / METRICS_FILE
    local = cfg.run.address is None
    if local and cfg.run.progress:
        with ProgressFollower(metrics_path, cfg.train.total_steps, every=max(cfg.train.log_every,
                                                                             cfg.train.total_steps // 10)):
            result = trainer.fit()
    else:
        result = trainer.fit()
    curves = plot_training_curves(metrics_path, log_dir(cfg.run) / CURVES_FILE)
    if curves is not None:
        log.info("training curves: %s", curves)
    return result

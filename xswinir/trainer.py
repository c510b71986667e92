"""The XSwinIR trainer on Ray Train: the same code on a laptop and on a GPU cluster.

One step reads in the order things happen::

    lr -> batch -> degrade (on the device) -> SwinIR -> combined loss -> backward -> clip -> step -> EMA

and every ``train.val_every`` steps: validate the EMA model (Y-PSNR/SSIM against plain bicubic), write a
checkpoint, ``ray.train.report``. Ray touch points carry Ray's numbered comments (``# [1] ...``).

Resuming is exact: every random draw of step t (the batch, its crops, the degradations, stochastic depth)
comes from generators seeded with (seed, t, rank), never from history, and a checkpoint holds the weights,
the EMA weights, the optimizer, the step, every rank's RNG states and, for streamed training data, every rank's
position in the stream (continued from there, not replayed). A run restarted with the same name and
storage (``--resume``), or restarted by Ray after a worker failure, continues from the newest checkpoint that
passes verification (see :mod:`xswinir.runs`) and computes what the uninterrupted run would have computed:
bit for bit on the CPU (``tests/test_trainer.py``); GPU kernels that are not deterministic may differ in the
last bits.

Nothing a worker is handed names a folder on the driver's disk: on a cluster a worker may run on any machine.
Rank 0 sends its metrics rows to a :class:`~xswinir.training_log.MetricsSink` that the driver starts on its own
node, and :func:`local_paths` names what in a loop config would be read or written on a worker's own disk.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import functools
import logging
import logging.handlers
import math
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from timm.utils import ModelEmaV3

from xswinir.checkpoint import load_checkpoint, load_pretrained, load_stream_position, rng_state, save_checkpoint
from xswinir.config import Config, RunConfig, TrainConfig, apply_overrides
from xswinir.data import build_train_batches_keeping_position, check_train_source
from xswinir.degradations import build_degrader
from xswinir.errors import UserError
from xswinir.evaluation import build_validation_set, validate
from xswinir.losses import CombinedLoss, build_loss
from xswinir.metrics import VAL_PSNR_Y
from xswinir.model import build_swinir
from xswinir.paths import filesystem_and_path, is_remote, log_dir, storage_path
from xswinir.runs import prepare_run, verified_checkpoint
from xswinir.seeds import MODEL_STREAM, step_seed
from xswinir.storage import check_writable
from xswinir.stream import ShardIndex, StreamRecorder
from xswinir.texture.payload import classifier_from_payload, classifier_payload
from xswinir.texture.search import TextureSearch
from xswinir.training_log import CURVES_FILE, METRICS_FILE, MetricsSink, ProgressFollower, plot_training_curves

if TYPE_CHECKING:
    import pyarrow.fs as pafs

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


def train_step(
    model: nn.Module,
    degrader: nn.Module,
    loss_fn: CombinedLoss,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    generator: torch.Generator,
    grad_clip: float | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """One optimisation step on one batch; returns detached 0-dim tensors (no CPU-GPU sync).

    Args:
        batch: ``gt`` (B, C, H, W) in [0, 1], for paired data ``lq`` (then the degrader is not used), and
            for the texture term ``region``, ``gt_offset``, ``region_valid`` (see ``xswinir.data``) or the match
            the data pipeline found already (:func:`loader_search`), already on the model's device.
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
    search = loss_fn.texture_search
    total, parts = loss_fn(
        sr.float(), gt, batch.get("region"), batch.get("gt_offset"), batch.get("region_valid"), lq=lq,
        match=search.match_from_batch(batch) if search is not None else None,
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
    loss_fn: CombinedLoss
    degrader: nn.Module


def build_training_parts(cfg: Config, device: torch.device, classifier: nn.Module | None) -> TrainingParts:
    """The model, its EMA, Adam, the combined loss and the degrader of a run, on ``device``."""
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


def loader_search(cfg: Config, classifier: nn.Module | None, device: torch.device
                  ) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None:
    """The search the DataLoader's worker processes run on each batch (``texture.search_in``), or None.

    ``loader`` always, ``auto`` when training on the CPU with ``texture.query: gt``: there the search costs more
    than a whole λ = 0 step of the study's model, and in the workers it overlaps with the step wherever a core is
    free (its CPU time stays the same; a single loader worker may then set the pace). On a GPU the step searches
    on the device (``auto``): the batched search is fast there, and CPU workers would have to keep up with it.

    Returns:
        :meth:`TextureSearch.attach_match` of the run's search on a CPU copy of ``classifier`` (pickled into
        the worker processes with the loader), or None: the step searches (or there is no texture term).
    """
    where = cfg.texture.search_in
    if classifier is None or not cfg.texture_enabled or where == "step":
        return None
    if where == "auto" and (device.type != "cpu" or cfg.texture.query != "gt"):
        return None
    return TextureSearch.from_config(cfg.texture, copy.deepcopy(classifier).cpu()).attach_match


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


def resume_training(parts: TrainingParts, checkpoint: str, filesystem: pafs.FileSystem | None = None,
                    rank: int = 0) -> tuple[int, dict[str, Any] | None]:
    """Loads ``checkpoint`` into ``parts``, or the newest older checkpoint of its run folder that passes
    verification (:func:`xswinir.runs.verified_checkpoint`).

    Args:
        checkpoint: a checkpoint folder inside ``filesystem`` (local when None), e.g. Ray's latest.

    Returns:
        The number of completed steps of the checkpoint loaded, and where its streamed training data stood
        (:meth:`~xswinir.stream.StreamRecorder.for_checkpoint`; None when the data was not streamed, or for an
        older checkpoint).

    Raises:
        CheckpointError: neither ``checkpoint`` nor any older checkpoint of its run folder passes.
    """
    with verified_checkpoint(checkpoint, filesystem, rank) as directory:
        step = load_checkpoint(directory, parts.model, parts.ema.module, parts.optimizer, rank)
        return step, load_stream_position(directory)


def _saved_position(saved: dict[str, Any], seed: int, rank: int, world_size: int, start_step: int,
                    index: ShardIndex) -> dict[str, Any] | None:
    """This rank's position in a checkpoint's ``saved`` stream positions, or None where it does not apply."""
    fits = {"world_size": world_size, "seed": seed, "rows": index.rows}
    changed = [f"{key} {saved.get(key)} -> {value}" for key, value in fits.items() if saved.get(key) != value]
    position = saved["positions"][rank] if not changed else None
    if position is not None and position.get("step") != start_step:
        changed.append(f"step {position.get('step')} -> {start_step}")
    if changed:  # a position of another world (or data) means nothing here: the replay is exact for this one
        log.info("rank %d: the checkpoint's stream position does not apply (%s); replaying the stream to step %d",
                 rank, ", ".join(changed), start_step)
        return None
    return position


def train_batches(cfg: Config, rank: int, world_size: int, start_step: int = 0,
                  batch_fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
                  saved: dict[str, Any] | None = None
                  ) -> tuple[Iterator[dict[str, torch.Tensor]], StreamRecorder | None]:
    """This worker's training batches from ``start_step``, keeping the positions of streamed data for the
    checkpoints (:func:`xswinir.data.build_train_batches_keeping_position`).

    Args:
        saved: the stream positions of the checkpoint resumed from (:func:`resume_training`): the stream
            continues from this rank's instead of replaying its index bookkeeping to ``start_step``; None (a
            checkpoint without them, or another world size): replayed, which is exact too.

    Returns:
        The batches, and for streamed data the :class:`~xswinir.stream.StreamRecorder` whose positions go into
        the checkpoints (None otherwise).
    """
    every, total = cfg.train.val_every, cfg.train.total_steps
    resume_position = None if saved is None else functools.partial(_saved_position, saved, cfg.train.seed, rank,
                                                                    world_size, start_step)
    return build_train_batches_keeping_position(
        cfg, rank, world_size, start_step, batch_fn, resume_position,
        checkpoint_after=lambda step: step > 0 and (step % every == 0 or step == total))


class MetricsSender:
    """Rank 0's end of the run's :class:`~xswinir.training_log.MetricsSink` (a Ray actor on the driver's node).

    At most one row is in flight: each write first waits for the previous one, so a row is never dropped
    silently (an error in the sink, a full disk, fails the run here) and rows never queue without bound; one
    round trip per log step, hidden behind the step that follows it.

    Args:
        sink: the actor handle (:func:`start_metrics_sink`).
        start_step: the step this worker loop starts from (see :meth:`MetricsSink.start`).
    """

    def __init__(self, sink: Any, start_step: int) -> None:
        import ray

        self.sink = sink
        self.attempt: int = ray.get(sink.start.remote(start_step, ray.get_runtime_context().get_node_id()))
        self._pending: Any = None  # the ObjectRef of the row in flight

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self.flush()
        self._pending = self.sink.write.remote(self.attempt, step, metrics)

    def flush(self) -> None:
        """Waits until every row sent is in the file."""
        import ray

        if self._pending is not None:
            ray.get(self._pending)
            self._pending = None

    def claim_failure(self) -> bool:
        """Whether fault injection fails this run now: only the first time in its log folder."""
        import ray

        return ray.get(self.sink.claim_failure.remote())

    def close(self) -> None:
        self.flush()


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train worker function: builds everything from the config dict and trains."""
    import ray.train  # only here and in the driver: the step and its tests run without Ray
    import ray.train.torch

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
    start_step, stream_position = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        start_step, stream_position = resume_training(parts, checkpoint.path, checkpoint.filesystem, rank)
    elif loop_config.get("resume_from"):
        fs, path = filesystem_and_path(loop_config["resume_from"])
        start_step, stream_position = resume_training(parts, path, fs, rank)
    if start_step:
        log.info("rank %d resumed at step %d", rank, start_step)

    # [3] Wrap in DDP (only when world size > 1) and move to the device.
    ddp_model = ray.train.torch.prepare_model(model)
    # Folders and shards alike: DataLoader worker processes decode off this loop, several crops per image.
    batches, recorder = train_batches(cfg, rank, world_size, start_step, loader_search(cfg, classifier, device),
                                      stream_position)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" and cfg.train.bf16 else None
    # Rank 0 may run on another machine than the driver: its rows go to the driver's MetricsSink.
    writer = MetricsSender(loop_config["metrics"], start_step) if rank == 0 else None
    val_set = build_validation_set(cfg, parts.degrader, device) if rank == 0 else None
    failure_step = int(os.environ.get(FAILURE_ENV, "0"))

    window_start, window_steps = time.perf_counter(), 0
    sums: dict[str, torch.Tensor] = {}
    for step in range(start_step, cfg.train.total_steps):
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        out = run_step(parts, ddp_model, cfg.train, step, rank, batch, autocast_dtype)
        for key, value in out.items():
            sums[key] = sums.get(key, 0.0) + value
        window_steps += 1
        done = step + 1

        if writer is not None and failure_step and done == failure_step and writer.claim_failure():
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
            positions = _gather(recorder.position(done), world_size) if recorder is not None else None
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    report.update(validate(ema.module, val_set, cfg.scale, cfg.data.val_tile))
                    writer.write(done, {k: v for k, v in report.items() if k != "step"})
                    writer.flush()  # every row up to the checkpoint is in the file before the checkpoint exists
                    save_checkpoint(Path(tmp), cfg, model, ema.module, optimizer, done, classifier_dir, rng_states,
                                    recorder.for_checkpoint(positions) if recorder is not None else None)
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


def failure_message(err: Exception, logs: Path) -> str:
    """One line for a Ray Train failure: what failed, on which worker, and where the full log is.

    A worker's user error (a training image changed during the run, a checkpoint that fails verification) is
    its own one-line message; any other error is its type and first line, its traceback being in the log.

    Args:
        err: what ``TorchTrainer.fit`` raised (``ray.train.TrainingFailedError``: a ``WorkerGroupError`` with
            ``worker_failures``, or a ``ControllerError``).
        logs: the run's log folder, where a local Ray's logs are linked as ``ray``.
    """
    failures: dict[int, BaseException] = getattr(err, "worker_failures", None) or {}
    if failures:
        rank = min(failures)
        cause = failures[rank]
        where = f"worker {rank}" + (f" (and {len(failures) - 1} more)" if len(failures) > 1 else "")
    else:
        cause, where = getattr(err, "controller_failure", None) or err, "Ray Train's controller"
    full_log = f"full log: {logs / 'ray'}" if (logs / "ray").exists() else "full log: the Ray cluster's session logs"
    lines = str(cause).strip().splitlines()
    first = lines[0][:300] if lines else ""
    if isinstance(cause, UserError):
        return f"{first} ({where}; {full_log})"
    return f"training failed on {where}: {type(cause).__name__}: {first} ({full_log})"


def start_metrics_sink(logs: Path) -> Any:
    """A :class:`~xswinir.training_log.MetricsSink` for the log folder ``logs``, as a Ray actor on this node.

    Pinned to the node of the process that calls it (the driver, or a Tune trial's function), whose disk holds
    ``logs``; no CPU reserved, so that it never keeps a worker from being scheduled.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(MetricsSink).options(num_cpus=0, scheduling_strategy=here).remote(str(logs))


def stop_metrics_sink(sink: Any) -> None:
    """Closes the sink's files (TensorBoard's last events) and ends the actor."""
    import ray

    try:
        ray.get(sink.close.remote())
    except ray.exceptions.RayError as err:  # gone with its node: the run has failed already, say why there
        log.debug("metrics sink: %s", err)
    ray.kill(sink)


def worker_config(cfg: Config) -> Config:
    """The config the workers train with (and every checkpoint records): without the driver's own folders.

    ``run.log_dir`` is where the driver's :class:`MetricsSink` writes, and a local ``texture.classifier.path``
    the folder the driver read the classifier from (its files travel with the loop config, and every
    checkpoint holds them in ``classifier/``): on a cluster, neither exists on a worker's machine.
    """
    drop: dict[str, Any] = {"run.log_dir": None}
    if cfg.texture.classifier.path is not None and not is_remote(cfg.texture.classifier.path):
        drop["texture.classifier.path"] = None
    return apply_overrides(cfg, drop)


def build_loop_config(cfg: Config, metrics_sink: Any, classifier: dict[str, bytes] | None = None,
                      resume_from: str | None = None) -> dict[str, Any]:
    """What ``train_loop_per_worker`` receives: the worker config as a dict, the classifier's files, the
    checkpoint to resume from and the metrics sink's handle.

    Args:
        metrics_sink: the handle of :func:`start_metrics_sink`'s actor.
        classifier: the texture classifier's files (:attr:`~xswinir.texture.payload.ClassifierPayload.files`).
        resume_from: the checkpoint folder to start from when Ray's snapshot names none (see :func:`fit`): an
            absolute path or a URI, since a relative storage path means nothing in a worker's folder.
    """
    return {"config": worker_config(cfg).to_dict(), "classifier": classifier, "resume_from": resume_from,
            "metrics": metrics_sink}


# The config values that name a file, a folder or a storage (data sources may be ";" lists of them).
PATH_KEYS = ("run.storage", "run.log_dir", "data.train", "data.train_lq", "data.val", "model.init_from",
             "texture.classifier.path")


def local_paths(loop_config: dict[str, Any]) -> list[str]:
    """The local paths in a loop config, as ``key=value``: what a worker would read or write on its own disk.

    On one machine, or a cluster whose nodes share a disk, they are fine; on a cluster without one, each node
    would find a different folder (or none). URIs and ``skimage:`` names (inside the installed package) are
    not local paths; any other value of :data:`PATH_KEYS`, and any absolute path elsewhere, is.
    """
    found = []

    def visit(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for name, item in value.items():
                visit(item, f"{key}.{name}" if key else str(name))
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item, key)
        elif isinstance(value, str):
            for part in filter(None, (p.strip() for p in value.split(";"))):
                local = not is_remote(part) and not part.startswith("skimage:")
                if local and (key.removeprefix("config.") in PATH_KEYS or part.startswith(("/", "~"))):
                    found.append(f"{key.removeprefix('config.')}={part}")

    visit(loop_config, "")
    return found


def build_trainer(cfg: Config, loop_config: dict[str, Any], callbacks: list | None = None):
    """A Ray Train ``TorchTrainer`` for the config, its workers given ``loop_config`` (:func:`build_loop_config`).

    Workers are placed by ``run.placement_strategy``: ``PACK`` fills a node first, ``SPREAD`` puts them on
    different nodes when it can (and on what remains when a node is lost).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu,
            resources_per_worker={"CPU": cfg.run.cpus_per_worker, **({"GPU": 1} if cfg.run.use_gpu else {})},
            placement_strategy=cfg.run.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage_path(cfg.run.storage),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            # A worker group that can never be scheduled must fail, not retry forever (Ray's default).
            failure_config=ray.train.FailureConfig(max_failures=failure_limit(cfg.run), controller_failure_limit=3),
            callbacks=callbacks,
            worker_runtime_env={"env_vars": {FAILURE_ENV: os.environ[FAILURE_ENV]}} if FAILURE_ENV in os.environ
            else None,
        ),
    )


def warn_local_paths(loop_config: dict[str, Any]) -> None:
    """One warning line when a run that joins a cluster hands its workers local paths (:func:`local_paths`)."""
    found = local_paths(loop_config)
    if found:
        log.warning("the workers get local paths (%s): fine when every node shares that disk; otherwise give "
                    "URIs (s3://...)", ", ".join(found))


@contextlib.contextmanager
def sigint_restored() -> Iterator[None]:
    """Puts back the driver's Ctrl-C handler when ``TorchTrainer.fit`` returns.

    Ray Train installs its own (abort the run; exit 0 at the third press) in the main thread and leaves it in place:
    after training, a Ctrl-C during the demo's evaluation or explanation would reach a finished run's controller and
    be swallowed. Outside the main thread (in Tune) Ray installs none, and neither is one restored here.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def fit(cfg: Config, resume: bool = False, callbacks: list | None = None, classifier_cache: Path | None = None):
    """Trains on Ray (local single-node when ``cfg.run.address`` is None) and returns the ``ray.train.Result``.

    Everything that can refuse the run does so here, before Ray starts, in one line: the storage, the data,
    ``model.init_from``, the run folder against ``resume`` (:func:`xswinir.runs.prepare_run`: a run "exists" once
    it has finished a checkpoint; ``resume`` starts from the newest that passes verification) and the texture
    classifier. The workers check the sha256 of the checkpoint they load (:func:`resume_training`).

    Args:
        classifier_cache: where texture classifiers trained on the fly are kept (default
            ``<storage>/classifiers``); the trials of a sweep share one.

    Raises:
        UserError: the run exists and ``resume`` is False; ``resume`` is True and there is no run folder, or
            no checkpoint in it passes verification; the cluster cannot be reached.
    """
    logs = log_dir(cfg.run.storage, cfg.run.name, cfg.run.log_dir)
    check_writable(storage_path(cfg.run.storage), logs)  # before Ray: not a PermissionError inside it
    check_train_source(cfg)  # a bad source fails here in one line, not inside Ray
    if cfg.model.init_from:  # so does a model.init_from that does not fit
        load_pretrained(build_swinir(cfg.model), cfg.model.init_from, strict=cfg.model.init_strict)
    resume_from = prepare_run(cfg.run, resume)
    classifier = classifier_payload(cfg, classifier_cache)  # None without the texture term
    if classifier is not None:  # the run names the classifier it trains with (every checkpoint holds its files)
        cfg = apply_overrides(cfg, {"texture.classifier.path": str(classifier.path)})
    log.debug("config:\n%s", cfg.to_yaml())  # every checkpoint saves it too, less the driver's folders
    init_ray(cfg.run, logs)
    metrics_path = logs / METRICS_FILE
    sink = start_metrics_sink(logs)
    try:
        loop_config = build_loop_config(cfg, sink, None if classifier is None else classifier.files, resume_from)
        if cfg.run.address is not None or os.environ.get("RAY_ADDRESS"):  # joins a cluster
            warn_local_paths(loop_config)
        trainer = build_trainer(cfg, loop_config, callbacks)
        progress = (ProgressFollower(metrics_path, cfg.train.total_steps,
                                     every=max(cfg.train.log_every, cfg.train.total_steps // 10))
                    if cfg.run.address is None and cfg.run.progress  # a local run shows its progress on the console
                    else contextlib.nullcontext())
        with sigint_restored(), progress:
            result = trainer.fit()
    finally:
        stop_metrics_sink(sink)
    curves = plot_training_curves(metrics_path, logs / CURVES_FILE)
    if curves is not None:
        log.info("training curves: %s", curves)
    return result

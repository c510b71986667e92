"""The one GPU check of the Ray-free core: gpu tests, SDPA, a timed training step, the model vs the original.

    python -m bench.gpu_check --out DIR --original third_party/swinir   # one GPU: under 8 minutes on an H100
    python -m bench.gpu_check --out DIR --cpu --quick                   # CI-sized (tiny model, batch 2): seconds

Its sections, in this order; each is added to ``DIR/gpu_check.json`` as soon as it ends, together with all that
was printed so far, so that a run cut off by a time limit still leaves what it measured:

1. ``environment``: torch, the GPU, the versions of the packages the core needs; whether Ray got imported
   (it must not: the GPU machine has none).
2. ``gpu_tests``: ``pytest -m gpu`` on the test files that hold such tests (outside ``tests/integration``, which
   starts Ray), in a subprocess; counts and each test's outcome; the JUnit XML beside the JSON.
3. ``sdpa``: forward+backward of SwinIR with each of SDPA's backends forced, fp32 and bf16, and the backend the
   default picks: which fused kernel takes the float mask (relative position bias + shift mask) with its
   gradient, and how far the bias gradient is from the math backend's.
4. ``train``: the trainer's own ``run_step`` - SwinIR-S x2, batch 64, LR 64², ``blur-noise`` degradations on
   the device, the projection texture term (λ = 1), bf16 autocast, Adam, grad clip 1, EMA - on batches from the
   real loader (``skimage:train``, 8 workers): (a) timed by parts from hooks that synchronise the device at
   every boundary (data, degradation, forward, loss, texture search, texture term, backward, optimiser, EMA,
   other: see :class:`StepTimeline`), with peak memory and achieved TFLOP/s; (b) without the hooks, nothing
   synchronised, for steps/s; (c) both again with λ = 0; (d) the data demand (crops/s the step consumes)
   against what the loader supplies alone.
5. ``model``: ``bench.bench_model``'s cases, ours against the original ``network_swinir.py`` (``--original``),
   fp32 with TF32 off, then bf16 autocast.
6. ``goals``: met / missed for issue 11's targets: ours >= 1.5x the original's forward+backward at the same
   precision; the texture term <= 10 % and the degradations <= 5 % of a bf16 training step.

The texture classifier has synthetic weights (``bench.bench_texture.make_classifier``): the search costs the
same whatever it learned.

On the GPU machine (no Ray, Optuna or Kornia there; Kornia travels as wheels), see ``bench/gpu_check.sh``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bench.bench_model import FULL_CASES, _load_original, run_case
from bench.common import measure, print_table, sync, write_json
from xswinir.config import MODEL_PRESETS, Config

REPO = Path(__file__).resolve().parents[1]
JSON_NAME = "gpu_check.json"
# Issue 11's targets.
MIN_SPEEDUP = 1.5
MAX_TEXTURE_SHARE = 0.10
MAX_DEGRADATION_SHARE = 0.05
# The packages the Ray-free core imports (distribution names), and the two it must not need.
PACKAGES = ("torch", "torchvision", "timm", "kornia", "kornia_rs", "numpy", "pillow", "scikit-image", "pyyaml",
            "safetensors", "pyarrow", "torchmetrics", "pytest", "pytest-timeout", "ray", "optuna")
PARTS = ("data", "other", "degradation", "forward", "loss", "texture_search", "texture_term", "backward",
         "optimizer", "ema")
QUICK_MODEL_CASES = [("tiny-x2", "train", 2, 16), ("tiny-x2", "test", 1, 32)]


# ----------------------------------------------------------------------------------------------- the record
class _Tee(io.TextIOBase):
    """A stream that writes through and keeps a copy, so that the JSON holds all that was printed."""

    def __init__(self, stream: Any, copy: io.StringIO) -> None:
        self.stream, self.copy = stream, copy

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.copy.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


class Record:
    """Sections in the order they ran, rewritten to JSON after each; a section that raises is recorded, and
    the next one runs."""

    def __init__(self, path: Path, log: io.StringIO, budget_s: float) -> None:
        self.path, self.log, self.budget_s = path, log, budget_s
        self.sections: dict[str, dict[str, Any]] = {}
        self.start = time.perf_counter()

    def run(self, name: str, fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.start
        if elapsed > self.budget_s:
            print(f"\n== {name}: skipped, {elapsed:.0f} s of the {self.budget_s:.0f} s budget spent")
            result: dict[str, Any] = {"status": "skipped", "reason": f"time budget of {self.budget_s:.0f} s spent"}
        else:
            print(f"\n== {name}")
            start = time.perf_counter()
            try:
                result = {"status": "ok", **fn(*args)}
            except Exception as err:  # recorded; the other sections still run
                traceback.print_exc(file=sys.stdout)
                result = {"status": "error", "error": f"{type(err).__name__}: {err}"}
            result["seconds"] = time.perf_counter() - start
            print(f"-- {name}: {result['status']} in {result['seconds']:.1f} s")
            if torch.cuda.is_initialized():
                torch.cuda.empty_cache()  # the next section's peak memory is its own
        self.sections[name] = result
        self.write()
        return result

    def write(self) -> None:
        rows = self.sections.get("goals", {}).get("rows", [])
        write_json(self.path, "gpu_check", rows, sections=self.sections, log=self.log.getvalue(),
                   total_seconds=time.perf_counter() - self.start)


def _short(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"


# ---------------------------------------------------------------------------------------------- environment
def environment(device: torch.device) -> dict[str, Any]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    info: dict[str, Any] = {
        "device": str(device), "python": sys.version.split()[0], "torch_cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "gpu_memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30
        if device.type == "cuda" else None,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "versions": versions,
    }
    for key, value in info.items():
        if key != "versions":
            print(f"{key}: {value}")
    print("versions:", ", ".join(f"{k} {v or '-'}" for k, v in versions.items()))
    return info


def ray_imported() -> bool:
    return sys.modules.get("ray") is not None


# ------------------------------------------------------------------------------------------------ gpu tests
_GPU_MARK = re.compile(r"^\s*(@pytest\.mark\.gpu\b|pytestmark\s*=.*pytest\.mark\.gpu\b)", re.MULTILINE)


def gpu_test_files() -> list[str]:
    """The test files with a ``gpu`` test; ``tests/integration`` starts Ray and stays out."""
    tests = REPO / "tests"
    return sorted(p.relative_to(REPO).as_posix() for p in tests.rglob("test_*.py")
                  if "integration" not in p.relative_to(tests).parts and _GPU_MARK.search(p.read_text()))


def gpu_tests(out: Path, timeout_s: float, files: list[str] | None = None) -> dict[str, Any]:
    files = gpu_test_files() if files is None else files
    xml = out / "gpu_tests.xml"
    # No plugin autoloading: the GPU machine has many pytest plugins installed (hypothesis, benchmark, ...) that
    # cost seconds to import and that no test here uses; pytest-timeout serves the project's --timeout option.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    cmd = [sys.executable, "-m", "pytest", "-c", str(REPO / "pyproject.toml"), "--rootdir", str(REPO),
           "-p", "pytest_timeout", "-p", "no:cacheprovider", "-m", "gpu", "-q", "--continue-on-collection-errors",
           f"--junitxml={xml}", *files]
    print(" ".join(cmd[2:]))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    print(proc.stdout + proc.stderr)
    tests = []
    if xml.is_file():
        for case in ET.parse(xml).getroot().iter("testcase"):
            outcome, message = "passed", None
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                    message = (child.get("message") or "")[:500]
            tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                          "message": message})
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    result = {"files": files, "returncode": proc.returncode, "counts": counts, "tests": tests}
    # 5: nothing collected, e.g. no gpu test at all; anything else but 0 is a failure.
    if proc.returncode not in (0, 5) or counts["failed"] or counts["error"]:
        result["status"] = "failed"
    return result


# ----------------------------------------------------------------------------------------------------- sdpa
def _backends(device: torch.device) -> dict[str, Any]:
    from torch.nn.attention import SDPBackend

    fused = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION}
    # On the CPU the model writes training attention out itself (SDPA has no CPU kernel with a mask gradient).
    return {"math": SDPBackend.MATH, **(fused if device.type == "cuda" else {})}


def _op_counts(fn: Callable[[], Any]) -> dict[str, int]:
    """FLOPs by operator of one call of ``fn``; the SDPA kernels show under their own names (flash, efficient,
    cuDNN), so this also says which one ran."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return {str(op): n for op, n in counter.get_flop_counts().get("Global", {}).items()}


def sdpa_check(device: torch.device, quick: bool) -> dict[str, Any]:
    import dataclasses

    from torch.nn.attention import sdpa_kernel

    from xswinir.model import build_swinir

    preset, batch, side = ("tiny-x2", 2, 16) if quick else ("swinir-s-x2", 8, 64)
    cfg = dataclasses.replace(MODEL_PRESETS[preset], drop_path_rate=0.0)  # same gradients on every call
    torch.manual_seed(0)
    model = build_swinir(cfg).to(device).train()
    g = torch.Generator().manual_seed(0)
    lq = torch.rand(batch, 3, side, side, generator=g).to(device)
    gt = torch.rand(batch, 3, side * cfg.upscale, side * cfg.upscale, generator=g).to(device)
    bias = next(p for n, p in model.named_parameters() if n.endswith("relative_position_bias_table"))

    rows, default_ops = [], {}
    for precision in ("fp32", "bf16"):
        autocast = precision == "bf16"

        def step(autocast: bool = autocast) -> None:
            model.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = (model(lq).float() - gt).abs().mean()
            loss.backward()

        reference = None
        for name, backend in [("default", None), *_backends(device).items()]:
            row: dict[str, Any] = {"precision": precision, "backend": name, "ok": False, "ms": None,
                                   "bias_grad_rel_diff": None, "error": None}
            try:
                with warnings.catch_warnings(), (sdpa_kernel(backend) if backend is not None
                                                 else contextlib.nullcontext()):
                    warnings.simplefilter("ignore")  # "flash attention does not support a mask" and the like
                    row["ms"] = 1e3 * measure({name: step}, repeat=1 if quick else 5, device=device)[name]
                if bias.grad is None:
                    raise RuntimeError("no gradient reached the relative position bias")
                grad = bias.grad.detach().float().clone()
                row["ok"] = bool(torch.isfinite(grad).all())
                if name == "math":
                    reference = grad
                row["_grad"] = grad
            except Exception as err:  # a backend that refuses the mask or its gradient
                row["error"] = _short(err)
            rows.append(row)
        for row in rows:
            grad = row.pop("_grad", None)
            if grad is not None and reference is not None and row["precision"] == precision:
                row["bias_grad_rel_diff"] = float((grad - reference).abs().max() / reference.abs().max())
        default_ops[precision] = sorted(name for name in _op_counts(step) if "scaled_dot_product" in name)
    print_table([{k: v for k, v in r.items() if k != "error"} for r in rows],
                f"SDPA backends forced, {preset} forward+backward, {batch}x{side}^2 (bias grad vs math)")
    for r in rows:
        if r["error"]:
            print(f"  {r['precision']} {r['backend']}: {r['error']}")
    print("ops the default picks:", default_ops)
    fused_ok = sorted({r["backend"] for r in rows if r["ok"] and r["backend"] not in ("default", "math")})
    return {"model": preset, "input": f"{batch}x{side}^2", "rows": rows, "default_ops": default_ops,
            "fused_backends_with_mask_grad": fused_ok}


# ----------------------------------------------------------------------------------------------------- train
class StepTimeline:
    """Times the parts of the trainer's own ``run_step`` from hooks on what it calls.

    Hooks on the degrader, the model, the loss, the optimizer's step, and wrappers around ``loss_fn.search``
    and ``ema.update`` synchronise the device at every boundary and charge the time since the last boundary to
    the part that ends there, so that the parts add up to the step. ``backward`` runs from the end of the loss
    to the optimizer's step: zero_grad, backward and the grad-norm clip; ``loss`` is the pixel loss (and the
    query's up-sampling), ``texture_term`` the projection term and the loss's diagnostics; ``other`` is the
    learning rate, the seeding and the Python between parts.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.steps: list[dict[str, float]] = []
        self._last = 0.0
        self._searched = False

    def start(self) -> None:
        sync(self.device)
        self.steps.append({})
        self._searched = False
        self._last = time.perf_counter()

    def mark(self, part: str) -> None:
        """Charges the time since the last boundary to ``part``."""
        sync(self.device)
        now = time.perf_counter()
        self.steps[-1][part] = self.steps[-1].get(part, 0.0) + now - self._last
        self._last = now

    @contextlib.contextmanager
    def attached(self, parts: Any) -> Iterator[None]:
        """The hooks on ``parts`` (``xswinir.trainer.TrainingParts``) while the context lasts."""
        mark = self.mark
        handles = [
            parts.degrader.register_forward_pre_hook(lambda *_: mark("other")),
            parts.degrader.register_forward_hook(lambda *_: mark("degradation")),
            parts.model.register_forward_pre_hook(lambda *_: mark("other")),
            parts.model.register_forward_hook(lambda *_: mark("forward")),
            parts.loss_fn.register_forward_pre_hook(lambda *_: mark("forward")),  # sr.float()
            parts.loss_fn.register_forward_hook(lambda *_: mark("texture_term" if self._searched else "loss")),
            parts.optimizer.register_step_pre_hook(lambda *_: mark("backward")),
            parts.optimizer.register_step_post_hook(lambda *_: mark("optimizer")),
        ]
        search, update = parts.loss_fn.search, parts.ema.update

        def timed_search(*args: Any, **kwargs: Any) -> Any:
            mark("loss")
            match = search(*args, **kwargs)
            mark("texture_search")
            self._searched = True
            return match

        def timed_update(*args: Any, **kwargs: Any) -> None:
            mark("other")
            update(*args, **kwargs)
            mark("ema")

        # Instance attributes shadow the methods: CombinedLoss.forward calls self.search, run_step ema.update.
        parts.loss_fn.search, parts.ema.update = timed_search, timed_update
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            del parts.loss_fn.search, parts.ema.update


def timed_run_step(parts: Any, cfg: Config, step: int, batches: Iterator[dict[str, Tensor]], device: torch.device,
                   autocast_dtype: torch.dtype | None, timeline: StepTimeline | None = None) -> dict[str, Tensor]:
    """One step as ``train_loop_per_worker`` takes it: the next batch to the device, then ``run_step``."""
    from xswinir.trainer import run_step

    if timeline is not None:
        timeline.start()
    batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
    if timeline is not None:
        timeline.mark("data")
    out = run_step(parts, parts.model, cfg.train, step, 0, batch, autocast_dtype)
    if timeline is not None:
        timeline.mark("other")
    return out


def model_flops(model: nn.Module, lq: Tensor, autocast_dtype: torch.dtype | None) -> int:
    """FLOPs of one forward+backward of the model (matrix products, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        with torch.autocast(lq.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(lq)
        out.float().abs().mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def training_source(requested: str) -> tuple[str, str | None]:
    """``requested`` when its files exist, else a folder of synthetic photos-like images (and why)."""
    from xswinir.sources import resolve_image_files

    try:
        files = resolve_image_files(requested)
        missing = [f for f in files if not Path(f).is_file()]
        if not missing:
            return requested, None
        reason = f"{len(missing)} of its files are missing, e.g. {missing[0]}"
    except (FileNotFoundError, ImportError) as err:
        reason = _short(err)
    import numpy as np
    from PIL import Image

    folder = Path(tempfile.mkdtemp(prefix="gpu_check_images_"))
    rng = np.random.default_rng(0)
    for i in range(8):  # smooth random images, larger than the 256 px search region
        base = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
        Image.fromarray(base).resize((480, 320), Image.BICUBIC).save(folder / f"synthetic{i}.png")
    return str(folder), f"{requested} unusable ({reason}): synthetic images instead"


def train_config(quick: bool, workers: int, source: str, texture_weight: float) -> Config:
    from xswinir.config import apply_overrides, load_config

    overrides: dict[str, Any] = {"data.train": source, "data.loader_workers": workers, "train.batch_size": 64,
                                 "loss.texture_weight": texture_weight, "run.num_workers": 1}
    if quick:
        overrides.update({"model.preset": "tiny-x2", "data.gt_size": 32, "texture.region_size": 64,
                          "train.batch_size": 2})
    return apply_overrides(load_config("xswinir_blur_noise"), overrides)


def _train_variant(cfg: Config, device: torch.device, classifier: nn.Module | None, warmup: int, steps: int,
                   throughput_steps: int, supply_batches: int) -> dict[str, Any]:
    from xswinir.data import build_train_batches
    from xswinir.trainer import build_training_parts

    autocast_dtype = torch.bfloat16 if device.type == "cuda" and cfg.train.bf16 else None
    parts = build_training_parts(cfg, device, classifier)
    batches = build_train_batches(cfg, rank=0, world_size=1)
    batch = cfg.train.batch_size
    lq_shape = (batch, cfg.model.in_chans, cfg.data.gt_size // cfg.scale, cfg.data.gt_size // cfg.scale)
    flops = model_flops(parts.model, torch.rand(lq_shape, device=device), autocast_dtype)

    timeline = StepTimeline(device)
    step = 0
    for _ in range(warmup):
        timed_run_step(parts, cfg, step, batches, device, autocast_dtype)
        step += 1
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    totals = []
    with timeline.attached(parts):
        for _ in range(steps):
            sync(device)
            start = time.perf_counter()
            out = timed_run_step(parts, cfg, step, batches, device, autocast_dtype, timeline)
            sync(device)
            totals.append(time.perf_counter() - start)
            step += 1
    part_ms = {k: 1e3 * statistics.fmean(s[k] for s in timeline.steps) for k in timeline.steps[0]}
    step_ms = 1e3 * statistics.fmean(totals)
    loss_finite = bool(torch.isfinite(out["loss"]))

    # The same steps without the hooks, nothing synchronised until the end: the steps/s a run gets.
    sync(device)
    start = time.perf_counter()
    for _ in range(throughput_steps):
        out = timed_run_step(parts, cfg, step, batches, device, autocast_dtype)
        step += 1
    sync(device)
    steps_per_s = throughput_steps / (time.perf_counter() - start)
    peak_mib = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None

    # What the loader alone supplies: the batches its workers hold ready are taken first, untimed.
    for _ in range(2 * cfg.data.loader_workers):
        next(batches)
    start = time.perf_counter()
    for _ in range(supply_batches):
        next(batches)
    supply = supply_batches * batch / (time.perf_counter() - start)

    compute_ms = step_ms - part_ms["data"]
    model_ms = part_ms["forward"] + part_ms["backward"]
    return {
        "texture_weight": cfg.loss.texture_weight, "batch": batch, "lq_side": lq_shape[-1],
        "model": cfg.model.preset, "precision": "bf16" if autocast_dtype else "fp32", "timed_steps": steps,
        "parts_ms": part_ms, "step_ms": step_ms, "parts_sum_ms": sum(part_ms.values()),
        "steps_per_s_by_parts": 1e3 / step_ms, "steps_per_s": steps_per_s, "peak_memory_mib": peak_mib,
        "model_gflop_per_step": flops / 1e9,
        "tflops_model": flops / (model_ms / 1e3) / 1e12, "tflops_step": flops * steps_per_s / 1e12,
        "demand_crops_per_s": batch / (compute_ms / 1e3), "throughput_crops_per_s": batch * steps_per_s,
        "loader_workers": cfg.data.loader_workers, "supply_crops_per_s": supply,
        "loss_finite": loss_finite and bool(torch.isfinite(out["loss"])),
    }


def train_check(device: torch.device, quick: bool, workers: int | None, source: str) -> dict[str, Any]:
    from bench.bench_texture import make_classifier
    from xswinir.config import apply_overrides
    from xswinir.data import build_train_batches

    source, note = training_source(source)
    if note:
        print(note)
    workers = (0 if quick else 8) if workers is None else workers
    cfg = train_config(quick, workers, source, texture_weight=1.0)
    # The classifier's feature standardisation is fitted to one batch of real search regions.
    sample = next(build_train_batches(apply_overrides(cfg, {"data.loader_workers": 0}), rank=0, world_size=1))
    classifier = make_classifier(cfg.texture.patch_size, sample["region"][:8])
    sizes = dict(warmup=1, steps=2, throughput_steps=2, supply_batches=2) if quick else \
        dict(warmup=5, steps=20, throughput_steps=30, supply_batches=16)
    variants = {
        "texture": _train_variant(cfg, device, classifier, **sizes),
        "lambda0": _train_variant(apply_overrides(cfg, {"loss.texture_weight": 0.0}), device, None, **sizes),
    }
    tex, base = variants["texture"], variants["lambda0"]
    rows = [{"variant": f"{name} (λ={v['texture_weight']:g})", **{k: v["parts_ms"].get(k) for k in PARTS},
             "sum": v["parts_sum_ms"], "step": v["step_ms"]} for name, v in variants.items()]
    print_table(rows, f"training step by parts, ms (mean of {sizes['steps']} steps, the device synchronised at "
                      f"each boundary): {cfg.model.preset}, batch {cfg.train.batch_size}, LR "
                      f"{tex['lq_side']}^2, {tex['precision']}, {cfg.degradation.preset} on {device.type}")
    rows = [{"variant": name, "steps/s": v["steps_per_s"], "steps/s by parts": v["steps_per_s_by_parts"],
             "peak MiB": v["peak_memory_mib"], "GFLOP/step": v["model_gflop_per_step"],
             "TFLOP/s model": v["tflops_model"], "TFLOP/s step": v["tflops_step"],
             "demand crops/s": v["demand_crops_per_s"], "loader crops/s": v["supply_crops_per_s"]}
            for name, v in variants.items()]
    print_table(rows, f"the trainer's own run_step, {sizes['throughput_steps']} steps unsynchronised; TFLOP/s "
                      "model = model FLOPs / (forward + backward parts); loader crops/s: its "
                      f"{cfg.data.loader_workers} workers alone")
    result = {
        "data_source": source, "data_note": note, "variants": variants,
        # (t(λ=1) - t(λ=0)) / t(λ=1), from the trainer's own steps/s.
        "texture_share": 1 - tex["steps_per_s"] / base["steps_per_s"],
        "texture_share_by_parts": 1 - base["step_ms"] / tex["step_ms"],
        "texture_search_share": tex["parts_ms"]["texture_search"] / tex["step_ms"],
        "degradation_share": tex["parts_ms"]["degradation"] / tex["step_ms"],
        "data_demand_crops_per_s": tex["demand_crops_per_s"],
        # Loader workers (one core each) that keep up with the demand, at the rate the workers had here.
        "loader_workers_needed": tex["demand_crops_per_s"] / (tex["supply_crops_per_s"] / tex["loader_workers"])
        if tex["loader_workers"] else None,
    }
    print(f"texture term: {100 * result['texture_share']:.1f} % of the λ=1 step from run_step's steps/s, "
          f"{100 * result['texture_share_by_parts']:.1f} % by parts (the search alone "
          f"{100 * result['texture_search_share']:.1f} %); degradations {100 * result['degradation_share']:.1f} %")
    print(f"data demand: {tex['demand_crops_per_s']:.0f} crops/s (batch / step time without the data part); "
          f"the loader's {tex['loader_workers']} workers alone supplied {tex['supply_crops_per_s']:.0f} crops/s")
    if result["loader_workers_needed"] is not None:
        print(f"so one GPU needs about {result['loader_workers_needed']:.1f} loader workers (CPU cores) for this step")
    return result


# ----------------------------------------------------------------------------------------------------- model
@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def model_check(device: torch.device, quick: bool, original_dir: Path | None) -> dict[str, Any]:
    original = _load_original(original_dir) if original_dir else None
    if original is None:
        print("no --original: our model alone, no speedup")
    cases = QUICK_MODEL_CASES if quick else FULL_CASES
    result: dict[str, Any] = {"original": str(original_dir) if original_dir else None, "cases": cases,
                              "tf32": False}
    for precision in ("fp32", "bf16"):
        rows, errors = [], []
        # TF32 off: fp32 means fp32, and bench_model checks the two models' fp32 outputs against each other to
        # 1e-4 before timing (bf16 too), which cuDNN's default TF32 convolutions could break. Under bf16
        # autocast the convolutions run in bf16 whatever the flag says.
        with _no_tf32():
            for case in cases:
                try:
                    rows += run_case(*case, device, original, precision == "bf16", repeat=1 if quick else 7)
                except Exception as err:  # recorded; the other cases still run
                    traceback.print_exc(file=sys.stdout)
                    errors.append({"case": list(case), "error": _short(err)})
        print_table(rows, f"SwinIR on {device.type}, {precision}: images/s, speedup = ours/original")
        result[precision] = {"rows": rows, "errors": errors}
    if any(result[p]["errors"] for p in ("fp32", "bf16")):
        result["status"] = "failed"
    return result


# ----------------------------------------------------------------------------------------------------- goals
def _goal(name: str, value: float | None, target: float, higher_is_better: bool, unit: str) -> dict[str, Any]:
    if value is None:
        status = "not measured"
    else:
        status = "met" if (value >= target if higher_is_better else value <= target) else "missed"
    fmt = (lambda v: f"{v:.2f}x") if unit == "x" else (lambda v: f"{100 * v:.1f} %")
    return {"goal": name, "target": f"{'>=' if higher_is_better else '<='} {fmt(target)}",
            "measured": None if value is None else fmt(value), "value": value, "status": status}


def goals(sections: dict[str, dict[str, Any]], device: torch.device) -> dict[str, Any]:
    rows = []
    model = sections.get("model", {})
    for precision in ("fp32", "bf16"):
        speedups = [r["speedup"] for r in model.get(precision, {}).get("rows", [])
                    if r["task"] == "forward+backward" and "speedup" in r]
        rows.append(_goal(f"ours vs the original, forward+backward, {precision} (slowest case)",
                          min(speedups) if speedups else None, MIN_SPEEDUP, True, "x"))
    train = sections.get("train", {})
    precision = train.get("variants", {}).get("texture", {}).get("precision", "bf16")
    rows.append(_goal(f"texture term, share of a {precision} step", train.get("texture_share"),
                      MAX_TEXTURE_SHARE, False, "%"))
    rows.append(_goal(f"degradations, share of a {precision} step", train.get("degradation_share"),
                      MAX_DEGRADATION_SHARE, False, "%"))
    title = "issue 11 goals"
    if device.type != "cuda":
        title += " (a CPU run: the goals are set for one GPU in bf16, so these statuses only show the check works)"
    print_table([{k: v for k, v in r.items() if k != "value"} for r in rows], title)
    return {"rows": rows}


# ------------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help=f"folder for {JSON_NAME} and gpu_tests.xml")
    parser.add_argument("--original", type=Path, default=None,
                        help="folder with the original network_swinir.py (e.g. third_party/swinir)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (with --quick: the CI-sized check)")
    parser.add_argument("--quick", action="store_true", help="tiny model, batch 2, a few steps")
    parser.add_argument("--no-tests", action="store_true", help="leave out the gpu-marked tests")
    parser.add_argument("--data", default="skimage:train", help="training images (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: 8; 0 with --quick)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads with --cpu; 1 is steadier on a shared machine (default: %(default)s)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="sections that would start after this many seconds are skipped (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Runs the check; 0 when every section ran and every gpu test passed (goals missed are findings)."""
    args = parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device here: pass --cpu (with --quick for the CI-sized check)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu else "cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    if args.cpu:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, device)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, device: torch.device) -> int:
    log = io.StringIO()
    with contextlib.redirect_stdout(_Tee(sys.stdout, log)), contextlib.redirect_stderr(_Tee(sys.stderr, log)):
        record = Record(args.out / JSON_NAME, log, args.budget_s)
        record.run("environment", environment, device)
        if not args.no_tests:
            record.run("gpu_tests", gpu_tests, args.out, 300.0)
        record.run("sdpa", sdpa_check, device, args.quick)
        record.run("train", train_check, device, args.quick, args.workers, args.data)
        record.run("model", model_check, device, args.quick, args.original)
        record.sections["environment"]["ray_imported"] = ray_imported()
        record.sections["goals"] = goals(record.sections, device)
        bad = [name for name, s in record.sections.items() if s.get("status", "ok") != "ok"]
        print(f"\nsections not ok: {', '.join(bad)}" if bad else "\nevery section ran")
        record.write()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

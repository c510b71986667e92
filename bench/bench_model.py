"""SwinIR throughput and memory: ours against the official implementation, same weights, same inputs.

    python -m bench.bench_model --original /tmp/swinir_orig [--quick] [--device cuda] [--bf16]

``--original`` is a folder holding the official ``network_swinir.py`` (JingyunLiang/SwinIR, never committed
here), e.g. ``git --git-dir=... show HEAD:models/network_swinir.py > /tmp/swinir_orig/network_swinir.py``.
Without it only our model is timed. Both models get our weights (the official model's state dict is loaded
into ours), their eval outputs must agree within 1e-4, and the table reports images/s and the ratio
ours/official for the forward pass (eval, no grad) and for forward+backward (train mode, L1 loss).
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.common import measure, parse_args, print_table, sync, write_json
from xswinir.checkpoint import load_state_dict_strict
from xswinir.config import MODEL_PRESETS
from xswinir.model import build_swinir, count_parameters, swinir_kwargs

# (preset, mode, batch, LR side): training crops and test-size images as in the SwinIR papers' settings.
FULL_CASES = [
    ("swinir-s-x2", "train", 16, 64), ("swinir-m-x2", "train", 16, 48),
    ("swinir-s-x2", "test", 1, 256), ("swinir-m-x2", "test", 1, 128),
]
QUICK_CASES = [
    ("swinir-s-x2", "train", 2, 64), ("swinir-m-x2", "train", 1, 48),
    ("swinir-s-x2", "test", 1, 128), ("swinir-m-x2", "test", 1, 64),
]


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--original", type=Path, default=None,
                        help="folder with the official network_swinir.py to compare against")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA); outputs are then not compared")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads; 1 gives steadier numbers on a shared machine (default: torch's)")


def _load_original(folder: Path) -> Any:
    file = folder / "network_swinir.py"
    if not file.is_file():
        raise SystemExit(f"--original: {file} does not exist")
    spec = importlib.util.spec_from_file_location("original_network_swinir", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train_step(model: nn.Module, lq: torch.Tensor, gt: torch.Tensor, autocast: bool) -> None:
    with torch.autocast(lq.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = (model(lq) - gt).abs().mean()
    loss.backward()
    model.zero_grad(set_to_none=True)


def _forward(model: nn.Module, lq: torch.Tensor, autocast: bool) -> None:
    with torch.no_grad(), torch.autocast(lq.device.type, dtype=torch.bfloat16, enabled=autocast):
        model(lq)


def _peak_memory(fn: Any, device: torch.device) -> float | None:
    """Peak allocated MiB of one call (CUDA only)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def run_case(preset: str, mode: str, batch: int, side: int, device: torch.device, original: Any, bf16: bool,
             repeat: int) -> list[dict[str, Any]]:
    cfg = MODEL_PRESETS[preset]
    torch.manual_seed(0)
    ours = build_swinir(cfg).to(device)
    models = {"ours": ours}
    if original is not None:
        kwargs = swinir_kwargs(cfg)
        kwargs["depths"], kwargs["num_heads"] = list(kwargs["depths"]), list(kwargs["num_heads"])
        models["official"] = original.SwinIR(**kwargs).to(device)
        load_state_dict_strict(ours, models["official"].state_dict(), source="the official model")
    generator = torch.Generator().manual_seed(0)
    lq = torch.rand(batch, cfg.in_chans, side, side, generator=generator).to(device)
    gt = torch.rand(batch, cfg.in_chans, side * cfg.upscale, side * cfg.upscale, generator=generator).to(device)

    max_diff = None
    if "official" in models:
        with torch.no_grad():
            outs = [m.eval()(lq[:1].float()) for m in models.values()]
        max_diff = (outs[0] - outs[1]).abs().max().item()
        if max_diff > 1e-4:
            raise AssertionError(f"{preset}: ours and the official outputs differ by {max_diff:.3g} > 1e-4")

    rows = []
    for task in ("forward", "forward+backward") if mode == "train" else ("forward",):
        for model in models.values():
            model.train(task != "forward")
        if task == "forward":
            fns = {name: (lambda m=m: _forward(m, lq, bf16)) for name, m in models.items()}
        else:
            fns = {name: (lambda m=m: _train_step(m, lq, gt, bf16)) for name, m in models.items()}
        seconds = measure(fns, repeat=repeat, warmup=1, device=device)
        memory = {name: _peak_memory(fn, device) for name, fn in fns.items()}
        row: dict[str, Any] = {
            "model": preset, "task": task, "input": f"{batch}x{side}^2", "params": count_parameters(ours),
            "ours img/s": batch / seconds["ours"],
        }
        if "official" in fns:
            row["official img/s"] = batch / seconds["official"]
            row["speedup"] = seconds["official"] / seconds["ours"]
        if device.type == "cuda":
            row["ours MiB"] = memory["ours"]
            if "official" in memory:
                row["official MiB"] = memory["official"]
        row["max |diff|"] = max_diff
        rows.append(row)
        print_table([row], f"{preset} {task}")
    return rows


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "bench/results/bench_model.json", _add_arguments)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    original = _load_original(args.original) if args.original else None
    cases = QUICK_CASES if args.quick else FULL_CASES
    repeat = 3 if args.quick else 7
    rows = []
    for preset, mode, batch, side in cases:
        rows += run_case(preset, mode, batch, side, device, original, args.bf16, repeat)
    title = f"SwinIR on {device.type}{' (bf16 autocast)' if args.bf16 else ''}: images/s, speedup = ours/official"
    print_table(rows, title)
    notes = [] if device.type == "cuda" else ["memory not measured on CPU"]
    write_json(args.json, "bench_model", rows, bf16=args.bf16, quick=args.quick, notes=notes)


if __name__ == "__main__":
    main()

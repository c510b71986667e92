"""ONNX Runtime against PyTorch on the CPU: one LR tile through the exported graph and through our model.

    python -m bench.bench_onnx [--quick] [--threads N] [--preset swinir-s-x2] [--tile 256]

Both run the same weights (random, which does not change the cost) on the same tile, interleaved: PyTorch
in eval mode under ``torch.no_grad``, ONNX Runtime with the CPU execution provider and as many intra-op
threads as torch uses. The file comes from ``xswinir.export.export_onnx``, the same path as ``xswinir export
--format onnx``. The outputs must agree within 1e-4. ``speedup`` = PyTorch seconds / ONNX Runtime seconds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import measure, parse_args, print_table, write_json
from xswinir.config import MODEL_PRESETS
from xswinir.export import ONNX_INPUT, ONNX_OUTPUT, export_onnx
from xswinir.model import build_swinir, count_parameters


def _extra_args() -> argparse.Namespace:
    """Options beyond bench.common's; removed from sys.argv so that its parser accepts the rest."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--preset", action="append", default=None,
                        help="model preset(s) to time (default: swinir-s-x2; --quick: tiny-x2)")
    parser.add_argument("--tile", type=int, default=None, help="LR tile side (default: 256; --quick: 64)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for both (default: torch's)")
    extra, rest = parser.parse_known_args()
    sys.argv = [sys.argv[0], *rest]
    return extra


def run_case(preset: str, tile: int, repeat: int, folder: Path) -> dict[str, Any]:
    import onnxruntime

    cfg = MODEL_PRESETS[preset]
    torch.manual_seed(0)
    model = build_swinir(cfg).eval()
    path = folder / f"{preset}.onnx"
    start = time.perf_counter()
    export_onnx(model, cfg, path, tile=tile)
    export_seconds = time.perf_counter() - start
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    lq = torch.rand(1, cfg.in_chans, tile, tile, generator=torch.Generator().manual_seed(0))
    feed = {ONNX_INPUT: lq.numpy()}

    def pytorch() -> torch.Tensor:
        with torch.no_grad():
            return model(lq)

    def ort() -> Any:
        return session.run([ONNX_OUTPUT], feed)[0]

    max_diff = (torch.from_numpy(ort()) - pytorch()).abs().max().item()
    if max_diff > 1e-4:
        raise AssertionError(f"{preset}: ONNX Runtime and PyTorch differ by {max_diff:.3g} > 1e-4")
    seconds = measure({"pytorch": pytorch, "onnxruntime": ort}, repeat=repeat, warmup=1)
    row = {
        "model": preset, "tile": f"{tile}^2", "params": count_parameters(model), "threads": torch.get_num_threads(),
        "pytorch s": seconds["pytorch"], "onnxruntime s": seconds["onnxruntime"],
        "speedup": seconds["pytorch"] / seconds["onnxruntime"], "max |diff|": max_diff,
        "export s": export_seconds, "onnx MiB": path.stat().st_size / 2**20,
    }
    print_table([row], f"{preset}, one {tile}^2 tile on the CPU")
    return row


def main() -> None:
    extra = _extra_args()
    args = parse_args(__doc__.splitlines()[0], "bench/results/bench_onnx.json")
    if extra.threads:
        torch.set_num_threads(extra.threads)
    presets = extra.preset or (["tiny-x2"] if args.quick else ["swinir-s-x2"])
    tile = extra.tile or (64 if args.quick else 256)
    repeat = 3 if args.quick else 5
    with tempfile.TemporaryDirectory() as folder:
        rows = [run_case(preset, tile, repeat, Path(folder)) for preset in presets]
    import onnxruntime

    print_table(rows, "ONNX Runtime vs PyTorch on the CPU: seconds per tile, speedup = PyTorch / ONNX Runtime")
    write_json(args.json, "bench_onnx", rows, quick=args.quick, onnxruntime=onnxruntime.__version__)


if __name__ == "__main__":
    main()

"""``xswinir export CHECKPOINT --format official|safetensors|onnx --out FILE``: weights for other tools.

* ``official``: a ``.pth`` in the official SwinIR layout (``params``, and ``params_ema`` when the checkpoint has
  EMA weights), with every buffer the official code expects: ``network_swinir.SwinIR`` loads it with
  ``strict=True``, and spandrel (chaiNNer, ComfyUI, the Stable Diffusion web UIs) recognises it;
* ``safetensors``: the same keys (EMA weights if any) with our model config in the metadata;
* ``onnx``: an ONNX graph with dynamic height and width (multiples of the window; batch 1), run it with
  ``xswinir upscale --onnx FILE``.

The file is written beside ``--out`` and moved into place when complete, so a failed export leaves an earlier
file of that name untouched.
"""

from __future__ import annotations

import argparse

from xswinir.storage import check_output_file

HELP = "export a checkpoint as an official SwinIR .pth, safetensors or ONNX"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="training checkpoint folder, .safetensors, or .pth (with --preset)")
    # No argparse choices: they would import xswinir.export (and torch) into `xswinir --help`;
    # export_checkpoint names the formats in its one-line error.
    parser.add_argument("--format", required=True, help="output layout: official, safetensors or onnx")
    parser.add_argument("--out", required=True, help="file to write")
    parser.add_argument("--preset", help="architecture of a .pth checkpoint without a stored config")
    parser.add_argument("--tile", type=int, default=64,
                        help="onnx: side of the example input the graph is traced with (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    # lazy: keeps torch off `xswinir --help`
    from xswinir.checkpoint import local_checkpoint
    from xswinir.export import export_checkpoint

    check_output_file(args.out, "--out")  # before the checkpoint is read: one line, not a PermissionError at the end
    with local_checkpoint(args.checkpoint) as checkpoint:  # one in a bucket (s3://...) is downloaded first
        out = export_checkpoint(checkpoint, args.format, args.out, preset=args.preset, tile=args.tile)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.2f} MiB, {args.format})")
    return 0

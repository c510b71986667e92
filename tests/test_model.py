"""SwinIR contracts on tiny configs: shapes, gradients, windows and their caches, parameter counts (its weight
files and their error messages: tests/test_checkpoint.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xswinir.model import (
    SwinIR,
    build_swinir,
    count_parameters,
    pad_to_multiple,
    shifted_window_mask,
    window_attention,
    window_order,
)
from xswinir.model_spec import MODEL_PRESETS, ModelConfig


def tiny(**overrides) -> ModelConfig:
    base = dict(upscale=2, in_chans=3, img_size=16, window_size=4, depths=(2,), embed_dim=12, num_heads=(2,),
                upsampler="pixelshuffledirect")
    return ModelConfig(**{**base, **overrides})


@pytest.mark.parametrize(("upsampler", "upscale", "in_chans", "resi"), [
    ("pixelshuffle", 2, 3, "1conv"),
    ("pixelshuffle", 3, 1, "1conv"),
    ("pixelshuffle", 4, 3, "3conv"),
    ("pixelshuffledirect", 2, 3, "1conv"),
    ("pixelshuffledirect", 3, 1, "3conv"),
    ("nearest+conv", 4, 3, "3conv"),
    ("", 1, 1, "1conv"),
    ("", 1, 3, "3conv"),
])
@pytest.mark.parametrize("size", [(16, 16), (13, 19), (3, 2)])
def test_output_is_scale_times_input(upsampler, upscale, in_chans, resi, size, generator) -> None:
    cfg = tiny(upsampler=upsampler, upscale=upscale, in_chans=in_chans, resi_connection=resi, embed_dim=16)
    model = build_swinir(cfg).eval()
    lq = torch.rand(2, in_chans, *size, generator=generator)
    with torch.no_grad():
        sr = model(lq)
    assert sr.shape == (2, in_chans, size[0] * upscale, size[1] * upscale)
    assert torch.isfinite(sr).all()


def test_window_size_7_and_odd_sizes(generator) -> None:
    model = build_swinir(tiny(window_size=7, img_size=21, upscale=1, upsampler="", img_range=255.0)).eval()
    lq = torch.rand(1, 3, 15, 22, generator=generator)
    with torch.no_grad():
        assert model(lq).shape == lq.shape


def test_restoration_model_starts_near_identity(generator) -> None:
    """upscale 1 adds a residual to the input: with the last conv zeroed, the output is the input."""
    model = build_swinir(tiny(upscale=1, upsampler="")).eval()
    torch.nn.init.zeros_(model.conv_last.weight)
    torch.nn.init.zeros_(model.conv_last.bias)
    lq = torch.rand(1, 3, 12, 9, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(model(lq), lq)


def test_backward_reaches_every_parameter(generator) -> None:
    model = build_swinir(tiny(depths=(2, 2), num_heads=(2, 3), resi_connection="3conv"))
    model.train()
    lq = torch.rand(2, 3, 9, 10, generator=generator)
    model(lq).abs().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not no_grad, f"no gradient reached {no_grad}"


def test_window_order_equals_roll_then_partition() -> None:
    """The cached gather index against the official roll + window_partition, written out with views."""
    height, width, w, shift = 8, 12, 4, 2
    x = torch.arange(height * width).view(1, height, width, 1)
    rolled = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
    windows = rolled.view(1, height // w, w, width // w, w, 1).permute(0, 1, 3, 2, 4, 5).reshape(-1)
    assert torch.equal(window_order(height, width, w, shift, torch.device("cpu")), windows)


def test_shifted_window_mask_blocks_wrapped_tokens() -> None:
    mask = shifted_window_mask(8, 8, 4, 2, torch.device("cpu"))  # (4 windows, 1, 16, 16)
    assert mask.shape == (4, 1, 16, 16)
    assert (mask[0] == 0).all()  # the top-left window holds no wrapped tokens
    assert (mask[3] == -100).any() and (mask[3].diagonal(dim1=-2, dim2=-1) == 0).all()


@pytest.mark.parametrize("mask_shape", [(2, 16, 16), (3, 2, 16, 16)])
def test_window_attention_paths_match_formula(mask_shape, generator) -> None:
    """The fused SDPA path (no grad) and the written-out one (CPU training) against softmax(qk^T/sqrt(d)+m)v."""
    q, k, v = (torch.randn(2, 3, 2, 16, 4, generator=generator) for _ in range(3))
    mask = torch.randn(*mask_shape, generator=generator)
    expected = torch.softmax(q @ k.transpose(-2, -1) / 2.0 + mask, dim=-1) @ v
    with torch.no_grad():
        torch.testing.assert_close(window_attention(q, k, v, mask), expected)
    q.requires_grad_(True)
    out = window_attention(q, k, v, mask)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_window_caches_are_reused_per_size(generator) -> None:
    model = build_swinir(tiny()).eval()
    with torch.no_grad():
        model(torch.rand(1, 3, 16, 16, generator=generator))
        first = model.window_context(16, 16, torch.device("cpu"), torch.float32)
        model(torch.rand(1, 3, 14, 15, generator=generator))  # pads to 16 x 16: the same layout
        assert len(model._contexts) == 1
        assert model.window_context(16, 16, torch.device("cpu"), torch.float32) is first
        model(torch.rand(1, 3, 24, 16, generator=generator))
    assert len(model._contexts) == 2
    other = model.window_context(24, 16, torch.device("cpu"), torch.float32)
    assert other is not first and other.shift_mask.shape[0] == 24 and first.shift_mask.shape[0] == 16


def test_window_cache_keeps_only_recent_sizes() -> None:
    model = build_swinir(tiny())
    cpu = torch.device("cpu")
    first = model.window_context(4, 4, cpu, torch.float32)
    for side in range(8, 48, 4):
        model.window_context(side, 4, cpu, torch.float32)
    assert len(model._contexts) == 8
    assert model.window_context(4, 4, cpu, torch.float32) is not first  # evicted, rebuilt


def test_model_has_no_size_dependent_state() -> None:
    keys = build_swinir(tiny()).state_dict()
    assert not [k for k in keys if k.endswith(("attn_mask", "relative_position_index", "mean"))]


def test_pad_reflects_like_official_and_never_fails(generator) -> None:
    x = torch.rand(1, 3, 10, 13, generator=generator)
    torch.testing.assert_close(pad_to_multiple(x, 8), F.pad(x, (0, 3, 0, 6), mode="reflect"))
    small = torch.rand(1, 1, 1, 3, generator=generator)
    assert pad_to_multiple(small, 8).shape == (1, 1, 8, 8)


def test_bf16_autocast_forward(generator) -> None:
    model = build_swinir(tiny()).eval()
    lq = torch.rand(1, 3, 16, 12, generator=generator)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        sr = model(lq)
    with torch.no_grad():
        ref = model(lq)
    assert sr.shape == ref.shape
    assert (sr.float() - ref).abs().max() < 0.1


@pytest.mark.parametrize(("preset", "expected"), [("swinir-s-x2", 910_152), ("swinir-s-x4", 929_628)])
def test_preset_parameter_counts(preset: str, expected: int) -> None:
    with torch.device("meta"):
        assert count_parameters(build_swinir(MODEL_PRESETS[preset])) == expected


def test_small_img_size_shrinks_window_like_official() -> None:
    model = SwinIR(img_size=4, window_size=8, depths=(2,), embed_dim=12, num_heads=(2,))
    assert model.window_size == 4 and model.shift == 0
    with torch.no_grad():
        assert model(torch.rand(1, 3, 6, 5)).shape == (1, 3, 12, 10)


@pytest.mark.gpu
def test_cuda_matches_cpu_and_trains_in_bf16(generator) -> None:
    model = build_swinir(tiny(depths=(2, 2), num_heads=(2, 2))).eval()
    lq = torch.rand(2, 3, 13, 18, generator=generator)
    with torch.no_grad():
        ref = model(lq)
        model = model.cuda()
        out = model(lq.cuda())
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=2e-3)  # cuDNN may use TF32 convolutions
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = (model(lq.cuda()) - 0.5).abs().mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())

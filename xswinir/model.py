"""SwinIR: image restoration with shifted-window transformers.

Paper: Liang et al., "SwinIR: Image Restoration Using Swin Transformer", ICCVW 2021,
https://arxiv.org/abs/2108.10257. This is an independent implementation with the module and parameter
names of the official code (github.com/JingyunLiang/SwinIR, ``models/network_swinir.py``), so that its
published checkpoints load as they are and give the same outputs.

What differs from the official code, all without changing a result:

* attention runs through ``F.scaled_dot_product_attention`` with the relative position bias (plus the
  shifted-window mask) as its float ``attn_mask`` (4-D, so that the fused kernels take it); only CPU
  training writes the same math out, because SDPA has no fused CPU kernel with a gradient for the mask;
* the token order of the (shifted) windows is one cached index, so cyclic shift + window partition is a
  single gather, and its reverse another one; norms and linear layers run before/after that gather,
  where they act on tokens in any order;
* the relative position index and the shifted-window masks are built once per (input size, device,
  dtype) and cached on the model, not stored as buffers: any input size works and checkpoints carry none;
* features stay channels-last ``(B, H, W, C)`` through the body, and the convolutions of each residual
  group see them as a channels-last ``NCHW`` view, so there is no transpose copy around them;
* inputs whose size is not a multiple of the window are reflect-padded and the output cropped back.

Layout: helpers -> attention -> block -> residual group -> upsamplers -> ``SwinIR`` -> ``build_swinir``.
Reading and writing weights lives in ``xswinir.checkpoint``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xswinir.model_spec import NUM_FEAT, ModelConfig, ResiConnection, Upsampler, check_model_args

# Buffers of the official code that we rebuild instead of loading: they depend on the input size only.
REBUILT_BUFFERS = ("attn_mask", "relative_position_index")
_RGB_MEAN = (0.4488, 0.4371, 0.4040)  # DIV2K mean, as the official code subtracts it
_MASK_VALUE = -100.0  # the official code's value for "other region" in shifted windows (not -inf)
_MAX_CACHED_SIZES = 8  # input sizes whose window layout stays cached


def relative_position_index(window_size: int, device: torch.device | None = None) -> Tensor:
    """Index into a ``((2w-1)^2, heads)`` bias table for every pair of tokens of a ``w x w`` window.

    Returns:
        ``(w*w, w*w)`` int64; entry ``(i, j)`` encodes the offset of token ``j`` relative to token ``i``.
    """
    coords = torch.stack(torch.meshgrid(torch.arange(window_size, device=device),
                                        torch.arange(window_size, device=device), indexing="ij")).flatten(1)
    offset = coords[:, :, None] - coords[:, None, :] + (window_size - 1)  # (2, N, N), in [0, 2w-2]
    return offset[0] * (2 * window_size - 1) + offset[1]


def window_order(height: int, width: int, window_size: int, shift: int, device: torch.device) -> Tensor:
    """Token indices that cyclically shift a ``(H, W)`` grid by ``-shift`` and list it window by window.

    ``tokens[:, index]`` equals ``window_partition(torch.roll(x, (-shift, -shift)))`` of the official code,
    flattened to ``(nW * w * w)`` tokens.

    Returns:
        ``(H*W,)`` int64.
    """
    rows = (torch.arange(height, device=device) + shift) % height
    cols = (torch.arange(width, device=device) + shift) % width
    grid = rows[:, None] * width + cols[None, :]  # (H, W): source token of each shifted position
    nh, nw = height // window_size, width // window_size
    return grid.view(nh, window_size, nw, window_size).permute(0, 2, 1, 3).reshape(-1)


def shifted_window_mask(height: int, width: int, window_size: int, shift: int, device: torch.device) -> Tensor:
    """Additive mask that stops tokens from attending across the seams that the cyclic shift creates.

    Returns:
        ``(nW, 1, N, N)`` float32 with ``N = w*w``: 0 within a region, -100 across regions.
    """
    region = torch.zeros(height, width, device=device)
    bounds = (slice(0, -window_size), slice(-window_size, -shift), slice(-shift, None))
    for i, h in enumerate(bounds):
        for j, w in enumerate(bounds):
            region[h, w] = 3 * i + j
    windows = region.flatten()[window_order(height, width, window_size, 0, device)].view(-1, window_size**2)
    differ = windows[:, None, :] != windows[:, :, None]  # (nW, N, N)
    return torch.where(differ, _MASK_VALUE, 0.0).unsqueeze(1)


class _PermuteTokens(torch.autograd.Function):
    """``x[:, index]`` whose backward is the inverse gather, not a scatter-add: ``index`` is a permutation."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse, index)
        return x.index_select(1, index)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        inverse, _ = ctx.saved_tensors
        return grad.index_select(1, inverse), None, None


@dataclasses.dataclass
class WindowContext:
    """Everything about the window layout of one input size that all blocks share; built once, cached.

    Attributes:
        height, width: the (padded) token grid.
        window_size, shift: of the shifted blocks; plain blocks use shift 0.
        rel_index: ``(N*N,)`` gather index into the bias tables.
        order, inverse: ``(H*W,)`` window order of the plain blocks and its inverse permutation.
        shift_order, shift_inverse: the same for the shifted blocks (``None`` when shift is 0).
        shift_mask: ``(nW, 1, N, N)`` in the compute dtype, or ``None`` when shift is 0.
    """

    height: int
    width: int
    window_size: int
    shift: int
    rel_index: Tensor
    order: Tensor
    inverse: Tensor
    shift_order: Tensor | None
    shift_inverse: Tensor | None
    shift_mask: Tensor | None

    @property
    def num_windows(self) -> int:
        return (self.height // self.window_size) * (self.width // self.window_size)


def build_window_context(height: int, width: int, window_size: int, shift: int, device: torch.device,
                         dtype: torch.dtype) -> WindowContext:
    """Builds the shared index tensors and mask for a ``(height, width)`` token grid (multiples of the window)."""
    order = window_order(height, width, window_size, 0, device)
    shift_order = window_order(height, width, window_size, shift, device) if shift else None
    return WindowContext(
        height=height, width=width, window_size=window_size, shift=shift,
        rel_index=relative_position_index(window_size, device).flatten(),
        order=order, inverse=torch.argsort(order),
        shift_order=shift_order, shift_inverse=torch.argsort(shift_order) if shift else None,
        shift_mask=shifted_window_mask(height, width, window_size, shift, device).to(dtype) if shift else None,
    )


class DropPath(nn.Module):
    """Stochastic depth: drops a whole residual branch per sample with probability ``p`` while training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Mlp(nn.Module):
    """Token-wise two-layer MLP with GELU."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative position bias.

    Args:
        dim: channels C.
        window_size: side w of the square window.
        num_heads: heads; ``dim`` must be divisible by it.
    """

    def __init__(self, dim: int, window_size: int, num_heads: int) -> None:
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, qkv: Tensor, rel_index: Tensor, num_windows: int, mask: Tensor | None) -> Tensor:
        """Attention over windows whose q, k, v projections are already computed.

        Args:
            qkv: ``(B, nW*N, 3C)``, tokens in window order (``N = w*w``).
            rel_index: ``(N*N,)`` gather index into the bias table.
            num_windows: nW per image.
            mask: ``(nW, 1, N, N)`` additive shifted-window mask, or ``None``.

        Returns:
            ``(B, nW*N, C)`` in the same window order, before the output projection.
        """
        batch = qkv.shape[0]
        n = self.window_size**2
        heads, head_dim = self.num_heads, self.dim // self.num_heads
        # (3, B, nW, heads, N, d): strided views of qkv, no copy.
        q, k, v = qkv.view(batch, num_windows, n, 3, heads, head_dim).permute(3, 0, 1, 4, 2, 5).unbind(0)
        # Gathered straight into (heads, N*N): SDPA's fused CPU kernel needs a mask with unit last stride.
        bias = self.relative_position_bias_table.t().index_select(1, rel_index).view(heads, n, n)
        bias = bias.to(q.dtype)  # autocast gives bf16 q while the table stays float32
        attn_mask = bias if mask is None else bias + mask  # (heads, N, N) or (nW, heads, N, N)
        x = window_attention(q, k, v, attn_mask)  # (B, nW, heads, N, d)
        return x.transpose(2, 3).reshape(batch, num_windows * n, self.dim)


def window_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d) + attn_mask) v for a batch of windows.

    Args:
        q, k, v: ``(B, nW, heads, N, d)``.
        attn_mask: ``(heads, N, N)`` or ``(nW, heads, N, N)`` float, added to the scores.

    Returns:
        ``(B, nW, heads, N, d)``.
    """
    batch, num_windows, heads, n, head_dim = q.shape
    if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or attn_mask.requires_grad):
        # SDPA's CPU kernels take no gradient for attn_mask, so training on CPU falls back to SDPA's math
        # path, which spends ~10% of a step on its "safe softmax" checks (measured with torch.profiler);
        # the same math written out, with the bias added in place, is what SDPA would do minus those checks.
        scores = torch.matmul(q * head_dim**-0.5, k.transpose(-2, -1))  # (B, nW, heads, N, N)
        scores += attn_mask
        return torch.matmul(scores.softmax(-1), v)
    if attn_mask.dim() == 3:
        attn_mask = attn_mask.unsqueeze(0)  # a 3-D mask sends SDPA on CPU to its slow math path
    elif batch > 1:
        attn_mask = attn_mask.expand(batch, -1, -1, -1, -1).reshape(batch * num_windows, heads, n, n)
    # Fused kernels want 4-D inputs; merging B and nW of these strided views is free.
    x = F.scaled_dot_product_attention(q.reshape(batch * num_windows, heads, n, head_dim),
                                       k.reshape(batch * num_windows, heads, n, head_dim),
                                       v.reshape(batch * num_windows, heads, n, head_dim), attn_mask=attn_mask)
    return x.view(batch, num_windows, heads, n, head_dim)


class SwinTransformerBlock(nn.Module):
    """Pre-norm transformer block on (optionally cyclically shifted) windows.

    Args:
        dim: channels C.
        num_heads: attention heads.
        window_size: side w of the window.
        shifted: whether this block attends in windows shifted by ``w // 2``.
        mlp_ratio: hidden width of the MLP relative to ``dim``.
        drop_path: stochastic depth rate of both residual branches (training only).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, shifted: bool, mlp_ratio: float,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.shifted = shifted
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, ctx: WindowContext) -> Tensor:
        """Args: x ``(B, H*W, C)`` tokens in raster order; returns the same shape."""
        shifted = self.shifted and ctx.shift > 0
        order, inverse = (ctx.shift_order, ctx.shift_inverse) if shifted else (ctx.order, ctx.inverse)
        # LayerNorm and the qkv projection act per token, so they run before the window gather: one gather
        # of 3C channels replaces the official roll + partition copies.
        qkv = _PermuteTokens.apply(self.attn.qkv(self.norm1(x)), order, inverse)  # (B, nW*N, 3C)
        y = self.attn(qkv, ctx.rel_index, ctx.num_windows, ctx.shift_mask if shifted else None)
        y = _PermuteTokens.apply(y, inverse, order)  # back to raster order
        x = x + self.drop_path(self.attn.proj(y))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class _BlockGroup(nn.Module):
    """The blocks of one residual group; a module of its own only for the official parameter names."""

    def __init__(self, blocks: list[SwinTransformerBlock]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)


def _conv_block(dim: int, resi_connection: ResiConnection) -> nn.Module:
    """The convolution closing a residual group (and the body): one 3x3, or a cheaper 3x3-1x1-3x3 bottleneck."""
    if resi_connection == "1conv":
        return nn.Conv2d(dim, dim, 3, 1, 1)
    if resi_connection == "3conv":
        return nn.Sequential(
            nn.Conv2d(dim, dim // 4, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(dim // 4, dim // 4, 1, 1, 0), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(dim // 4, dim, 3, 1, 1),
        )
    raise ValueError(f"resi_connection must be '1conv' or '3conv', got {resi_connection!r}")


def _tokens_to_image(x: Tensor, height: int, width: int) -> Tensor:
    """``(B, H*W, C)`` -> ``(B, C, H, W)`` as a channels-last view, no copy."""
    return x.view(x.shape[0], height, width, x.shape[2]).permute(0, 3, 1, 2)


def _image_to_tokens(x: Tensor) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, H*W, C)``; free when ``x`` is channels-last."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])


class RSTB(nn.Module):
    """Residual Swin Transformer Block: alternating plain/shifted blocks, a conv, and a long skip.

    Args:
        dim: channels C.
        depth: number of transformer blocks.
        num_heads: attention heads.
        window_size: window side w.
        shift: shift of the odd blocks (0 disables shifting).
        mlp_ratio: MLP width relative to ``dim``.
        drop_path: per-block stochastic depth rates, ``depth`` of them.
        resi_connection: ``"1conv"`` or ``"3conv"``.
    """

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, shift: int, mlp_ratio: float,
                 drop_path: list[float], resi_connection: ResiConnection) -> None:
        super().__init__()
        self.residual_group = _BlockGroup([
            SwinTransformerBlock(dim, num_heads, window_size, shifted=bool(i % 2) and shift > 0,
                                 mlp_ratio=mlp_ratio, drop_path=drop_path[i])
            for i in range(depth)
        ])
        self.conv = _conv_block(dim, resi_connection)

    def forward(self, x: Tensor, ctx: WindowContext) -> Tensor:
        """Args: x ``(B, H*W, C)``; returns the same shape."""
        y = x
        for block in self.residual_group.blocks:
            y = block(y, ctx)
        return _image_to_tokens(self.conv(_tokens_to_image(y, ctx.height, ctx.width))) + x


class PatchEmbed(nn.Module):
    """``(B, C, H, W)`` image features -> ``(B, H*W, C)`` tokens, layer-normed (patch size 1)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(_image_to_tokens(x))


class Upsample(nn.Sequential):
    """Conv + PixelShuffle steps for scales 2^n and 3 (classical SR)."""

    def __init__(self, scale: int, num_feat: int) -> None:
        layers: list[nn.Module] = []
        if scale & (scale - 1) == 0:
            for _ in range(int(math.log2(scale))):
                layers += [nn.Conv2d(num_feat, 4 * num_feat, 3, 1, 1), nn.PixelShuffle(2)]
        elif scale == 3:
            layers += [nn.Conv2d(num_feat, 9 * num_feat, 3, 1, 1), nn.PixelShuffle(3)]
        else:
            raise ValueError(f"upsampler 'pixelshuffle' supports scales 2^n and 3, got {scale}")
        super().__init__(*layers)


class UpsampleOneStep(nn.Sequential):
    """One conv straight to ``scale^2 * out_chans`` channels + PixelShuffle (lightweight SR)."""

    def __init__(self, scale: int, num_feat: int, out_chans: int) -> None:
        super().__init__(nn.Conv2d(num_feat, scale**2 * out_chans, 3, 1, 1), nn.PixelShuffle(scale))


class SwinIR(nn.Module):
    """SwinIR for super-resolution (``upscale`` 2-8) and restoration (``upscale=1``, ``upsampler=""``).

    Args:
        upscale: output/input size ratio.
        in_chans: 1 (gray) or 3 (RGB); the output has as many.
        img_size: the training patch size (LR). Only used, as in the official code, to shrink the window
            (and disable shifting) when ``img_size <= window_size``; any input size works.
        window_size: attention window side.
        img_range: pixel range the body sees: 1.0, or 255.0 for the JPEG models.
        depths: transformer blocks per residual group.
        embed_dim: feature channels.
        num_heads: attention heads per residual group.
        mlp_ratio: MLP width relative to ``embed_dim``.
        upsampler: ``"pixelshuffle"`` (classical), ``"pixelshuffledirect"`` (lightweight), ``"nearest+conv"``
            (real-world, x2 or x4), or ``""`` (upscale 1).
        resi_connection: ``"1conv"`` or ``"3conv"``.
        drop_path_rate: stochastic depth, rising linearly to this over the blocks; 0.1 as in the official code.
    """

    def __init__(self, upscale: int = 2, in_chans: int = 3, img_size: int = 64, window_size: int = 8,
                 img_range: float = 1.0, depths: tuple[int, ...] = (6, 6, 6, 6), embed_dim: int = 60,
                 num_heads: tuple[int, ...] = (6, 6, 6, 6), mlp_ratio: float = 2.0,
                 upsampler: Upsampler = "pixelshuffledirect", resi_connection: ResiConnection = "1conv",
                 drop_path_rate: float = 0.1) -> None:
        super().__init__()
        # ModelConfig's rules (a ConfigError is a ValueError), sizes bounded before anything is allocated.
        check_model_args(upscale=upscale, in_chans=in_chans, img_size=img_size, window_size=window_size,
                         img_range=img_range, depths=depths, embed_dim=embed_dim, num_heads=num_heads,
                         mlp_ratio=mlp_ratio, upsampler=upsampler, resi_connection=resi_connection,
                         drop_path_rate=drop_path_rate)
        self.upscale = upscale
        self.in_chans = in_chans
        self.img_range = img_range
        self.upsampler = upsampler
        # The official blocks shrink the window to the training size and stop shifting when it does not fit.
        self.window_size = min(window_size, img_size)
        self.shift = 0 if img_size <= window_size else self.window_size // 2
        mean = _RGB_MEAN if in_chans == 3 else (0.0,) * in_chans
        self.register_buffer("mean", torch.tensor(mean).view(1, in_chans, 1, 1), persistent=False)
        self._contexts: dict[tuple[int, int, torch.device, torch.dtype], WindowContext] = {}

        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)
        self.patch_embed = PatchEmbed(embed_dim)
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # rising linearly, as official
        starts = [sum(depths[:i]) for i in range(len(depths))]
        self.layers = nn.ModuleList([
            RSTB(embed_dim, depth, heads, self.window_size, self.shift, mlp_ratio, rates[start:start + depth],
                 resi_connection)
            for depth, heads, start in zip(depths, num_heads, starts, strict=True)
        ])
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = _conv_block(embed_dim, resi_connection)

        if upsampler == "pixelshuffle":
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, NUM_FEAT, 3, 1, 1),
                                                      nn.LeakyReLU(inplace=True))
            self.upsample: nn.Module = Upsample(upscale, NUM_FEAT)
            self.conv_last = nn.Conv2d(NUM_FEAT, in_chans, 3, 1, 1)
        elif upsampler == "pixelshuffledirect":
            self.upsample = UpsampleOneStep(upscale, embed_dim, in_chans)
        elif upsampler == "nearest+conv":
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, NUM_FEAT, 3, 1, 1),
                                                      nn.LeakyReLU(inplace=True))
            self.conv_up1 = nn.Conv2d(NUM_FEAT, NUM_FEAT, 3, 1, 1)
            if upscale == 4:
                self.conv_up2 = nn.Conv2d(NUM_FEAT, NUM_FEAT, 3, 1, 1)
            self.conv_hr = nn.Conv2d(NUM_FEAT, NUM_FEAT, 3, 1, 1)
            self.conv_last = nn.Conv2d(NUM_FEAT, in_chans, 3, 1, 1)
            self.lrelu = nn.LeakyReLU(0.2, inplace=True)
        else:
            self.conv_last = nn.Conv2d(embed_dim, in_chans, 3, 1, 1)
        self.apply(_init_weights)

    def window_context(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> WindowContext:
        """The cached window layout of a padded ``(height, width)`` input; built on first use."""
        key = (height, width, device, dtype)
        ctx = self._contexts.pop(key, None)
        if ctx is None:
            ctx = build_window_context(height, width, self.window_size, self.shift, device, dtype)
        self._contexts[key] = ctx  # most recently used last
        # A mask is nW * N^2 floats (64 MiB for a 512^2 input): keep only the latest few sizes.
        while len(self._contexts) > _MAX_CACHED_SIZES:
            self._contexts.pop(next(iter(self._contexts)))
        return ctx

    def _apply(self, fn: Any, recurse: bool = True) -> SwinIR:
        self._contexts.clear()  # .to(device/dtype) leaves cached index tensors on the old device
        return super()._apply(fn, recurse)

    def forward_features(self, x: Tensor) -> Tensor:
        """Deep features: ``(B, C, H, W)`` -> ``(B, C, H, W)`` (channels-last memory), H and W multiples of w."""
        height, width = x.shape[-2:]
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        ctx = self.window_context(height, width, x.device, dtype)
        tokens = self.patch_embed(x)
        for layer in self.layers:
            tokens = layer(tokens, ctx)
        return _tokens_to_image(self.norm(tokens), height, width)

    def forward(self, x: Tensor) -> Tensor:
        """Restores or upscales a batch.

        Args:
            x: ``(B, in_chans, H, W)`` in [0, 1], any H and W.

        Returns:
            ``(B, in_chans, H * upscale, W * upscale)``, roughly in [0, 1] (not clamped).
        """
        height, width = x.shape[-2:]
        x = pad_to_multiple(x, self.window_size)
        x = (x - self.mean) * self.img_range
        if self.upsampler == "":
            first = self.conv_first(x)
            x = x + self.conv_last(self.conv_after_body(self.forward_features(first)) + first)
        else:
            x = self.conv_first(x)
            x = self.conv_after_body(self.forward_features(x)) + x
            if self.upsampler == "pixelshuffle":
                x = self.conv_last(self.upsample(self.conv_before_upsample(x)))
            elif self.upsampler == "pixelshuffledirect":
                x = self.upsample(x)
            else:
                x = self.conv_before_upsample(x)
                x = self.lrelu(self.conv_up1(F.interpolate(x, scale_factor=2, mode="nearest")))
                if self.upscale == 4:
                    x = self.lrelu(self.conv_up2(F.interpolate(x, scale_factor=2, mode="nearest")))
                x = self.conv_last(self.lrelu(self.conv_hr(x)))
        x = x / self.img_range + self.mean
        return x[:, :, : height * self.upscale, : width * self.upscale]


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Reflect-pads the bottom and right of ``(B, C, H, W)`` up to multiples of ``multiple``.

    As the official test code does. Reflection needs the pad to be smaller than the side, so inputs smaller
    than that are reflected in several steps (and a 1-pixel side is replicated) instead of failing.
    """
    height, width = x.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    while pad_h or pad_w:
        step_h = min(pad_h, x.shape[-2] - 1)
        step_w = min(pad_w, x.shape[-1] - 1)
        if (pad_h and step_h == 0) or (pad_w and step_w == 0):
            return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        x = F.pad(x, (0, step_w, 0, step_h), mode="reflect")
        pad_h, pad_w = pad_h - step_h, pad_w - step_w
    return x


def swinir_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """The ``SwinIR`` constructor arguments of a config (the official keyword names)."""
    fields = ("upscale", "in_chans", "img_size", "window_size", "img_range", "depths", "embed_dim", "num_heads",
              "mlp_ratio", "upsampler", "resi_connection")
    kwargs = {name: getattr(cfg, name) for name in fields}
    if hasattr(cfg, "drop_path_rate"):
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    return kwargs


def build_swinir(cfg: ModelConfig) -> SwinIR:
    """The model a :class:`ModelConfig` describes (the only function that reads the config)."""
    return SwinIR(**swinir_kwargs(cfg))


def count_parameters(model: nn.Module) -> int:
    """Number of parameters, counted as the official code does (SwinIR-S x2: 910,152)."""
    return sum(p.numel() for p in model.parameters())

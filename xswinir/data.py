"""Training batches and validation images: HR files -> random gt crops (+ flips/rotations), float32 in [0, 1].

Decoding and cropping run in DataLoader workers; degradations run later, batched on the device
(:mod:`xswinir.degradations`). When the texture term is on (``cfg.loss.texture_weight > 0``) every item also
carries its search region: the region is cut first and augmented, then the gt patch is a random sub-crop of
it, so both see the same flips by construction.

The order is deterministic and resumable: the batch for step ``t`` on rank ``r`` is drawn from a generator
seeded with a hash of ``(cfg.train.seed, t, r)`` - which images, and one crop seed per item - so a run
resumed at step ``t`` sees exactly the batches it would have seen.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from xswinir.config import Config, ConfigError
from xswinir.errors import UserError
from xswinir.images import ImageReadError, read_image, resolve_image_files
from xswinir.resize import modcrop

log = logging.getLogger(__name__)


class DataError(UserError, ValueError):
    """A data source that yields no usable image."""


class SmallImageError(ImageReadError):
    """An image smaller than the training patch (or search region), with ``data.small_images: skip``."""


class ImageList(Protocol):
    """What the dataset needs from a source: names and decoding by index (files or Parquet shards)."""

    names: list[str]

    def __len__(self) -> int: ...

    def load(self, index: int) -> Tensor: ...


class FileImages:
    """Image files read with :func:`xswinir.images.read_image`; names are paths relative to the folder."""

    def __init__(self, paths: list[Path], channels: int = 3, root: Path | None = None) -> None:
        self.paths = paths
        self.channels = channels
        self.names = [p.relative_to(root).as_posix() if root else p.name for p in paths]
        self.sizes: list[tuple[int, int]] | None = None  # unknown until decoded

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Tensor:
        return read_image(self.paths[index], self.channels)


def open_images(source: str, channels: int = 3) -> ImageList:
    """The images of a source: an image folder or file, ``skimage:NAMES``, or Parquet shards (path or URI).

    Raises:
        DataError: the source names nothing.
    """
    from xswinir.shards import ShardImages, is_shard_source

    if is_shard_source(source):
        return ShardImages(source, channels)
    try:
        paths = resolve_image_files(source)
    except FileNotFoundError as err:
        raise DataError(f"data source '{source}': {err}") from err
    root = Path(source).expanduser()
    return FileImages(paths, channels, root if root.is_dir() else None)


def sample_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python versions (unlike ``hash``)."""
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@dataclass
class PatchCutter:
    """Cuts one training item from a decoded HR image, with all randomness from one integer seed.

    Args:
        gt_size: side of the square gt patch.
        with_region: also return the search region around the patch (texture term on).
        region_size: side of the square search region; None: the whole (augmented) image.
        use_flip: random horizontal and vertical flips.
        use_rot: random 90-degree rotation (transpose).
        small_images: ``skip`` raises :class:`SmallImageError` for an image smaller than needed; ``pad``
            reflect-pads it.
        channels: 1 or 3.
    """

    gt_size: int
    with_region: bool = False
    region_size: int | None = None
    use_flip: bool = True
    use_rot: bool = True
    small_images: Literal["skip", "pad"] = "skip"
    channels: int = 3

    @classmethod
    def from_config(cls, cfg: Config) -> PatchCutter:
        return cls(gt_size=cfg.data.gt_size, with_region=cfg.loss.texture_weight > 0,
                   region_size=cfg.texture.region_size, use_flip=cfg.data.use_flip, use_rot=cfg.data.use_rot,
                   small_images=cfg.data.small_images, channels=cfg.model.in_chans)

    @property
    def min_size(self) -> int:
        """The smallest image side that can give an item."""
        if self.with_region and self.region_size is not None:
            return self.region_size
        return self.gt_size

    def check_size(self, image: Tensor, name: str) -> Tensor:
        """``image`` itself, reflect-padded to ``min_size`` in ``pad`` mode; raises SmallImageError in ``skip``."""
        _, H, W = image.shape
        need = self.min_size
        if H >= need and W >= need:
            return image
        if self.small_images == "skip":
            raise SmallImageError(f"{name}: {W}x{H} is smaller than the {need}x{need} patch/region "
                                  f"(set data.small_images=pad to pad it instead)")
        while image.shape[1] < need or image.shape[2] < need:
            # Reflection needs pad < side, so very small images grow in several rounds.
            pad_h = min(max(0, need - image.shape[1]), image.shape[1] - 1)
            pad_w = min(max(0, need - image.shape[2]), image.shape[2] - 1)
            if pad_h == pad_w == 0:  # a 1-pixel side cannot reflect
                image = F.pad(image[None], (0, max(0, need - image.shape[2]), 0, max(0, need - image.shape[1])),
                              mode="replicate")[0]
                break
            image = F.pad(image[None], (0, pad_w, 0, pad_h), mode="reflect")[0]
        return image

    def __call__(self, image: Tensor, seed: int) -> dict[str, Tensor]:
        """One item: ``gt`` (C, gt_size, gt_size) and, with a region, ``region`` (C, R, R') and ``gt_offset`` (2,)."""
        g = torch.Generator().manual_seed(seed)
        flips = torch.rand(3, generator=g) < 0.5  # hflip, vflip, transpose: always drawn, used if enabled
        if self.with_region:
            size = self.region_size
            region = image if size is None else _random_crop(image, size, size, g)
            region = self._augment(region, flips)
            top, left = _random_offset(region.shape[1], region.shape[2], self.gt_size, g)
            gt = region[:, top:top + self.gt_size, left:left + self.gt_size]
            return {"gt": gt.contiguous(), "region": region.contiguous(),
                    "gt_offset": torch.tensor([top, left], dtype=torch.long)}
        gt = _random_crop(image, self.gt_size, self.gt_size, g)
        return {"gt": self._augment(gt, flips).contiguous()}

    def _augment(self, x: Tensor, flips: Tensor) -> Tensor:
        hflip, vflip, transpose = flips.tolist()
        if self.use_flip and hflip:
            x = x.flip(-1)
        if self.use_flip and vflip:
            x = x.flip(-2)
        if self.use_rot and transpose:
            x = x.transpose(-1, -2)
        return x


def _random_offset(H: int, W: int, size: int, g: torch.Generator) -> tuple[int, int]:
    top = int(torch.randint(H - size + 1, (1,), generator=g))
    left = int(torch.randint(W - size + 1, (1,), generator=g))
    return top, left


def _random_crop(image: Tensor, h: int, w: int, g: torch.Generator) -> Tensor:
    top = int(torch.randint(image.shape[1] - h + 1, (1,), generator=g))
    left = int(torch.randint(image.shape[2] - w + 1, (1,), generator=g))
    return image[:, top:top + h, left:left + w]


def collate(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stacks items into a batch; regions of different sizes are zero-padded to the largest.

    Returns:
        ``gt`` (B, C, H, W) float32; with regions also ``region`` (B, C, R, R') float32, ``region_valid``
        (B, 1, R, R') bool (False on padding) and ``gt_offset`` (B, 2) long, (top, left) inside the region.
    """
    batch = {"gt": torch.stack([item["gt"] for item in items])}
    if "region" in items[0]:
        R = max(item["region"].shape[1] for item in items)
        R2 = max(item["region"].shape[2] for item in items)
        C = items[0]["region"].shape[0]
        region = torch.zeros(len(items), C, R, R2)
        valid = torch.zeros(len(items), 1, R, R2, dtype=torch.bool)
        for i, item in enumerate(items):
            _, h, w = item["region"].shape
            region[i, :, :h, :w] = item["region"]
            valid[i, :, :h, :w] = True
        batch.update(region=region, region_valid=valid,
                     gt_offset=torch.stack([item["gt_offset"] for item in items]))
    return batch


class PatchDataset(Dataset):
    """Map-style dataset of training items, indexed by ``(image index, crop seed)`` pairs.

    On construction every image is checked once (decoded, or for shards their recorded size), so unusable
    files are reported up front; decoded images are kept in memory up to ``cache_mb`` (DataLoader workers
    inherit the cache and add to their own copy).

    Args:
        images: the source's images.
        cutter: how an item is cut.
        cache_mb: memory for decoded images, in MiB.

    Raises:
        DataError: no image is usable.
    """

    def __init__(self, images: ImageList, cutter: PatchCutter, cache_mb: float = 1024.0,
                 source: str = "the data source") -> None:
        self.images = images
        self.cutter = cutter
        self.cache_limit = int(cache_mb * 2**20)
        self.cache_bytes = 0
        self.cache: dict[int, Tensor] = {}
        self.usable: list[int] = []
        self.skipped: list[tuple[str, str]] = []
        sizes = getattr(images, "sizes", None)
        for i, name in enumerate(images.names):
            try:
                if sizes is not None:
                    H, W = sizes[i]
                    self.cutter.check_size(torch.empty(0, H, W), name)
                else:
                    self._remember(i, self.cutter.check_size(images.load(i), name))
                self.usable.append(i)
            except ImageReadError as err:
                self.skipped.append((name, str(err)))
                log.warning("skipping %s", err)
        if self.skipped:
            log.warning("%s: skipped %d of %d images", source, len(self.skipped), len(images))
        if not self.usable:
            raise DataError(f"{source}: none of its {len(images)} images is usable "
                            f"({len(self.skipped)} skipped; first: {self.skipped[0][1] if self.skipped else '-'})")

    def _remember(self, index: int, image: Tensor) -> None:
        size = image.numel() * image.element_size()
        if self.cache_bytes + size <= self.cache_limit:
            self.cache[index] = image
            self.cache_bytes += size

    def __len__(self) -> int:
        return len(self.usable)

    def image(self, index: int) -> Tensor:
        """Usable image ``index`` (position in ``usable``), decoded and size-checked."""
        i = self.usable[index]
        cached = self.cache.get(i)
        if cached is not None:
            return cached
        image = self.cutter.check_size(self.images.load(i), self.images.names[i])
        self._remember(i, image)
        return image

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Tensor]:
        index, seed = key
        for attempt in range(len(self.usable)):
            j = (index + attempt) % len(self.usable)
            try:
                return self.cutter(self.image(j), seed)
            except ImageReadError as err:
                # Only reachable for a file that changed since the scan; the substitute is deterministic.
                log.warning("skipping %s; using the next image instead", err)
        raise DataError("no image of the data source can be read any more")


class StepBatchSampler:
    """Infinite batches of ``(index, crop seed)`` pairs; batch ``t`` depends only on ``(seed, t, rank)``."""

    def __init__(self, num_images: int, batch_size: int, seed: int, rank: int, start_step: int = 0) -> None:
        self.num_images = num_images
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.start_step = start_step

    def batch(self, step: int) -> list[tuple[int, int]]:
        g = torch.Generator().manual_seed(sample_seed(self.seed, step, self.rank))
        indices = torch.randint(self.num_images, (self.batch_size,), generator=g)
        seeds = torch.randint(2**62, (self.batch_size,), generator=g)
        return list(zip(indices.tolist(), seeds.tolist(), strict=True))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            yield self.batch(step)
            step += 1


def build_train_batches(cfg: Config, rank: int, world_size: int, start_step: int = 0) -> Iterator[dict[str, Tensor]]:
    """This worker's training batches, forever, starting at ``start_step``.

    Args:
        cfg: the run's config (``data``, ``texture.region_size``, ``loss.texture_weight``, ``train.seed``,
            ``train.batch_size``, ``model.in_chans``).
        rank: this worker's rank in ``[0, world_size)``.
        world_size: number of workers; each gets ``cfg.train.batch_size // world_size`` items per step.
        start_step: the first step, to resume a run.

    Yields:
        dicts as :func:`collate` makes them, on the CPU: ``gt`` (B, C, gt_size, gt_size) float32 in [0, 1],
        and with the texture term ``region``, ``region_valid``, ``gt_offset``.

    Raises:
        DataError: the source names nothing or no image is usable.
    """
    if cfg.train.batch_size % world_size:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} does not split over {world_size} workers")
    cutter = PatchCutter.from_config(cfg)
    dataset = PatchDataset(open_images(cfg.data.train, cfg.model.in_chans), cutter, source=cfg.data.train)
    sampler = StepBatchSampler(len(dataset), cfg.train.batch_size // world_size, cfg.train.seed, rank, start_step)
    workers = cfg.data.loader_workers
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                        persistent_workers=workers > 0, prefetch_factor=2 if workers > 0 else None)
    return iter(loader)


def load_val_images(cfg: Config) -> list[tuple[str, Tensor]]:
    """The validation images: ``(name, (C, H, W) float32 in [0, 1])``, modcropped to the scale.

    Names are file stems (``"chelsea"``); at most ``cfg.data.val_max_images``; unreadable files are skipped
    with a warning.

    Raises:
        DataError: the source names nothing or no image is readable.
    """
    images = open_images(cfg.data.val, cfg.model.in_chans)
    limit = cfg.data.val_max_images
    out: list[tuple[str, Tensor]] = []
    skipped = 0
    for i, name in enumerate(images.names):
        if limit is not None and len(out) >= limit:
            break
        try:
            image = images.load(i)
        except ImageReadError as err:
            skipped += 1
            log.warning("skipping validation image %s", err)
            continue
        if image.shape[1] < cfg.scale or image.shape[2] < cfg.scale:
            skipped += 1
            log.warning("skipping validation image %s: smaller than the scale", name)
            continue
        out.append((Path(name).stem, modcrop(image, cfg.scale)))
    if skipped:
        log.warning("%s: skipped %d validation image(s)", cfg.data.val, skipped)
    if not out:
        raise DataError(f"{cfg.data.val}: no readable validation image")
    return out

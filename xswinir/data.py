"""Training batches and validation images: HR files -> random gt crops (+ flips/rotations), float32 in [0, 1].

Decoding and cropping run in DataLoader worker processes, several crops per decoded image; degradations run
later, batched on the device (:mod:`xswinir.degradations`). Paired data (``data.train_lq``, or shards packed
with ``--lq``) brings its own LQ crops instead, aligned with the gt crops. When the texture term is on
(``cfg.loss.texture_weight > 0``) every item also carries its HR search region: the region is cut first and
augmented, then the gt patch is a random sub-crop of it, so both see the same flips by construction.

The order is deterministic and resumable: the batch for step ``t`` on rank ``r`` is drawn from a generator
seeded with a hash of ``(cfg.train.seed, t, r)`` - which images, and one crop seed per image - so a run
resumed at step ``t`` sees exactly the batches it would have seen.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from xswinir.config import Config, ConfigError
from xswinir.errors import UserError
from xswinir.images import ImageReadError, read_image, read_image_data
from xswinir.paths import printable_path
from xswinir.pixel_limit import MAX_PIXELS_ENV, max_pixels
from xswinir.resize import modcrop
from xswinir.seeds import batch_seed, crop_seed, loader_seed
from xswinir.shards import (
    PairMismatchError,
    ShardImages,
    check_pair_size,
    check_shards,
    is_shard_source,
)
from xswinir.sources import lq_candidates, resolve_image_files
from xswinir.stream import (
    SHUFFLE_ROWS,
    ShardIndex,
    ShardStream,
    StreamDataset,
    StreamRecorder,
    stream_choice,
)

log = logging.getLogger(__name__)

# check_train_source names this many skipped images one by one, then counts the rest.
MAX_NAMED_SKIPS = 20


class DataError(UserError, ValueError):
    """A data source that yields no usable image."""


class SmallImageError(ImageReadError):
    """An image smaller than the training patch (or search region), with ``data.small_images: skip``."""


class ImageList(Protocol):
    """What the dataset needs from a source: names and decoding by index (files or Parquet shards).

    ``paired`` sources also decode the LQ partner of each image with ``load_lq(index)``.
    """

    names: list[str]
    paired: bool

    def __len__(self) -> int: ...

    def load(self, index: int) -> Tensor: ...


class FileImages:
    """Image files read with :func:`xswinir.images.read_image`; names are paths relative to the folder."""

    paired = False

    def __init__(self, paths: list[Path], channels: int = 3, root: Path | None = None) -> None:
        self.paths = paths
        self.channels = channels
        self.names = [p.relative_to(root).as_posix() if root else p.name for p in paths]
        self.sizes: list[tuple[int, int]] | None = None  # unknown until decoded

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Tensor:
        return read_image(self.paths[index], self.channels)


class PairedFiles:
    """HR image files with their LQ partners from another folder, matched by file stem.

    An HR image without a partner stays listed; decoding its LQ raises :class:`PairMismatchError`, so the
    dataset names and skips it like any unreadable image.
    """

    paired = True

    def __init__(self, hr: FileImages, lq_source: str, scale: int) -> None:
        try:
            lq_files = {p.stem: p for p in resolve_image_files(lq_source)}
        except FileNotFoundError as err:
            raise DataError(f"data.train_lq '{printable_path(lq_source)}': {printable_path(str(err))}") from err
        self.hr = hr
        self.names = hr.names
        self.sizes = None
        self.lq_source = lq_source
        self.lq_paths: list[Path | None] = []
        for name in hr.names:
            found = [lq_files[stem] for stem in lq_candidates(name, scale) if stem in lq_files]
            self.lq_paths.append(found[0] if found else None)
        self.scale = scale

    def __len__(self) -> int:
        return len(self.hr)

    def load(self, index: int) -> Tensor:
        return self.hr.load(index)

    def load_lq(self, index: int) -> Tensor:
        path = self.lq_paths[index]
        if path is None:
            looked = printable_path(", ".join(lq_candidates(self.names[index], self.scale)))
            raise PairMismatchError(f"{printable_path(self.names[index])}: no LQ partner in "
                                    f"{printable_path(self.lq_source)} (looked for {looked})")
        return read_image(path, self.hr.channels)


def open_images(source: str, channels: int = 3, lq_source: str | None = None, scale: int = 1,
                verify_checksums: bool = True) -> ImageList:
    """The images of a source: an image folder or file, ``skimage:NAMES``, or Parquet shards (path or URI).

    Args:
        lq_source: a folder of LQ partners matched by file stem (:func:`lq_candidates`); shards carry their
            own (``xswinir pack --lq``).
        scale: the HR / LQ size ratio of paired images.
        verify_checksums: check each shard row's sha256 when it is decoded.

    Raises:
        DataError: the source names nothing, or ``lq_source`` is given for shards.
    """
    if is_shard_source(source):
        if lq_source is not None:
            raise DataError(f"data.train_lq is for image folders: the shards {source} carry their own LQ images "
                            "when packed with `xswinir pack --lq`")
        return ShardImages(source, channels, verify_checksums=verify_checksums)
    try:
        paths = resolve_image_files(source)
    except FileNotFoundError as err:
        raise DataError(f"data source '{source}': {err}") from err
    root = Path(source).expanduser()
    images = FileImages(paths, channels, root if root.is_dir() else None)
    return images if lq_source is None else PairedFiles(images, lq_source, scale)


def check_image_source(source: str, what: str) -> None:
    """Refuses, in one line, a source that names no images: a missing path, an empty folder, unreadable shards.

    Cheap (no decoding): for the sources a run or a study reads only later, inside Ray (``data.val``, a
    study's ``eval_sets``).

    Args:
        what: the setting that names the source, for the message (``"data.val"``).

    Raises:
        DataError: the source names nothing.
        ShardError: a shard file is unreadable or lacks a column (named).
    """
    if is_shard_source(source):
        check_shards(source)
        return
    try:
        resolve_image_files(source)
    except FileNotFoundError as err:
        raise DataError(f"{what} '{printable_path(source)}': {printable_path(str(err))}") from err


def check_train_source(cfg: Config) -> list[tuple[str, str]]:
    """Refuses a training source that cannot work, with one line, before Ray starts; names what will be skipped.

    Shards are checked on their footers. Image folders are checked on every file's header, without decoding
    (seconds for thousands of files): each image must be readable and large enough for a patch (or search
    region), and with ``data.train_lq`` each HR image must have its LQ partner, the HR image's size (after
    modcrop) divided by the scale. A pair whose header sizes disagree is decoded to be sure. What fails is
    what the workers would skip: each is named in a warning here, where the console shows it, and the run is
    refused when nothing is left. (A file that is cut short is only found by decoding it: the workers name
    and skip it.)

    Returns:
        ``(printable name, reason)`` of every image the workers will skip; empty for shards.

    Raises:
        DataError: ``data.train`` or ``data.train_lq`` names nothing, or none of its images is usable.
        ShardError: a shard file is unreadable or lacks a column (named).
    """
    if is_shard_source(cfg.data.train):
        check_shards(cfg.data.train)
        if cfg.data.train_lq is not None:
            raise DataError(f"data.train_lq is for image folders: the shards {cfg.data.train} carry their own LQ "
                            "images when packed with `xswinir pack --lq`")
        return []
    for source in filter(None, (cfg.data.train, cfg.data.train_lq)):
        try:
            resolve_image_files(source)
        except FileNotFoundError as err:
            raise DataError(f"data source '{source}': {err}") from err
    images = open_images(cfg.data.train, cfg.model.in_chans, cfg.data.train_lq, cfg.scale)
    cutter = PatchCutter.from_config(cfg)
    skipped: list[tuple[str, str]] = []
    kinds: Counter[str] = Counter()
    for i, name in enumerate(images.names):
        try:
            _check_image_file(images, i, cutter)
        except ImageReadError as err:
            skipped.append((printable_path(name), str(err)))
            if isinstance(err, PairMismatchError):
                kinds["without an LQ partner" if images.lq_paths[i] is None else "with an LQ partner of the wrong "
                      f"size (not HR / {cfg.scale})"] += 1
            else:
                kinds["smaller than the patch" if isinstance(err, SmallImageError) else "not readable"] += 1
    if skipped and len(skipped) == len(images):
        where = printable_path(cfg.data.train) + (f" (LQ partners in {printable_path(cfg.data.train_lq)})"
                                                  if cfg.data.train_lq else "")
        counts = ", ".join(f"{count} {kind}" for kind, count in kinds.most_common())
        raise DataError(f"data.train {where}: none of its {len(images)} images is usable ({counts}); first: "
                        f"{skipped[0][1]}")
    for _, reason in skipped[:MAX_NAMED_SKIPS]:
        log.warning("training data: skipping %s", reason)
    if len(skipped) > MAX_NAMED_SKIPS:
        log.warning("training data: ... and %d more", len(skipped) - MAX_NAMED_SKIPS)
    if skipped:
        log.warning("training data: %d of %d images are skipped", len(skipped), len(images))
    return skipped


def _header_size(path: Path) -> tuple[int, int]:
    """``(H, W)`` of an image file as decoding gives it (EXIF orientation applied), read from its header.

    Raises:
        ImageReadError: not an image Pillow knows, or over :func:`xswinir.pixel_limit.max_pixels`.
    """
    name = printable_path(path)  # the messages are the decoder's (xswinir.images), so both name a file alike
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below decides
            with Image.open(path) as image:
                W, H = image.size
                orientation = image.getexif().get(0x0112, 1)
    except UnidentifiedImageError as err:
        raise ImageReadError(f"{name}: not a readable image (no image format Pillow knows)") from err
    except Exception as err:  # any reader failure (Pillow raises many kinds) is this file's fault
        raise ImageReadError(f"{name}: not a readable image ({str(err).strip() or type(err).__name__})") from err
    limit = max_pixels()
    if W * H > limit:
        raise ImageReadError(f"{name}: declares {W}x{H} = {W * H:,} pixels, over the limit of {limit:,} (set "
                             f"{MAX_PIXELS_ENV} to raise it)")
    return (W, H) if orientation in (5, 6, 7, 8) else (H, W)  # 5-8 turn the picture by 90 degrees


def _check_image_file(images: FileImages | PairedFiles, index: int, cutter: PatchCutter) -> None:
    """What :class:`PatchDataset` finds decoding image ``index`` of files, found from the headers.

    Raises:
        ImageReadError: the file is unreadable; :class:`SmallImageError` or :class:`PairMismatchError` as the
            dataset raises them.
    """
    name = images.names[index]
    if not images.paired:
        H, W = _header_size(images.paths[index])
        cutter.check_size(torch.empty(0, H, W), name)
        return
    s = cutter.scale
    gt_size = _header_size(images.hr.paths[index])  # in the dataset's order: the HR image, then its partner
    lq_path = images.lq_paths[index]
    if lq_path is None:
        images.load_lq(index)  # raises the dataset's PairMismatchError, naming the stems looked for
    lq_size = _header_size(lq_path)
    try:
        check_pair_size(gt_size, lq_size, name, s)
    except PairMismatchError:
        # Headers can miss a PNG's orientation chunk behind its pixels: decode before calling a pair wrong.
        gt_size = tuple(read_image_data(images.hr.paths[index]).image.shape[1:])
        check_pair_size(gt_size, tuple(read_image_data(lq_path).image.shape[1:]), name, s)
    cutter.check_size(torch.empty(0, gt_size[0] - gt_size[0] % s, gt_size[1] - gt_size[1] % s), name, paired=True)


@dataclass
class PatchCutter:
    """Cuts training items from a decoded HR image (and its LQ partner), with all randomness from one seed.

    Args:
        gt_size: side of the square gt patch.
        with_region: also return the search region around the patch (texture term on).
        region_size: side of the square search region; None: the whole (augmented) image.
        use_flip: random horizontal and vertical flips.
        use_rot: random 90-degree rotation (transpose).
        small_images: ``skip`` raises :class:`SmallImageError` for an image smaller than needed; ``pad``
            reflect-pads it (unpaired images only: padding an HR image would not match its LQ partner).
        channels: 1 or 3.
        scale: HR / LQ size ratio of paired images; crops then start on multiples of it.
    """

    gt_size: int
    with_region: bool = False
    region_size: int | None = None
    use_flip: bool = True
    use_rot: bool = True
    small_images: Literal["skip", "pad"] = "skip"
    channels: int = 3
    scale: int = 1

    @classmethod
    def from_config(cls, cfg: Config) -> PatchCutter:
        return cls(gt_size=cfg.data.gt_size, with_region=cfg.texture_enabled,
                   region_size=cfg.texture.region_size, use_flip=cfg.data.use_flip, use_rot=cfg.data.use_rot,
                   small_images=cfg.data.small_images, channels=cfg.model.in_chans, scale=cfg.scale)

    @property
    def min_size(self) -> int:
        """The smallest image side that can give an item."""
        if self.with_region and self.region_size is not None:
            return self.region_size
        return self.gt_size

    def check_size(self, image: Tensor, name: str, paired: bool = False) -> Tensor:
        """``image`` itself, reflect-padded to ``min_size`` in ``pad`` mode; raises SmallImageError in ``skip``."""
        _, H, W = image.shape
        need = self.min_size
        if H >= need and W >= need:
            return image
        if self.small_images == "skip" or paired:
            hint = "paired images are never padded" if paired else "set data.small_images=pad to pad it instead"
            raise SmallImageError(f"{printable_path(name)}: {W}x{H} is smaller than the {need}x{need} patch/region "
                                  f"({hint})")
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

    def __call__(self, image: Tensor, seed: int, lq: Tensor | None = None) -> dict[str, Tensor]:
        """One item: ``gt`` (C, gt_size, gt_size) and, with a region, ``region`` (C, R, R') and ``gt_offset`` (2,).

        With ``lq`` (the LQ partner of a modcropped ``image``, ``scale`` times smaller) the item also holds
        ``lq`` (C, gt_size / scale, gt_size / scale), the LQ pixels of ``gt``, augmented alike.
        """
        g = torch.Generator().manual_seed(seed)
        flips = torch.rand(3, generator=g) < 0.5  # hflip, vflip, transpose: always drawn, used if enabled
        s = self.scale if lq is not None else 1
        if self.with_region:
            size = self.region_size
            top, left, height, width = 0, 0, image.shape[1], image.shape[2]
            if size is not None:
                top, left = _random_offset(height, width, size, g, s)
                height = width = size
            region = self._augment(image[:, top:top + height, left:left + width], flips)
            gt_top, gt_left = _random_offset(region.shape[1], region.shape[2], self.gt_size, g, s)
            gt = region[:, gt_top:gt_top + self.gt_size, gt_left:gt_left + self.gt_size]
            item = {"gt": gt.contiguous(), "region": region.contiguous(),
                    "gt_offset": torch.tensor([gt_top, gt_left], dtype=torch.long)}
            if lq is not None:
                # Flips of a region whose sides are multiples of s map the LQ pixel grid onto itself.
                lq_region = self._augment(lq[:, top // s:(top + height) // s, left // s:(left + width) // s], flips)
                n = self.gt_size // s
                item["lq"] = lq_region[:, gt_top // s:gt_top // s + n, gt_left // s:gt_left // s + n].contiguous()
            return item
        top, left = _random_offset(image.shape[1], image.shape[2], self.gt_size, g, s)
        item = {"gt": self._augment(image[:, top:top + self.gt_size, left:left + self.gt_size], flips).contiguous()}
        if lq is not None:
            n = self.gt_size // s
            item["lq"] = self._augment(lq[:, top // s:top // s + n, left // s:left // s + n], flips).contiguous()
        return item

    def _augment(self, x: Tensor, flips: Tensor) -> Tensor:
        hflip, vflip, transpose = flips.tolist()
        if self.use_flip and hflip:
            x = x.flip(-1)
        if self.use_flip and vflip:
            x = x.flip(-2)
        if self.use_rot and transpose:
            x = x.transpose(-1, -2)
        return x


def _random_offset(H: int, W: int, size: int, g: torch.Generator, step: int = 1) -> tuple[int, int]:
    """A random (top, left) of a ``size`` window inside ``H x W``, on multiples of ``step``."""
    top = int(torch.randint((H - size) // step + 1, (1,), generator=g)) * step
    left = int(torch.randint((W - size) // step + 1, (1,), generator=g)) * step
    return top, left


def collate(items: list[dict[str, Tensor]] | list[list[dict[str, Tensor]]]) -> dict[str, Tensor]:
    """Stacks items (or lists of items, the crops of one image each) into a batch.

    Regions of different sizes are zero-padded to the largest.

    Returns:
        ``gt`` (B, C, H, W) float32; for paired data ``lq`` (B, C, H / s, W / s); with regions also ``region``
        (B, C, R, R') float32, ``region_valid`` (B, 1, R, R') bool (False on padding) and ``gt_offset``
        (B, 2) long, (top, left) inside the region.
    """
    if items and isinstance(items[0], list):
        items = [item for crops in items for item in crops]
    batch = {"gt": torch.stack([item["gt"] for item in items])}
    if "lq" in items[0]:
        batch["lq"] = torch.stack([item["lq"] for item in items])
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
    """Map-style dataset: key ``(image index, seed, count)`` -> ``count`` items cut from one decoded image.

    Decoding dominates the cost of an item (a 2K PNG takes tens of milliseconds, a crop microseconds), so one
    decode gives several crops. On construction every image is checked once (decoded, or for shards their
    recorded size), so unusable files are reported up front; decoded images are kept in memory up to
    ``cache_mb`` (DataLoader workers inherit the cache and add to their own copy).

    Args:
        images: the source's images; a ``paired`` source also gives each image's LQ partner.
        cutter: how an item is cut.
        cache_mb: memory for decoded images, in MiB.
        source: the source's name for messages.

    Raises:
        DataError: no image is usable.
    """

    def __init__(self, images: ImageList, cutter: PatchCutter, cache_mb: float = 1024.0,
                 source: str = "the data source") -> None:
        self.images = images
        self.cutter = cutter
        self.paired = images.paired
        self.cache_limit = int(cache_mb * 2**20)
        self.cache_bytes = 0
        self.cache: dict[int, tuple[Tensor, Tensor | None]] = {}
        self.usable: list[int] = []
        self.skipped: list[tuple[str, str]] = []
        self.failed: set[int] = set()  # images that failed after the scan, warned about once per process
        sizes = getattr(images, "sizes", None)
        for i, name in enumerate(images.names):
            try:
                if sizes is not None and sizes[i] is not None:  # None: a damaged shard row, found by decoding
                    H, W = sizes[i]
                    s = cutter.scale if self.paired else 1
                    self.cutter.check_size(torch.empty(0, H - H % s, W - W % s), name, self.paired)
                else:
                    self._remember(i, self._decode(i))
                self.usable.append(i)
            except ImageReadError as err:
                self.skipped.append((printable_path(name), str(err)))
                log.warning("skipping %s", err)
        if self.skipped:
            log.warning("%s: skipped %d of %d images", printable_path(source), len(self.skipped), len(images))
        if not self.usable:
            raise DataError(f"{printable_path(source)}: none of its {len(images)} images is usable "
                            f"({len(self.skipped)} skipped; first: {self.skipped[0][1] if self.skipped else '-'})")

    def _decode(self, i: int) -> tuple[Tensor, Tensor | None]:
        """Image ``i`` (modcropped when paired) and its LQ partner, size-checked; raises ImageReadError."""
        name = self.images.names[i]
        image = self.images.load(i)
        if not self.paired:
            return self.cutter.check_size(image, name), None
        s = self.cutter.scale
        image = modcrop(image, s)
        lq = self.images.load_lq(i)
        check_pair_size(tuple(image.shape[1:]), tuple(lq.shape[1:]), name, s)
        return self.cutter.check_size(image, name, paired=True), lq

    def _remember(self, index: int, pair: tuple[Tensor, Tensor | None]) -> None:
        size = sum(x.numel() * x.element_size() for x in pair if x is not None)
        if self.cache_bytes + size <= self.cache_limit:
            self.cache[index] = pair
            self.cache_bytes += size

    def __len__(self) -> int:
        return len(self.usable)

    def image(self, index: int) -> tuple[Tensor, Tensor | None]:
        """Usable image ``index`` (position in ``usable``), decoded and size-checked, with its LQ (or None)."""
        i = self.usable[index]
        cached = self.cache.get(i)
        if cached is not None:
            return cached
        pair = self._decode(i)
        self._remember(i, pair)
        return pair

    def __getitem__(self, key: tuple[int, int, int]) -> list[dict[str, Tensor]]:
        """``count`` items cut from usable image ``index``: the first with ``seed``, the others with seeds
        derived from it, so that the items depend on the key alone."""
        index, seed, count = key
        for attempt in range(len(self.usable)):
            j = (index + attempt) % len(self.usable)
            if self.usable[j] in self.failed:
                continue
            try:
                image, lq = self.image(j)
            except ImageReadError as err:
                # A file that changed since the scan, or a shard row whose checksum does not match; the
                # substitute is deterministic, so batches still depend on (seed, step, rank) alone.
                self.failed.add(self.usable[j])
                log.warning("skipping %s; using the next image instead", err)
                continue
            return [self.cutter(image, seed if c == 0 else crop_seed(seed, c), lq) for c in range(count)]
        raise DataError("no image of the data source can be read any more")


class StepBatchSampler:
    """Infinite batches of ``(index, crop seed, crop count)`` keys; batch ``t`` depends only on ``(seed, t, rank)``.

    Each key asks for ``crops_per_image`` items from one image (fewer for the last key), so a batch of
    ``batch_size`` items decodes ``ceil(batch_size / crops_per_image)`` images.
    """

    def __init__(self, num_images: int, batch_size: int, seed: int, rank: int, start_step: int = 0,
                 crops_per_image: int = 1) -> None:
        self.num_images = num_images
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.start_step = start_step
        self.crops_per_image = crops_per_image

    def batch(self, step: int) -> list[tuple[int, int, int]]:
        g = torch.Generator().manual_seed(batch_seed(self.seed, step, self.rank))
        k = self.crops_per_image
        n = -(-self.batch_size // k)
        indices = torch.randint(self.num_images, (n,), generator=g)
        seeds = torch.randint(2**62, (n,), generator=g)
        counts = [k] * (n - 1) + [self.batch_size - k * (n - 1)]
        return list(zip(indices.tolist(), seeds.tolist(), counts, strict=True))

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        step = self.start_step
        while True:
            yield self.batch(step)
            step += 1


def _collate_then(batch_fn: Callable[[dict[str, Tensor]], dict[str, Tensor]], items: list) -> dict[str, Tensor]:
    """:func:`collate`, then ``batch_fn`` on the batch, in the loader's worker (top-level, so that it pickles)."""
    return batch_fn(collate(items))


def build_train_batches(cfg: Config, rank: int, world_size: int, start_step: int = 0,
                        batch_fn: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None
                        ) -> Iterator[dict[str, Tensor]]:
    """This worker's training batches, forever, starting at ``start_step``.

    Image folders and Parquet shards (local or remote) take the same path: DataLoader worker processes
    (``data.loader_workers``) decode images and cut ``data.crops_per_image`` items from each, so the training
    loop only moves finished batches. Shards whose encoded size is over ``data.stream_above_mb`` are streamed
    (:mod:`xswinir.stream`: this rank's share of the row groups, read on demand through a bounded shuffle
    buffer) instead of held in memory; one log line says which and why.

    Args:
        cfg: the run's config (``data``, ``texture.region_size``, ``loss.texture_weight``, ``train.seed``,
            ``train.batch_size``, ``model.in_chans``, ``model.upscale`` for paired data).
        rank: this worker's rank in ``[0, world_size)``.
        world_size: number of workers; each gets ``cfg.train.batch_size // world_size`` items per step.
        start_step: the first step, to resume a run.
        batch_fn: applied to each collated batch in the worker processes (e.g. the texture search,
            :meth:`xswinir.texture.search.TextureSearch.attach_match`); None: the batches as collated.

    Yields:
        dicts as :func:`collate` makes them, on the CPU: ``gt`` (B, C, gt_size, gt_size) float32 in [0, 1];
        for paired data ``lq``; with the texture term ``region``, ``region_valid``, ``gt_offset``.

    Raises:
        DataError: the source names nothing or no image is usable.
    """
    return build_train_batches_keeping_position(cfg, rank, world_size, start_step, batch_fn)[0]


def build_train_batches_keeping_position(
    cfg: Config, rank: int, world_size: int, start_step: int = 0,
    batch_fn: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
    resume_position: Callable[[ShardIndex], dict | None] | None = None,
    checkpoint_after: Callable[[int], bool] | None = None,
) -> tuple[Iterator[dict[str, Tensor]], StreamRecorder | None]:
    """:func:`build_train_batches`, and for streamed shards what a checkpoint needs to continue the stream.

    Args:
        resume_position: for streamed shards, ``index -> this rank's saved position`` (a
            :meth:`~xswinir.stream.StreamPosition.state_dict`) to continue from instead of replaying the index
            bookkeeping to ``start_step``, or None where no saved position applies; unused otherwise.
        checkpoint_after: for streamed shards, whether a checkpoint is written after a number of steps: the
            returned recorder keeps the stream's position at those steps. None: no recorder.

    Returns:
        The batches, and the :class:`~xswinir.stream.StreamRecorder` when the shards stream and
        ``checkpoint_after`` is given (None otherwise).
    """
    if cfg.train.batch_size % world_size:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} does not split over {world_size} workers")
    if is_shard_source(cfg.data.train) and cfg.data.train_lq is None:
        stream, why = stream_choice(cfg)
        log.info("training data %s: %s", printable_path(cfg.data.train), why)
        if stream:
            return _stream_batches(cfg, rank, world_size, start_step, batch_fn, resume_position=resume_position,
                                   checkpoint_after=checkpoint_after)
    cutter = PatchCutter.from_config(cfg)
    images = open_images(cfg.data.train, cfg.model.in_chans, cfg.data.train_lq, cfg.scale,
                         cfg.data.verify_checksums)
    if images.paired:
        log.info("paired data: LQ crops come from %s; no degradations in training",
                 printable_path(cfg.data.train_lq or cfg.data.train))
    dataset = PatchDataset(images, cutter, source=cfg.data.train)
    sampler = StepBatchSampler(len(dataset), cfg.train.batch_size // world_size, cfg.train.seed, rank, start_step,
                               cfg.data.crops_per_image)
    return loader_batches(dataset, sampler, cfg.data.loader_workers, cfg.train.seed, rank, batch_fn), None


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


def _stream_batches(cfg: Config, rank: int, world_size: int, start_step: int = 0,
                    batch_fn: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
                    capacity: int = SHUFFLE_ROWS, *,
                    resume_position: Callable[[ShardIndex], dict | None] | None = None,
                    checkpoint_after: Callable[[int], bool] | None = None,
                    ) -> tuple[Iterator[dict[str, Tensor]], StreamRecorder | None]:
    """This worker's training batches streamed from ``data.train``'s shards, forever, from ``start_step``.

    As :func:`build_train_batches_keeping_position` (same arguments, same batches' layout); the images differ,
    since they are drawn from this rank's share through the shuffle buffer (:mod:`xswinir.stream`).
    """
    index = ShardIndex(cfg.data.train)
    if index.paired:
        log.info("paired data: LQ crops come from %s; no degradations in training", printable_path(cfg.data.train))
    position = resume_position(index) if resume_position is not None else None
    stream = ShardStream(index, cfg.train.batch_size // world_size, cfg.train.seed, rank, world_size,
                         0 if position is not None else start_step, cfg.data.crops_per_image, capacity)
    if position is not None:
        stream.position.load_state_dict(position)
    # The recorder sits between the stream and the DataLoader, which draws steps ahead of the training loop.
    recorder = StreamRecorder(stream, checkpoint_after) if checkpoint_after is not None else None
    dataset = StreamDataset(PatchCutter.from_config(cfg), index.paired, cfg.data.verify_checksums)
    sampler = recorder if recorder is not None else stream
    return loader_batches(dataset, sampler, cfg.data.loader_workers, cfg.train.seed, rank, batch_fn), recorder


def loader_batches(dataset: Dataset, sampler: Iterable[list], workers: int, seed: int, rank: int,
                   batch_fn: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None
                   ) -> Iterator[dict[str, Tensor]]:
    """The DataLoader both paths share: ``sampler`` yields each step's keys, ``workers`` processes decode them.

    Args:
        dataset: :class:`PatchDataset` or :class:`xswinir.stream.StreamDataset`.
        sampler: each step's keys (:class:`StepBatchSampler` or :class:`xswinir.stream.ShardStream`).
        workers: DataLoader worker processes (``data.loader_workers``); 0 decodes in this process.
        seed: ``train.seed``, for the loader's own generator.
        rank: this worker's rank.
        batch_fn: as in :func:`build_train_batches`.
    """
    # Its own generator: starting the iterator (on resume, too) must not draw from the global RNG.
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                        collate_fn=collate if batch_fn is None else functools.partial(_collate_then, batch_fn),
                        persistent_workers=workers > 0, prefetch_factor=2 if workers > 0 else None,
                        generator=torch.Generator().manual_seed(loader_seed(seed, rank)))
    return iter(loader)

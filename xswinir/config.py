"""Typed configuration: the one source of truth for the CLI, Ray Train and Ray Tune.

A run is described by one :class:`Config`. It is built from the dataclass defaults, then an optional YAML
file, then ``--set section.field=value`` overrides, and validated before any work starts. The resolved
config travels to Ray Train workers as a plain dict (``to_dict``/``from_dict``), Ray Tune applies its
samples with the same :func:`apply_overrides` the CLI uses, and every checkpoint stores it, so a model can
be rebuilt from its checkpoint alone.

Sections with a ``preset`` field (``model``, ``degradation``) start from the named preset; the other keys
given beside it override the preset's values. The ``model`` section, its rules and its presets are SwinIR's
and live beside it, in :mod:`xswinir.model_spec`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from xswinir.errors import ConfigError, UserError, show
from xswinir.model_spec import MODEL_PRESETS, ModelConfig
from xswinir.paths import printable_path

PixelLoss = Literal["l1", "l2", "charbonnier"]
TextureForm = Literal["projection", "pull", "gated_pull"]
SearchIn = Literal["auto", "loader", "step"]
TextureQuery = Literal["gt", "lq"]
ResizeMode = Literal["bicubic", "bilinear", "area", "matlab"]

# A config or sweep file holds a few hundred values; YAML aliases can make a 400-byte file expand to billions.
MAX_YAML_VALUES = 10_000
MAX_YAML_BYTES = 1_000_000


class YAMLSizeError(yaml.YAMLError):
    """Valid YAML that holds, or through its aliases expands to, more than :data:`MAX_YAML_VALUES` values."""


class _AliasLimitedLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml when PyYAML has it
    """PyYAML's safe loader that refuses documents whose aliases expand beyond :data:`MAX_YAML_VALUES` values."""

    def construct_document(self, node: yaml.Node) -> Any:
        _check_expansion(node)
        return super().construct_document(node)


def _check_expansion(root: yaml.Node) -> None:
    # Counts every value as often as aliases repeat it, memoised per node: linear in the file, not the expansion.
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    active: set[int] = set()
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            active.discard(key)
            children = _children(node)
            sizes[key] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[key] > MAX_YAML_VALUES:
                written = _count_nodes(root)
                if written > MAX_YAML_VALUES:  # a long list written out, not an alias bomb: say so
                    raise YAMLSizeError(f"the document holds {written:,} values, more than the "
                                        f"{MAX_YAML_VALUES:,} values a config file may hold")
                raise YAMLSizeError(f"the document expands to more than {MAX_YAML_VALUES:,} values through its "
                                    "aliases (nested aliases); write the values out")
            continue
        if key in sizes:
            continue
        if key in active:
            raise yaml.YAMLError("the document has an alias inside its own anchor (a recursive value)")
        active.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in sizes)


def _count_nodes(root: yaml.Node) -> int:
    """The values a document writes out, each once however often aliases repeat it."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) not in seen:
            seen.add(id(node))
            stack.extend(_children(node))
    return len(seen)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with aliases bounded (see :data:`MAX_YAML_VALUES`); raises ``yaml.YAMLError``."""
    return yaml.load(text, Loader=_AliasLimitedLoader)  # noqa: S506 - a SafeLoader subclass


@dataclass
class DataConfig:
    """Where training and validation images come from and how training patches are cut.

    A source is an image folder, Parquet shards written by ``xswinir pack`` (a local path or any URI that
    pyarrow reads, such as ``s3://``), or ``skimage:NAME,NAME,...`` for images that ship inside
    the scikit-image wheel (``skimage:train`` and ``skimage:val`` name two disjoint default sets).
    """

    train: str = "skimage:train"
    val: str = "skimage:val"
    gt_size: int = 64  # HR training patch; the LR patch is gt_size // scale
    use_flip: bool = True
    use_rot: bool = True
    small_images: Literal["skip", "pad"] = "skip"  # images smaller than the patch or search region
    # LQ partners of data.train's images (a folder, matched by file stem as `eval --lr` does): training then
    # learns from these real pairs and the degradation pipeline is off. Shards carry theirs (`pack --lq`).
    train_lq: str | None = None
    # Items cut from each decoded image: decoding a 2K PNG costs tens of ms, a crop microseconds, so several
    # crops per decode is what lets a few CPU cores feed a GPU; the images of a batch are still drawn at random.
    crops_per_image: int = 4
    verify_checksums: bool = True  # check each shard row's sha256 when it is decoded (a mismatch is skipped)
    loader_workers: int = 2
    stream_above_mb: float = 2048.0  # shards larger than this stream (xswinir.stream); smaller: held in memory
    val_max_images: int | None = None
    val_tile: int | None = None  # LR tile size for validation inference; None: whole images

    def __post_init__(self) -> None:
        if not self.train or not self.val:
            raise ConfigError("data.train and data.val must name a source")
        if self.gt_size < 1:
            raise ConfigError(f"data.gt_size must be >= 1, got {self.gt_size}")
        for name in ("val_max_images", "val_tile"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1 or null, got {getattr(self, name)}")
        if self.crops_per_image < 1 or self.loader_workers < 0:
            raise ConfigError("data.crops_per_image must be >= 1 and data.loader_workers >= 0")
        if self.stream_above_mb < 0:
            raise ConfigError(f"data.stream_above_mb must be >= 0, got {self.stream_above_mb}")


@dataclass
class DegradationConfig:
    """Random degradations drawn per sample on the device: gt -> lq.

    Ranges are ``(low, high)`` and sampled uniformly per sample; a ``*_prob`` is the chance that a sample
    gets that operation. Noise sigmas are on the 0-255 scale.
    """

    preset: str | None = None
    blur_prob: float = 1.0
    blur_kernel_size: int = 21
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    blur_anisotropic_prob: float = 0.5
    motion_blur_prob: float = 0.0
    motion_kernel_size: int = 9
    resize: ResizeMode = "bicubic"
    noise_prob: float = 1.0
    noise_sigma: tuple[float, float] = (1.0, 25.0)
    noise_gray_prob: float = 0.4
    poisson_prob: float = 0.0
    poisson_scale: tuple[float, float] = (0.05, 3.0)
    jpeg_prob: float = 0.0
    jpeg_quality: tuple[float, float] = (30.0, 95.0)
    second_order_prob: float = 0.0  # Real-ESRGAN style: a second blur -> resize -> noise -> JPEG round
    second_blur_sigma: tuple[float, float] = (0.2, 1.5)
    second_resize_range: tuple[float, float] = (0.3, 1.2)
    second_noise_sigma: tuple[float, float] = (1.0, 25.0)
    second_jpeg_quality: tuple[float, float] = (30.0, 95.0)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_prob") and not 0.0 <= value <= 1.0:
                raise ConfigError(f"degradation.{f.name} must lie in [0, 1], got {value}")
            if isinstance(value, tuple) and not value[0] <= value[1]:
                raise ConfigError(f"degradation.{f.name} must be (low, high) with low <= high, got {value}")
        for name in ("blur_kernel_size", "motion_kernel_size"):
            if getattr(self, name) < 1 or getattr(self, name) % 2 == 0:
                raise ConfigError(f"degradation.{name} must be odd and >= 1, got {getattr(self, name)}")
        # A Gaussian of sigma 0 divides by zero; a resize by 0 has no pixels; the second round's canvas is
        # sized for the largest resize factor.
        for name in ("blur_sigma", "second_blur_sigma", "second_resize_range"):
            if not getattr(self, name)[0] > 0:
                raise ConfigError(f"degradation.{name} must be > 0, got {getattr(self, name)}")
        for name in ("noise_sigma", "second_noise_sigma", "poisson_scale"):
            if getattr(self, name)[0] < 0:
                raise ConfigError(f"degradation.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("jpeg_quality", "second_jpeg_quality"):
            if not 1 <= getattr(self, name)[0] <= getattr(self, name)[1] <= 100:
                raise ConfigError(f"degradation.{name} must lie in [1, 100], got {getattr(self, name)}")
        if self.second_resize_range[1] > 4:
            raise ConfigError(f"degradation.second_resize_range must be at most 4, got {self.second_resize_range}")


DEGRADATION_PRESETS: dict[str, DegradationConfig] = {
    # Classical SR: the benchmarks' MATLAB bicubic down-sampling and nothing else.
    "bicubic": DegradationConfig(preset="bicubic", blur_prob=0.0, resize="matlab", noise_prob=0.0),
    # The XSwinIR target: blurry and noisy inputs.
    "blur-noise": DegradationConfig(preset="blur-noise"),
    # Second-order degradations in the manner of Real-ESRGAN.
    "realistic": DegradationConfig(
        preset="realistic", motion_blur_prob=0.2, poisson_prob=0.3, jpeg_prob=0.8, second_order_prob=0.8,
    ),
}
# The XSwinIR target: what training degrades with by default, and what a study or an explanation degrades an HR
# image with unless told otherwise.
DEFAULT_DEGRADATION = "blur-noise"


@dataclass
class ClassifierConfig:
    """Features and training of the linear texture classifier (``xswinir texture train``)."""

    path: str | None = None  # a trained classifier; None: train one from data.train (cached by its settings)
    scales: tuple[int, ...] = (1, 2, 4)  # filter-bank scales, in pixels
    num_orientations: int = 4
    layout_grid: int = 4  # layout features: cells per side of the window's coarse, contrast-normalised thumbnail
    num_pairs: int = 8192  # training pairs, half positive
    max_images: int = 64  # evenly spaced images of the source, each centre-cropped to at most 512 x 512
    positive_max_shift: float = 2.0  # positives: a window within this many patch sizes that the search may pick
    positive_min_correlation: float = 0.5  # |luma correlation| a positive pair must reach (0: any neighbour)
    near_negative_fraction: float = 0.4  # of the negatives: nearby windows whose luma does not correlate
    near_negative_max_correlation: float = 0.2  # |luma correlation| at most this makes a nearby negative
    lq_query_fraction: float = 0.5  # pairs whose query window comes from the degraded image (LQ -> HR matching)
    hard_negative_fraction: float = 0.5  # of the negatives: far-apart windows of one image, not two images
    hard_negative_quantile: float = 0.9  # such a pair must differ more than this quantile of positive pairs
    holdout_fraction: float = 0.2
    steps: int = 300
    lr: float = 0.1
    weight_decay: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ConfigError(f"texture.classifier.holdout_fraction must lie in (0, 1), got {self.holdout_fraction}")
        for name in ("hard_negative_fraction", "hard_negative_quantile", "lq_query_fraction",
                     "positive_min_correlation", "near_negative_fraction", "near_negative_max_correlation"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"texture.classifier.{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.num_pairs < 16 or self.steps < 1 or self.num_orientations < 1 or not self.scales or self.max_images < 1:
            raise ConfigError("texture.classifier needs num_pairs >= 16, steps >= 1, num_orientations >= 1, "
                              "max_images >= 1 and at least one scale")
        if self.layout_grid < 0:
            raise ConfigError(f"texture.classifier.layout_grid must be >= 0 (0: no layout features), got "
                              f"{self.layout_grid}")
        if self.positive_max_shift < 1:
            raise ConfigError(f"texture.classifier.positive_max_shift must be >= 1 (patch sizes), got "
                              f"{self.positive_max_shift}")
        if any(s < 1 for s in self.scales) or self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError("texture.classifier.scales must be positive, lr > 0 and weight_decay >= 0")
        if self.seed < 0 or self.path == "":
            raise ConfigError("texture.classifier.seed must be >= 0 and texture.classifier.path not empty")


@dataclass
class TextureConfig:
    """The texture search behind the loss's second term: which windows X are candidates for a target tile."""

    patch_size: int = 16  # the classifier's patch size p; targets are split into p x p tiles
    stride: int = 4  # between candidate windows
    top_k: int = 5
    min_score: float = 0.5  # candidates scoring below this are not used
    max_iou: float = 0.0  # candidates overlapping the tile's own position more than this are excluded (0: none)
    ridge: float = 1e-3  # Tikhonov regularisation of the least-squares solve, relative to ||X||^2
    region_size: int | None = 128  # HR search region around each patch; None: the whole HR image
    # Whose tiles the classifier compares with the HR windows: gt's own, or the degraded input up-sampled to
    # the HR grid (the original XSwinIR's "sub-images of the low-quality input"; what `explain --lq` has for a
    # real photo).
    query: TextureQuery = "gt"
    # Where training runs the search. step: in the training step, on the model's device. loader: in the
    # DataLoader's worker processes, on the CPU, with the crop (query gt only: the degraded input is made in the
    # step), so that the training thread only computes the term. auto: loader when training on the CPU with
    # query gt, else step. The windows, c* and the term are the same either way.
    search_in: SearchIn = "auto"
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)

    def __post_init__(self) -> None:
        if self.patch_size < 4 or self.stride < 1 or self.top_k < 1:
            raise ConfigError("texture.patch_size must be >= 4, texture.stride and texture.top_k >= 1")
        if not 0.0 <= self.max_iou < 1.0:
            raise ConfigError(f"texture.max_iou must lie in [0, 1), got {self.max_iou}")
        if not 0.0 <= self.min_score <= 1.0 or self.ridge < 0:
            raise ConfigError(f"texture.min_score must lie in [0, 1] and texture.ridge be >= 0, got "
                              f"{self.min_score} and {self.ridge}")
        if self.region_size is not None and self.region_size < self.patch_size:
            raise ConfigError(f"texture.region_size must be >= texture.patch_size={self.patch_size} or null, got "
                              f"{self.region_size}")
        if self.search_in == "loader" and self.query != "gt":
            raise ConfigError("texture.search_in=loader needs texture.query=gt (the degraded input the lq query "
                              "compares with is made in the training step); use search_in=step or auto")


@dataclass
class LossConfig:
    """``L = pixel(sr, gt) + texture_weight * texture(sr, gt)``; the forms are explained in ``xswinir.losses``."""

    pixel: PixelLoss = "l1"
    texture_weight: float = 0.0  # lambda; 0 gives exactly the SwinIR loss and never loads the classifier
    # projection: |P_X (sr - gt)|, 0 at sr = gt (consistent); pull: |sr - X c*|, the first form, kept to compare;
    # gated_pull: pull only on patches where X c* fits gt better than bicubic of the input
    texture_form: TextureForm = "projection"
    texture_dist: PixelLoss = "l1"
    charbonnier_eps: float = 1e-3

    def __post_init__(self) -> None:
        if not self.texture_weight >= 0:
            raise ConfigError(f"loss.texture_weight must be >= 0, got {self.texture_weight}")
        if not self.charbonnier_eps > 0:
            raise ConfigError(f"loss.charbonnier_eps must be > 0, got {self.charbonnier_eps}")


@dataclass
class TrainConfig:
    """Optimisation; step counts are optimizer steps, batch_size is the total over all workers."""

    total_steps: int = 500_000
    batch_size: int = 64
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    scheduler: Literal["multistep", "cosine"] = "multistep"
    milestones: tuple[int, ...] = (250_000, 400_000, 450_000, 475_000)
    gamma: float = 0.5
    warmup_steps: int = 0
    min_lr: float = 1e-7  # floor of the cosine schedule
    grad_clip: float | None = None  # max gradient norm; None: no clipping
    ema_decay: float = 0.999
    bf16: bool = True  # autocast on CUDA only; CPU runs stay in float32
    seed: int = 0
    log_every: int = 100
    val_every: int = 5000  # validation, checkpoint and ray.train.report happen together

    def __post_init__(self) -> None:
        if self.total_steps < 1 or self.batch_size < 1 or self.val_every < 1 or self.log_every < 1:
            raise ConfigError("train.total_steps, batch_size, val_every and log_every must be >= 1")
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"train.betas must lie in [0, 1), got {self.betas}")
        if self.weight_decay < 0 or self.min_lr < 0 or self.warmup_steps < 0 or self.seed < 0:
            raise ConfigError("train.weight_decay, min_lr, warmup_steps and seed must be >= 0")
        if not self.gamma > 0 or (self.grad_clip is not None and not self.grad_clip > 0):
            raise ConfigError(f"train.gamma and train.grad_clip must be > 0, got {self.gamma} and {self.grad_clip}")
        if any(m < 0 for m in self.milestones):
            raise ConfigError(f"train.milestones must be >= 0, got {show(self.milestones)}")
        if list(self.milestones) != sorted(self.milestones):
            raise ConfigError(f"train.milestones must be increasing, got {self.milestones}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must lie in [0, 1), got {self.ema_decay}")


@dataclass
class RunConfig:
    """Where and how the run executes on Ray."""

    name: str = "xswinir"
    storage: str = "runs"  # local folder or URI (s3://, gs://); local paths are made absolute
    address: str | None = None  # None: start a local single-node Ray; "auto" or ray://... joins a cluster
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # Worker-group restarts from the newest good checkpoint before the run fails; -1: no limit. None: 5 when
    # joining a cluster (preemptions, lost nodes), 2 on a local Ray (a failure there is mostly a bug).
    max_failures: int | None = None
    keep_checkpoints: int = 2
    log_dir: str | None = None  # metrics.jsonl, TensorBoard, curves; None: <storage>/<name>/logs (local storage)
    progress: bool = True  # a progress bar on the driver for local runs
    # How Ray places the workers: PACK fills a node first (fast collectives); SPREAD puts them on different
    # nodes when it can, and on what remains after a node is lost; the STRICT_ forms never bend (a lost node
    # then stops the run until a replacement joins).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"run.num_workers must be >= 1, got {self.num_workers}")
        if not self.cpus_per_worker > 0:
            raise ConfigError(f"run.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"run.keep_checkpoints must be >= 1 (the latest is what --resume needs), got "
                              f"{self.keep_checkpoints}")
        check_name(self.name, "run.name")
        if not self.storage or self.log_dir == "" or self.address == "":
            raise ConfigError("run.storage, run.log_dir and run.address must not be empty")


@dataclass
class Config:
    """A whole run. Cross-section rules are checked here."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    degradation: DegradationConfig = field(default_factory=lambda: DEGRADATION_PRESETS[DEFAULT_DEGRADATION])
    texture: TextureConfig = field(default_factory=TextureConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        scale = self.model.upscale
        if self.data.gt_size % scale:
            raise ConfigError(f"data.gt_size={self.data.gt_size} is not a multiple of model.upscale={scale}")
        if self.train.batch_size % self.run.num_workers:
            raise ConfigError(
                f"train.batch_size={self.train.batch_size} (the total) does not split evenly over "
                f"run.num_workers={self.run.num_workers}"
            )
        if self.texture_enabled:
            p = self.texture.patch_size
            if self.data.gt_size % p:
                raise ConfigError(f"data.gt_size={self.data.gt_size} is not a multiple of texture.patch_size={p}")
            smallest = 2 * max(self.texture.classifier.scales) + 1  # the widest texture filter
            if p < smallest:
                raise ConfigError(
                    f"texture.patch_size={p} is smaller than the classifier's widest filter ({smallest} px for "
                    f"texture.classifier.scales={self.texture.classifier.scales})"
                )
            region = self.texture.region_size
            if region is not None and region < self.data.gt_size:
                raise ConfigError(f"texture.region_size={region} is smaller than data.gt_size={self.data.gt_size}")
            if self.data.train_lq is not None and region is not None and region % scale:
                # Paired regions are cut on the LQ pixel grid.
                raise ConfigError(f"texture.region_size={region} is not a multiple of model.upscale={scale} "
                                  "(needed with data.train_lq)")

    @property
    def scale(self) -> int:
        return self.model.upscale

    @property
    def texture_enabled(self) -> bool:
        """Whether the loss has its texture term: only then is a classifier loaded and a search region cut."""
        return self.loss.texture_weight > 0

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        return build_section(cls, data, "")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_PRESETS: dict[type, dict[str, Any]] = {ModelConfig: MODEL_PRESETS, DegradationConfig: DEGRADATION_PRESETS}


def check_name(name: str, where: str) -> None:
    """A run name becomes a folder (and Ray's experiment name): no path separators, no ``..``, no control codes."""
    if (not name or len(name) > 200 or name in (".", "..") or any(c in name for c in "/\\")
            or any(ord(c) < 32 for c in name)):
        raise ConfigError(f"{where} must be 1-200 characters without '/', '\\' or control characters and not "
                          f"'.' or '..' (it names a folder), got {show(name)}")


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Checks ``value`` against the annotation ``tp``; converts lists to tuples and ints to floats.

    Numbers must be finite and integers fit in 64 bits, so that no later comparison or conversion fails.
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where} may not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {show(value)} does not fit {_type_name(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if not isinstance(value, (str, int, float, bool)) or value not in choices:
            raise ConfigError(f"{where} must be one of {list(choices)}, got {show(value)}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {show(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where} must have {len(args)} items, got {show(list(value))}")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where} is a section: give it a mapping of its keys, got {show(value)}")
        return build_section(tp, value, where)
    if value is None:
        raise ConfigError(f"{where} may not be null")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {show(value)}")
        if abs(value) >= 2**63:
            raise ConfigError(f"{where} must fit in 64 bits, got {show(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {show(value)}")
        if isinstance(value, int) and abs(value) >= 2**63 or not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {show(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{where} must be a string, got {show(value)}")
        return str(value)
    return value


def unknown_key_error(cls: type, key: Any, where: str) -> ConfigError:
    """The error for ``key`` not being a field of the dataclass ``cls``, with the closest field as a hint."""
    names = [f.name for f in dataclasses.fields(cls)]
    hint = difflib.get_close_matches(str(key), names, n=1)
    suggestion = f"; did you mean '{hint[0]}'?" if hint else f"; known keys: {', '.join(names)}"
    shown = key if isinstance(key, str) and len(key) <= 80 and key.isprintable() else show(key)
    return ConfigError(f"unknown config key '{where + '.' if where else ''}{shown}'{suggestion}")


def build_section(cls: type, data: Any, where: str) -> Any:
    """The dataclass ``cls`` built from a plain mapping (parsed YAML/JSON), every value checked against its type.

    ``where`` is the dotted name used in error messages (``"model"``; ``""`` for a root). Sections with a
    ``preset`` field start from the named preset. Raises :class:`ConfigError` for an unknown key, a value of
    the wrong type, or a value the section's ``__post_init__`` refuses.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'the config'} must be a mapping, got {show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise unknown_key_error(cls, key, where)
    base: dict[str, Any] = {}
    preset_name = data.get("preset")
    if cls in _PRESETS and preset_name is not None:
        presets = _PRESETS[cls]
        if not isinstance(preset_name, str) or preset_name not in presets:
            raise ConfigError(f"{where}.preset {show(preset_name)} is unknown; choose one of {sorted(presets)}")
        base = {f: getattr(presets[preset_name], f) for f in fields}
    kwargs = {}
    for name in fields:
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], f"{where}.{name}" if where else name)
        elif name in base:
            kwargs[name] = base[name]
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{where or 'config'}: {err}") from err



def _clip(text: str, limit: int = 200) -> str:
    """One line of at most ``limit`` characters (PyYAML's messages span several; a value may be huge)."""
    text = " ".join(text[: 4 * limit].split()) + (" ..." if len(text) > 4 * limit else "")
    return text if len(text) <= limit else f"{text[:limit]}..."


def parse_override(text: str) -> tuple[list[str], Any]:
    """Splits ``"a.b=value"`` into (["a", "b"], value), the value parsed as YAML (``1e-4``, ``[1, 2]``, ``null``)."""
    if "=" not in text:
        raise ConfigError(f"override '{_clip(text)}' is not of the form section.key=value")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"override '{_clip(text)}' has an empty key")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except YAMLSizeError as err:  # valid YAML, only too large
        raise ConfigError(f"override '{_clip(text)}': {err}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{_clip(text)}': the value is not valid YAML ({_clip(str(err))})") from err
    # YAML reads 1e-4 as a string (YAML 1.1 wants a dot); numbers are what people mean.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else value
        except ValueError:
            pass
    return path, value


def apply_overrides(cfg: Config, overrides: dict[str, Any] | list[str]) -> Config:
    """Returns a new, validated config with dotted-key overrides applied.

    Args:
        cfg: the config to start from; it is not changed.
        overrides: ``{"loss.texture_weight": 0.1}`` (Ray Tune samples) or ``["loss.texture_weight=0.1"]``
            (the CLI's ``--set``). Setting a section's ``preset`` first resets that section to the preset.
    """
    if isinstance(overrides, dict):
        items = [(str(key).split("."), value) for key, value in overrides.items()]
    else:
        items = [parse_override(text) for text in overrides]
    data = cfg.to_dict()
    # Presets first, so that `--set model.preset=swinir-m-x4 --set model.depths=[6,6]` means what it says.
    items.sort(key=lambda item: item[0][-1] != "preset")
    for path, value in items:
        # Walk the sections (dicts) with their classes; a key below a plain value does not exist.
        node: dict[str, Any] = data
        section: type = Config
        for depth, part in enumerate(path):
            where = ".".join(path[:depth])
            if part not in node:
                raise unknown_key_error(section, part, where)
            if depth == len(path) - 1:
                break
            child = typing.get_type_hints(section)[part]
            if not dataclasses.is_dataclass(child):
                raise ConfigError(f"{'.'.join(path[:depth + 1])} is a value, not a section: "
                                  f"'{_clip('.'.join(path))}' does not exist")
            node, section = node[part], child
        leaf = path[-1]
        if dataclasses.is_dataclass(typing.get_type_hints(section)[leaf]) and not isinstance(value, dict):
            raise ConfigError(f"{'.'.join(path)} is a section, not a value: set one of its keys "
                              f"({'.'.join(path)}.<key>=...), got {show(value)}")
        if leaf == "preset" and section in _PRESETS and value is not None:
            # The section restarts from the new preset; later overrides then apply on top of it.
            if not isinstance(value, str) or value not in _PRESETS[section]:
                raise ConfigError(f"{'.'.join(path)} {show(value)} is unknown; choose one of "
                                  f"{sorted(_PRESETS[section])}")
            node.clear()
            node.update(_to_plain(_PRESETS[section][value]))
        node[leaf] = value
    return Config.from_dict(data)


PACKAGED_CONFIGS = Path(__file__).parent / "configs"


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A YAML path as given, or the name of a config shipped with the package (``demo``, ``swinir_s_x2``)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    packaged = PACKAGED_CONFIGS / f"{path.stem if path.suffix in ('.yaml', '.yml') else path.name}.yaml"
    if packaged.is_file() and len(path.parts) == 1:
        return packaged
    shipped = sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml"))
    raise ConfigError(f"config '{printable_path(name_or_path)}' is neither a file nor a shipped config "
                      f"({', '.join(shipped)})")


def read_yaml_mapping(path: Path, error: type[UserError] = ConfigError, what: str = "a mapping") -> dict[str, Any]:
    """The mapping a YAML file holds (an empty file: ``{}``); ``error`` names the file otherwise.

    The file must be UTF-8, at most :data:`MAX_YAML_BYTES`, and its aliases may not expand beyond
    :data:`MAX_YAML_VALUES` values; every failure is one ``error`` line.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise error(f"{printable_path(path)} has {size:,} bytes; a config file may have at most {MAX_YAML_BYTES:,}")
        raw = path.read_bytes()
    except OSError as err:
        raise error(f"{printable_path(path)} cannot be read: {err.strerror or err}") from err
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{printable_path(path)} is not UTF-8 text (byte {err.start}: {raw[err.start:err.start + 1]!r}); "
                    "save it as UTF-8") from err
    try:
        data = load_yaml(text)
    except YAMLSizeError as err:  # valid YAML, only too large
        raise error(f"{printable_path(path)}: {err}") from err
    except yaml.YAMLError as err:
        raise error(f"{printable_path(path)} is not valid YAML: {_clip(str(err), 400)}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{printable_path(path)} must hold {what}, not {type(data).__name__} {show(data)}")
    return data


def read_experiment_file(path: str | Path, extra_overrides: list[str] | None = None,
                         changes: dict[str, Any] | None = None) -> tuple[Path, dict[str, Any]]:
    """A sweep's or a study's YAML as a plain mapping, before its own typed builder sees it.

    Such a file names a ``base`` training config and a list of ``overrides`` for it; the command line replaces
    top-level values (its flags) and appends to the overrides (its ``--set``).

    Args:
        path: the YAML file, or the name of a shipped one (``sweep_demo``, ``study_cpu``).
        extra_overrides: ``section.key=value`` strings appended to the file's ``overrides``.
        changes: top-level values that replace the file's, where not None.

    Returns:
        The file's path and the mapping, with ``overrides`` a list.

    Raises:
        ConfigError: the file cannot be read, or its ``overrides`` is not a list; the message names the file.
    """
    file = resolve_config_path(path)
    data = {**read_yaml_mapping(file), **{k: v for k, v in (changes or {}).items() if v is not None}}
    overrides = data.get("overrides")
    overrides = [] if overrides is None else overrides
    if not isinstance(overrides, list):
        raise ConfigError(f"{printable_path(file)}: overrides must be a list of 'section.key=value' strings, got "
                          f"{show(overrides)}")
    data["overrides"] = [*overrides, *(extra_overrides or [])]
    return file, data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file (a path or a shipped config's name) <- ``section.key=value`` overrides, validated."""
    cfg = Config()
    if path is not None:
        path = resolve_config_path(path)
        data = read_yaml_mapping(path)
        try:
            cfg = Config.from_dict(data)
        except ConfigError as err:
            raise ConfigError(f"{printable_path(path)}: {err}") from err
    return apply_overrides(cfg, overrides or [])


def load_experiment_base(base: str | Path, overrides: list[str]) -> Config:
    """A sweep's or study's training config: its ``base`` file, then its ``overrides``, each error naming which.

    Raises:
        ConfigError: ``base: ...`` when the base file is missing or invalid, ``overrides: ...`` when an override
            is malformed, names an unknown key or makes the config invalid.
    """
    try:
        cfg = load_config(base)
    except ConfigError as err:  # `base: config 'x' is neither a file nor ...`
        raise ConfigError(f"base: {err}") from err
    try:
        return apply_overrides(cfg, overrides)
    except ConfigError as err:  # `overrides: override '' is not of the form section.key=value`
        raise ConfigError(f"overrides: {err}") from err


def config_fields(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the config, for help texts and for checking search spaces."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(config_fields(hints[f.name], key + "."))
        else:
            keys.append(key)
    return keys

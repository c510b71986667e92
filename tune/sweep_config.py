"""The sweep YAML as a typed :class:`SweepConfig`, checked before Ray starts.

A sweep file goes through the same typed loader as the training config (:func:`xswinir.config.read_experiment_file`
and :func:`xswinir.config.build_section`, the builder behind ``Config.from_dict``): an unknown key gets a "did you
mean", and a value of the wrong type, a metric the trainer never reports or a search domain that makes an invalid
training config is a one-line :class:`~xswinir.config.ConfigError` (a ``UserError``), never a traceback from
inside a trial.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from xswinir.config import (
    Config,
    ConfigError,
    apply_overrides,
    build_section,
    check_name,
    load_experiment_base,
    read_experiment_file,
    show,
    unknown_key_error,
)
from xswinir.metrics import VAL_PSNR_Y, VAL_SSIM_Y
from xswinir.paths import experiment_path, printable_path
from xswinir.tune.search_space import Domain, check_search_space, parse_search_space

TEXTURE_WEIGHT = "loss.texture_weight"
PATCH_SIZE = "texture.patch_size"
# What a sweep can optimise: the model's validation metrics, as `train_loop_per_worker` reports them
# (`xswinir.evaluation.validate`). It reports the bicubic ones too, but no trial can change those.
SWEEP_METRICS: tuple[str, ...] = (VAL_PSNR_Y, VAL_SSIM_Y)


@dataclass
class SchedulerConfig:
    """ASHA early stopping on the sweep's metric; times are optimizer steps (the trainer reports ``step``)."""

    type: Literal["asha", "none"] = "asha"
    grace_period: int = 100  # steps every trial runs before it may be stopped
    reduction_factor: int = 2  # keep the best 1/reduction_factor at every rung

    def __post_init__(self) -> None:
        if self.grace_period < 1:
            raise ConfigError(f"scheduler.grace_period must be >= 1 step, got {self.grace_period}")
        if self.reduction_factor < 2:
            raise ConfigError(f"scheduler.reduction_factor must be >= 2, got {self.reduction_factor}")


@dataclass
class SweepConfig:
    """A sweep: a base training config, fixed overrides, a search space and how to search it."""

    name: str = "sweep"
    base: str = "demo"  # a shipped training config's name or a YAML path
    overrides: tuple[str, ...] = ()  # `section.key=value`, applied to base before sampling
    search: dict[str, Domain] = field(default_factory=dict)
    num_samples: int = 8  # trials in all, the baseline included
    max_concurrent: int = 2
    seed: int = 0  # Optuna's TPE sampler (numpy's RandomState: 0 <= seed < 2**32)
    metric: str = VAL_PSNR_Y
    mode: Literal["max", "min"] = "max"
    baseline: bool = True  # evaluate loss.texture_weight=0 as the first trial
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    storage: str = "outputs/sweeps"  # local folder or URI; the sweep lands in <storage>/<name>
    address: str | None = None  # Ray cluster to join; None: local Ray (or the job's cluster)
    max_failures: int = 0  # retries of a failed trial; -1: retry forever

    def __post_init__(self) -> None:
        check_name(self.name, "name")  # the sweep's folder under its storage
        if not self.base or not self.storage:
            raise ConfigError("base and storage must not be empty")
        if self.num_samples < 1 or self.max_concurrent < 1:
            raise ConfigError(f"num_samples and max_concurrent must be >= 1, got {self.num_samples} and "
                              f"{self.max_concurrent}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must lie in [0, 2**32), got {self.seed}")
        if self.max_failures < -1:
            raise ConfigError(f"max_failures must be >= 0 (or -1: retry forever), got {self.max_failures}")
        if self.metric not in SWEEP_METRICS:
            hint = difflib.get_close_matches(self.metric, SWEEP_METRICS, n=1)
            suggestion = f"did you mean '{hint[0]}'? " if hint else ""
            raise ConfigError(f"metric {show(self.metric)} is not reported by the trainer; {suggestion}"
                              f"choose one of {list(SWEEP_METRICS)}")
        if self.baseline and TEXTURE_WEIGHT not in self.search:
            raise ConfigError(f"baseline: true needs {TEXTURE_WEIGHT} in the search space (it compares against λ=0)")

    def base_config(self) -> Config:
        """The training config every trial starts from: ``base`` + ``overrides``, validated."""
        return load_experiment_base(self.base, list(self.overrides))

    def experiment_path(self) -> str:
        return experiment_path(self.storage, self.name)


_SWEEP_KEYS = {f.name for f in dataclasses.fields(SweepConfig)}


def load_sweep_config(path: str | Path, extra_overrides: list[str] | None = None, **changes: Any) -> SweepConfig:
    """Reads a sweep YAML (a path or a shipped config's name) and checks it against the training config.

    Args:
        path: the YAML file, or the name of one in ``xswinir/configs`` (``sweep_demo``).
        extra_overrides: ``section.key=value`` appended to the YAML's ``overrides`` (the CLI's ``--set``).
        changes: top-level fields to replace (``storage``, ``num_samples``, ``address``) where not None;
            typed and checked like the file's own values.

    Raises:
        ConfigError: an unreadable file, unknown keys, wrong types, bad domains, a metric the trainer does not
            report, or domain values that make an invalid training config. The message names the file.
    """
    file, data = read_experiment_file(path, extra_overrides, changes)  # one-line errors that name the file
    try:
        sweep = _parse(data, file)
        base = sweep.base_config()
        if sweep.scheduler.type == "asha" and sweep.scheduler.grace_period > base.train.total_steps:
            raise ConfigError(f"scheduler.grace_period={sweep.scheduler.grace_period} exceeds train.total_steps="
                              f"{base.train.total_steps}: ASHA could never stop a trial")
        check_search_space(base, sweep.search)
        if sweep.baseline:
            apply_overrides(base, {TEXTURE_WEIGHT: 0.0})
    except ConfigError as err:
        raise ConfigError(f"{printable_path(file)}: {err}") from err
    return sweep


def _parse(data: dict[str, Any], file: Path) -> SweepConfig:
    for key in data:
        if key not in _SWEEP_KEYS:
            raise unknown_key_error(SweepConfig, key, "")
    search = parse_search_space(data.pop("search", None))
    base = data.get("base")
    if isinstance(base, str) and base and not Path(base).is_absolute():
        # A base given as a path is relative to the sweep file, like an include.
        beside = file.parent / base
        if beside.is_file():
            data["base"] = str(beside)
    # The search space is typed by parse_search_space; the builder types and checks every other field.
    return build_section(SweepConfig, {**data, "search": search}, "")

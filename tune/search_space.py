"""Search spaces: dotted config keys mapped to typed domains, checked against the config before Ray starts.

A sweep YAML names each searched value by its config key, exactly as ``--set`` does::

    search:
      loss.texture_weight: {type: loguniform, low: 0.01, high: 1.0}
      texture.patch_size: {type: choice, values: [16, 32]}
      train.lr: {type: loguniform, low: 1.0e-4, high: 2.0e-3}
      texture.top_k: {type: int, low: 2, high: 8}

:func:`check_search_space` makes sure every key is a config field and every value the domain can produce
is a valid config (a ``choice`` of patch sizes that does not divide ``data.gt_size`` fails here, not in
trial 7). :func:`to_tune` turns the domains into Ray Tune domains for ``OptunaSearch``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from xswinir.config import Config, ConfigError, apply_overrides, config_fields, show

DomainType = Literal["loguniform", "uniform", "int", "choice"]
DOMAIN_TYPES: tuple[str, ...] = ("loguniform", "uniform", "int", "choice")


@dataclass(frozen=True)
class Domain:
    """One searched value: ``low``/``high`` for numeric domains (both inclusive), ``values`` for ``choice``."""

    type: DomainType
    low: float | None = None
    high: float | None = None
    values: tuple[Any, ...] | None = None

    def __post_init__(self) -> None:
        if self.type not in DOMAIN_TYPES:
            raise ConfigError(f"domain type {show(self.type)} is unknown; choose one of {list(DOMAIN_TYPES)}")
        if self.type == "choice":
            if not self.values:
                raise ConfigError("a choice domain needs a non-empty `values` list")
            if self.low is not None or self.high is not None:
                raise ConfigError("a choice domain takes `values`, not `low`/`high`")
            return
        if self.values is not None:
            raise ConfigError(f"a {self.type} domain takes `low` and `high`, not `values`")
        if self.low is None or self.high is None or not self.low < self.high:
            raise ConfigError(f"a {self.type} domain needs low < high, got low={self.low}, high={self.high}")
        if not math.isfinite(self.high - self.low):
            raise ConfigError(f"a {self.type} domain's width high - low overflows: {self.low}, {self.high}")
        if self.type == "loguniform" and self.low <= 0:
            raise ConfigError(f"a loguniform domain needs low > 0, got {self.low} (0 is the baseline: see baseline)")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)
                                   or max(abs(self.low), abs(self.high)) > 2**53):
            raise ConfigError(f"an int domain needs integer bounds within ±2**53, got {self.low}, {self.high}")

    def corners(self) -> list[Any]:
        """Values that exercise the domain's extremes: both bounds, or every choice."""
        if self.type == "choice":
            return list(self.values or ())
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [float(self.low), float(self.high)]


def parse_domain(key: str, spec: Any) -> Domain:
    """A :class:`Domain` from its YAML mapping, e.g. ``{type: choice, values: [16, 32]}``."""
    if not isinstance(spec, dict):
        raise ConfigError(f"search.{key} must be a mapping like {{type: loguniform, low: 0.01, high: 1}}, got "
                          f"{show(spec)}")
    unknown = set(spec) - {"type", "low", "high", "values"}
    if unknown:
        raise ConfigError(f"search.{key}: unknown domain keys {sorted(map(str, unknown))} (type, low, high, values)")
    if "type" not in spec:
        raise ConfigError(f"search.{key} needs a `type`: one of {list(DOMAIN_TYPES)}")
    values = spec.get("values")
    if values is not None and not isinstance(values, list):
        raise ConfigError(f"search.{key}.values must be a list, got {show(values)}")
    for bound in ("low", "high"):
        value = spec.get(bound)
        # Strings ("0.1"), booleans and inf would reach Tune's samplers and fail inside a trial.
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise ConfigError(f"search.{key}.{bound} must be a finite number, got {show(value)}")
    for value in values or ():
        # Optuna's CategoricalDistribution takes these and nothing else.
        if value is not None and not isinstance(value, (bool, int, float, str)) or (
                isinstance(value, float) and not math.isfinite(value)):
            raise ConfigError(f"search.{key}.values must be numbers, strings, booleans or null, got {show(value)}")
    try:
        return Domain(
            type=spec["type"], low=spec.get("low"), high=spec.get("high"),
            values=tuple(values) if values is not None else None,
        )
    except ConfigError as err:
        raise ConfigError(f"search.{key}: {err}") from err


def parse_search_space(search: dict[str, Any]) -> dict[str, Domain]:
    """Domains by dotted key from the ``search`` mapping of a sweep YAML; keys must be config fields."""
    if not isinstance(search, dict) or not search:
        raise ConfigError("the sweep needs a non-empty `search` mapping of config keys to domains")
    known = set(config_fields())
    for key in search:
        if not isinstance(key, str):
            raise ConfigError(f"search key {show(key)} is not a dotted config key such as 'loss.texture_weight'")
        if key not in known:
            import difflib

            hint = difflib.get_close_matches(key, sorted(known), n=1)
            suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
            raise ConfigError(f"search key {show(key)} is not a config field{suggestion}")
    return {key: parse_domain(key, spec) for key, spec in search.items()}


def check_search_space(base: Config, space: dict[str, Domain]) -> None:
    """Raises :class:`ConfigError` if a domain's extreme values make an invalid config (type or cross-field).

    Each key's corners are tried with the other keys at their lower corner; that catches wrong types and
    rules such as ``data.gt_size % texture.patch_size == 0`` for every ``choice`` value.
    """
    floor = {key: domain.corners()[0] for key, domain in space.items()}
    for key, domain in space.items():
        for value in domain.corners():
            try:
                apply_overrides(base, {**floor, key: value})
            except ConfigError as err:
                raise ConfigError(f"search.{key}={show(value)} makes an invalid config: {err}") from err


def to_tune(space: dict[str, Domain]) -> dict[str, Any]:
    """Ray Tune domains by dotted key (``tune.loguniform``, ``tune.choice``, ...), for ``OptunaSearch(space=...)``."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, d in space.items():
        if d.type == "loguniform":
            out[key] = tune.loguniform(d.low, d.high)
        elif d.type == "uniform":
            out[key] = tune.uniform(d.low, d.high)
        elif d.type == "int":
            out[key] = tune.randint(int(d.low), int(d.high) + 1)  # Tune's upper bound is exclusive
        else:
            out[key] = tune.choice(list(d.values or ()))
    return out


def to_optuna(space: dict[str, Domain]) -> dict[str, Any]:
    """Optuna distributions by key, the ones ``OptunaSearch`` derives from :func:`to_tune` (for rebuilding a study)."""
    import optuna

    out: dict[str, Any] = {}
    for key, d in space.items():
        if d.type == "choice":
            out[key] = optuna.distributions.CategoricalDistribution(list(d.values or ()))
        elif d.type == "int":
            out[key] = optuna.distributions.IntDistribution(int(d.low), int(d.high))
        else:
            out[key] = optuna.distributions.FloatDistribution(d.low, d.high, log=d.type == "loguniform")
    return out


def numeric_position(domain: Domain, value: Any) -> float:
    """Where a value lies in its domain on the scale the sampler uses (log for loguniform, index for choice)."""
    if domain.type == "choice":
        return float(list(domain.values or ()).index(value))
    if domain.type == "loguniform":
        return math.log(float(value))
    return float(value)

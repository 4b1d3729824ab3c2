"""The declarative VAE search space, turned into Optuna ``suggest_*`` calls.

A study's space is the default VAE space (every knob of the mission) with the user's overrides
applied, fixed values removed from the search, and dropped parameters left at their defaults.

Two reparameterisations keep every sample valid:
- ``max_lr`` is sampled as ``max_lr_factor`` × ``base_lr`` (factor > 1), so cyclical and one-cycle
  policies never get ``max_lr <= base_lr`` (Smith 2017 suggests max/base ≈ 3–4).
- LRs are sampled **at the reference batch size** and the trainer scales them to the sampled batch
  size with the linear rule (Goyal et al. 2017) or, as an option, the square-root rule.

Conditional parameters are sampled only when their parent takes a value that uses them (cycle
count and ratio only under the cyclical KL schedule; the half-cycle length only under the CLR
policies), so the sampler never learns from parameters that had no effect.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from pydantic import ValidationError

from hpo_service.constraints import check_constraints
from hpo_service.errors import InvalidSpec
from hpo_service.schemas import (
    DERIVED_PARAMETERS,
    ParamSpec,
    ParamValue,
    StudySpec,
    TrainConfig,
    train_split_size,
)

_CLR_POLICIES = ("triangular", "triangular2", "exp_range")
_PEAKED_POLICIES = ("triangular", "triangular2", "exp_range", "cosine", "one_cycle")
_WARMUP_KL = ("linear", "cosine", "sigmoid")


@dataclass(frozen=True)
class Param:
    """One dimension of the space, with the condition under which it is sampled."""

    name: str
    kind: str  # "float" | "int" | "categorical"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[ParamValue, ...] | None = None
    parent: str | None = None  # sampled only when `parent` takes one of `when`
    when: tuple[ParamValue, ...] = ()

    def distribution(self) -> BaseDistribution:
        if self.kind == "categorical":
            assert self.choices is not None
            return CategoricalDistribution(list(self.choices))
        assert self.low is not None and self.high is not None
        if self.kind == "int":
            step = 1 if self.step is None else int(self.step)
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=step)
        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def contains(self, value: Any) -> bool:
        """Whether ``value`` lies in this dimension (used to check enqueued configurations)."""
        if self.choices is not None:
            return any(value == c and type(value) is type(c) for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.kind == "int" and not float(value).is_integer():
            return False
        assert self.low is not None and self.high is not None
        return self.low <= value <= self.high

    def bounds(self) -> tuple[ParamValue, ...]:
        """The values a spec check probes: both ends of a range, or every choice."""
        if self.choices is not None:
            return self.choices
        assert self.low is not None and self.high is not None
        if self.kind == "int":
            return (int(self.low), int(self.high))
        return (self.low, self.high)


def default_space(epochs: int) -> list[Param]:
    """The default VAE space, in sampling order (parents before children).

    Ranges scale with the run length so warm-ups and cycles always fit inside it.
    """
    half = max(epochs / 2, 0.5)
    return [
        # 1) KL annealing: schedule, warm-up length, cycles (Bowman 2016; Fu et al. 2019)
        Param("kl_schedule", "categorical", choices=("constant", "linear", "cosine", "cyclical")),
        Param("kl_warmup_epochs", "float", 0.0, half, parent="kl_schedule", when=_WARMUP_KL),
        Param(
            "kl_cycles", "int", 1, max(1, min(8, epochs)), parent="kl_schedule", when=("cyclical",)
        ),
        Param("kl_ratio", "float", 0.25, 1.0, parent="kl_schedule", when=("cyclical",)),
        # 2) learning-rate policy and its cycle (Smith 2017; Smith & Topin 2017)
        Param(
            "lr_policy",
            "categorical",
            choices=("constant", "triangular", "triangular2", "cosine", "one_cycle"),
        ),
        Param(
            "lr_half_cycle_epochs",
            "float",
            min(1.0, epochs / 4),
            half,
            parent="lr_policy",
            when=_CLR_POLICIES,
        ),
        # Issue 10's measurement (mnist5k, 10 epochs): every trial below 4e-4 was pruned or poor
        # and the best sat at the old 3e-3 cap, so the range starts at 3e-4 and reaches 1e-2.
        Param("base_lr", "float", 3e-4, 1e-2, log=True),
        Param(
            "max_lr_factor", "float", 2.0, 10.0, log=True, parent="lr_policy", when=_PEAKED_POLICIES
        ),
        Param("lr_warmup_epochs", "float", 0.0, epochs / 4),
        # 3) optimizer and regularisation (Loshchilov & Hutter 2019; Liu et al. 2020)
        Param("optimizer", "categorical", choices=("adamw", "radam")),
        Param("weight_decay", "float", 1e-6, 1e-1, log=True),
        Param("grad_clip_norm", "float", 1.0, 100.0, log=True),
        # 4) batch size: powers of two; LRs above are at the reference batch and scaled.
        #    256 never ranked in issue 10's measurement (fewest steps per epoch at a fixed
        #    epoch budget), so the default stops at 128.
        Param("batch_size", "categorical", choices=(32, 64, 128)),
        # 5) free bits λ in nats per latent dimension (Kingma et al. 2016)
        Param("free_bits", "float", 0.0, 1.0),
    ]


def _field_kind(name: str) -> str:
    """float / int / categorical for a config field a user adds to the space."""
    if name in DERIVED_PARAMETERS:
        return "float"
    annotation = TrainConfig.model_fields[name].annotation
    if annotation in (float, float | None):
        return "float"
    if annotation in (int, int | None):
        return "int"
    return "categorical"


def _is_power_of_two(value: Any) -> bool:
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and value > 0
        and (value & (value - 1) == 0)
    )


def _apply_override(name: str, base: Param | None, override: ParamSpec) -> Param:
    ranged = override.low is not None or override.high is not None
    kind: str
    if override.type:
        kind = override.type
    elif override.choices is not None:
        kind = "categorical"
    elif ranged and (base is None or base.kind == "categorical"):
        # a range over a parameter whose default is a set of choices (the batch size): the
        # field's own kind, never the default's choices kept and the range silently dropped
        kind = _field_kind(name)
    else:
        kind = base.kind if base else _field_kind(name)
    if base is None:
        base = Param(name, kind)
    if kind == "categorical":
        if ranged:
            raise InvalidSpec(
                f"search_space.{name}",
                "`low`/`high` are for numbers: give `choices` for a categorical parameter",
            )
        choices = override.choices if override.choices is not None else base.choices
        if choices is None:
            raise InvalidSpec(f"search_space.{name}", "a categorical parameter needs `choices`")
        return replace(
            base, kind=kind, choices=tuple(choices), low=None, high=None, log=False, step=None
        )
    low = override.low if override.low is not None else base.low
    high = override.high if override.high is not None else base.high
    log = override.log if override.log is not None else base.log
    step = override.step if override.step is not None else base.step
    if low is None or high is None:
        raise InvalidSpec(f"search_space.{name}", "a range needs both `low` and `high`")
    return replace(base, kind=kind, low=low, high=high, log=log, step=step, choices=None)


def _batch_size_param(param: Param) -> Param:
    """Batch sizes are powers of two; a range is turned into the powers of two inside it."""
    if param.choices is not None:
        bad = [c for c in param.choices if not _is_power_of_two(c)]
        if bad:
            raise InvalidSpec(
                "search_space.batch_size.choices",
                f"batch sizes must be positive powers of two (got {bad})",
            )
        return param
    assert param.low is not None and param.high is not None
    for end, value in (("low", param.low), ("high", param.high)):
        if not (float(value).is_integer() and _is_power_of_two(int(value))):
            raise InvalidSpec(
                f"search_space.batch_size.{end}",
                f"batch sizes must be positive powers of two (got {value:g})",
            )
    lo, hi = int(math.log2(param.low)), int(math.log2(param.high))
    return replace(
        param,
        kind="categorical",
        choices=tuple(2**k for k in range(lo, hi + 1)),
        low=None,
        high=None,
        log=False,
        step=None,
    )


def _check_range(param: Param) -> None:
    where = f"search_space.{param.name}"
    if param.kind == "categorical":
        return
    assert param.low is not None and param.high is not None
    if param.low > param.high:
        raise InvalidSpec(where, f"`low` ({param.low:g}) is greater than `high` ({param.high:g})")
    if param.log and param.low <= 0:
        raise InvalidSpec(where, f"a log-scaled range needs `low` > 0 (got {param.low:g})")
    if param.log and param.step is not None:
        raise InvalidSpec(where, "`step` cannot be combined with `log`")
    if param.name == "max_lr_factor" and param.low <= 1:
        raise InvalidSpec(where, f"`low` must be greater than 1 (got {param.low:g})")
    if param.kind == "int" and not (
        float(param.low).is_integer() and float(param.high).is_integer()
    ):
        raise InvalidSpec(where, "an integer range needs integer `low` and `high`")


def build_space(spec: StudySpec) -> list[Param]:
    """The study's space: defaults, overrides, minus fixed and dropped parameters.

    Raises ``InvalidSpec`` naming ``search_space.<param>`` (or ``fixed``/``drop``) and the reason.
    """
    params = {p.name: p for p in default_space(spec.epochs)}
    for name in spec.drop:
        if name not in params:
            raise InvalidSpec(f"drop.{name}", "not a parameter of the default space")
        del params[name]
    for name, override in spec.search_space.items():
        params[name] = _apply_override(name, params.get(name), override)
    for name in spec.fixed:
        params.pop(name, None)
    # One rule for a batch size, searched or fixed: a power of two (README, "Submitting").
    fixed_batch = spec.fixed.get("batch_size")
    if fixed_batch is not None and not _is_power_of_two(fixed_batch):
        raise InvalidSpec(
            "fixed.batch_size", f"batch sizes must be positive powers of two (got {fixed_batch})"
        )
    if "max_lr" in spec.fixed or "max_lr" in params:
        params.pop("max_lr_factor", None)  # a fixed or searched max_lr replaces the factor
    if "batch_size" in params:
        params["batch_size"] = _batch_size_param(params["batch_size"])
    for param in params.values():
        _check_range(param)
    return list(params.values())


def base_config(spec: StudySpec) -> dict[str, Any]:
    """Config values every trial shares: the spec's top level and its fixed values."""
    return {"dataset": spec.dataset, "model": spec.model, "epochs": spec.epochs, **spec.fixed}


def resolve_config(spec: StudySpec, params: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's parameters merged over the base config: the full, validated training config.

    Raises ``InvalidSpec`` when the combination is not a valid ``TrainConfig``.
    """
    values = {**base_config(spec), **params}
    factor = values.pop("max_lr_factor", None)
    if factor is not None:
        values["max_lr"] = values.get("base_lr", TrainConfig.model_fields["base_lr"].default) * (
            factor
        )
    try:
        config = TrainConfig.model_validate(values)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "config"
        raise InvalidSpec(field, first["msg"].removeprefix("Value error, ")) from error
    return config.model_dump(mode="json")


def is_active(param: Param, chosen: Mapping[str, Any], spec: StudySpec) -> bool:
    """Whether ``param`` is sampled given the values ``chosen`` so far and the spec's fixed
    values (its parent, if any, takes a value that uses it)."""
    return _active(param, chosen, base_config(spec))


def _active(param: Param, chosen: Mapping[str, Any], base: Mapping[str, Any]) -> bool:
    if param.parent is None:
        return True
    parent_value = chosen.get(param.parent, base.get(param.parent))
    if parent_value is None:
        parent_value = TrainConfig.model_fields[param.parent].default
    return parent_value in param.when


def _walk(spec: StudySpec, space: list[Param], pick: Callable[[Param], Any]) -> dict[str, Any]:
    """Visit the space in order, choosing each active parameter's value with ``pick``."""
    base = base_config(spec)
    chosen: dict[str, Any] = {}
    for param in space:
        if _active(param, chosen, base):
            chosen[param.name] = pick(param)
    return chosen


def suggest(trial: optuna.Trial, spec: StudySpec, space: list[Param]) -> dict[str, Any]:
    """Sample the space define-by-run; conditional parameters only where they apply."""

    def pick(param: Param) -> Any:
        if param.kind == "categorical":
            assert param.choices is not None
            return trial.suggest_categorical(param.name, list(param.choices))
        assert param.low is not None and param.high is not None
        if param.kind == "int":
            step = 1 if param.step is None else int(param.step)
            return trial.suggest_int(
                param.name, int(param.low), int(param.high), log=param.log, step=step
            )
        return trial.suggest_float(
            param.name, param.low, param.high, log=param.log, step=param.step
        )

    return _walk(spec, space, pick)


def _check_batch_fits(spec: StudySpec, space: list[Param]) -> None:
    """A batch larger than the training set cannot fill one step (the trainer refuses it, so
    every such trial would fail): refuse it at submit time, naming where the batch size comes
    from. mnist / fashion-mnist are counted as their standard files; a searched
    ``synthetic_size`` by its smallest value."""
    synthetic = spec.fixed.get("synthetic_size", TrainConfig.model_fields["synthetic_size"].default)
    searched_size = next((p for p in space if p.name == "synthetic_size"), None)
    if searched_size is not None:
        synthetic = min(int(v) for v in searched_size.bounds() if isinstance(v, int | float))
    if not isinstance(synthetic, int):
        return  # resolve_config names the bad value
    size = train_split_size(spec.dataset, synthetic)
    searched = next((p for p in space if p.name == "batch_size"), None)
    candidates = searched.bounds() if searched else (spec.fixed.get("batch_size", 128),)
    too_big = [b for b in candidates if isinstance(b, int) and b > size]
    if too_big:
        where = "search_space.batch_size" if searched else "fixed.batch_size"
        of = f"{spec.dataset!r}" + (
            f" (synthetic_size {synthetic})" if spec.dataset == "synthetic" else ""
        )
        raise InvalidSpec(
            where, f"batch sizes {too_big} exceed the {size} training examples of {of}"
        )


def _latent_dims(spec: StudySpec, space: list[Param]) -> list[int]:
    """The latent sizes the study can train: the searched range's ends, or the fixed value."""
    searched = next((p for p in space if p.name == "latent_dim"), None)
    if searched is not None:
        return [int(v) for v in searched.bounds() if isinstance(v, int | float)]
    return [int(spec.fixed.get("latent_dim", TrainConfig.model_fields["latent_dim"].default))]


def _pick_forced(forced: Mapping[str, Any]) -> Callable[[Param], Any]:
    """A picker that uses the forced values and each other parameter's first value."""

    def pick(param: Param) -> Any:
        return forced.get(param.name, param.bounds()[0])

    return pick


def check_spec(spec: StudySpec) -> list[Param]:
    """Validate a spec end to end before anything is written; returns its space.

    Probes every range end and every choice — with its parent set so that it applies and every
    other active parameter at its first value — against the training config, so a study never
    starts with values the trainer would refuse.
    """
    space = build_space(spec)
    try:
        resolve_config(spec, {})
    except InvalidSpec as error:
        raise InvalidSpec(f"fixed.{error.field}", error.reason) from error
    _check_batch_fits(spec, space)
    check_constraints(spec, _latent_dims(spec, space))
    for param in space:
        for value in param.bounds():
            forced: dict[str, Any] = {param.name: value}
            if param.parent is not None and param.parent not in spec.fixed:
                forced[param.parent] = param.when[0]
            probe = _walk(spec, space, _pick_forced(forced))
            try:
                resolve_config(spec, probe)
            except InvalidSpec as error:
                # Every other parameter is at its first value in the probe: when the trainer
                # names one of those, the fault is that one's end, not the parameter probed.
                culprit = error.field if error.field in probe else param.name
                raise InvalidSpec(
                    f"search_space.{culprit}",
                    f"value {value if culprit == param.name else probe[culprit]!r} is invalid: "
                    f"{error.reason}",
                ) from error
    return space


def distributions(space: list[Param]) -> dict[str, BaseDistribution]:
    return {param.name: param.distribution() for param in space}

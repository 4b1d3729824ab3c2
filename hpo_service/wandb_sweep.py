"""W&B sweep configs translated to study specs, so ``hpo submit sweep.yaml`` takes them as is.

What maps to what (W&B's sweep configuration reference → ``StudySpec``)::

    method: grid | random | bayes      sampler grid | random | tpe (W&B's bayes is a Gaussian
                                       process; TPE is Optuna's model-based default, and the GP
                                       sampler needs torch on the server)
    metric: {name, goal}               objectives: [{metric, direction}] (a metric the service
                                       knows: val_neg_elbo, test_neg_elbo, test_is_nll, …)
    parameters.X.value                 fixed.X (epochs, dataset, model: the spec's top level)
    parameters.X.values                search_space.X.choices
    parameters.X.{min, max}            search_space.X {low, high}, by `distribution`:
      int_uniform | uniform              integer | float range
      q_uniform (q)                      float range with step q
      log_uniform_values                 log range
      log_uniform (min, max exponents)   log range over e^min … e^max
    early_terminate: hyperband         pruner hyperband: min_iter → min_resource, eta →
                                       reduction_factor; max_iter with s → min_resource =
                                       max_iter / eta^s
    run_cap                            budget.n_trials (a grid study is capped at its grid)
    name                               name (else the file's name)
    program, command                   the `hpo agent -- …` command printed to run next
    description, project, entity       noted and dropped (W&B bookkeeping)

Parameters a sweep does not list are left at their defaults (``drop``), as in W&B. Aliases:
``learning_rate``/``lr`` → ``base_lr``. Anything else raises ``SweepUntranslatable`` listing every
key with no counterpart (``normal`` and other distributions, ``probabilities``, nested
parameters, ``metric.target``, unknown training settings, …) and why.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hpo_service.schemas import OBJECTIVE_METRICS, TRAIN_CONFIG_FIELDS, StudySpec

#: Top-level keys of a W&B sweep; the presence of ``method`` or ``parameters`` marks one.
WANDB_KEYS = frozenset(
    {
        "method",
        "metric",
        "parameters",
        "early_terminate",
        "run_cap",
        "name",
        "description",
        "program",
        "command",
        "project",
        "entity",
    }
)
ALIASES = {"learning_rate": "base_lr", "lr": "base_lr"}
TOP_LEVEL = ("epochs", "dataset", "model")  # set once per study, never searched
METHODS = {"grid": "grid", "random": "random", "bayes": "tpe"}


class SweepUntranslatable(ValueError):
    """The sweep has keys with no counterpart; ``problems`` lists (key path, reason)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__(
            "the W&B sweep cannot be translated:\n"
            + "\n".join(f"  {where}: {why}" for where, why in problems)
        )


@dataclass
class Translation:
    spec: StudySpec
    notes: list[str] = field(default_factory=list)  # what was mapped loosely or dropped
    program: list[str] | None = None  # the program to run under `hpo agent`


def is_wandb_sweep(data: Any) -> bool:
    return isinstance(data, Mapping) and ("method" in data or "parameters" in data)


def _study_name(raw: Any, fallback: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.\-]+", "-", str(raw or fallback)).strip("-.") or "sweep"
    return name[:120]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _range(where: str, body: Mapping[str, Any], problems: list[tuple[str, str]]) -> dict[str, Any]:
    """One ``min``/``max`` parameter as a ``ParamSpec`` body (empty when it has a problem)."""
    low, high = body.get("min"), body.get("max")
    if not isinstance(low, int | float) or not isinstance(high, int | float):
        problems.append((where, "`min` and `max` must both be numbers"))
        return {}
    default = "int_uniform" if _is_int(low) and _is_int(high) else "uniform"
    distribution = body.get("distribution", default)
    if distribution == "int_uniform":
        return {"type": "int", "low": low, "high": high}
    if distribution == "uniform":
        return {"type": "float", "low": low, "high": high}
    if distribution == "q_uniform":
        return {"type": "float", "low": low, "high": high, "step": body.get("q", 1.0)}
    if distribution == "log_uniform_values":
        return {"type": "float", "low": low, "high": high, "log": True}
    if distribution == "log_uniform":  # W&B: min and max are natural-log exponents
        return {"type": "float", "low": math.exp(low), "high": math.exp(high), "log": True}
    problems.append(
        (
            f"{where}.distribution",
            f"{distribution!r} has no counterpart (Optuna samples uniform, log-uniform and "
            "stepped ranges; no normal, beta, inverse-log or quantised-log distributions)",
        )
    )
    return {}


def _parameters(
    parameters: Any, problems: list[tuple[str, str]]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(top-level values, fixed, search_space) from W&B ``parameters``."""
    top: dict[str, Any] = {}
    fixed: dict[str, Any] = {}
    space: dict[str, Any] = {}
    if not isinstance(parameters, Mapping) or not parameters:
        problems.append(("parameters", "must be a non-empty mapping of parameter names"))
        return top, fixed, space
    for raw_name, body in parameters.items():
        where = f"parameters.{raw_name}"
        name = ALIASES.get(str(raw_name), str(raw_name))
        if not isinstance(body, Mapping):
            problems.append((where, "must be a mapping (value, values, or min/max)"))
            continue
        extra = set(body) - {"value", "values", "min", "max", "distribution", "q"}
        for key in sorted(extra):
            why = {
                "parameters": "nested parameters have no counterpart (the space is flat)",
                "probabilities": "weighted choices have no counterpart (choices are uniform)",
                "mu": "normal distributions have no counterpart",
                "sigma": "normal distributions have no counterpart",
            }.get(key, "unknown key")
            problems.append((f"{where}.{key}", why))
        if name not in TRAIN_CONFIG_FIELDS:
            problems.append(
                (
                    where,
                    f"{raw_name!r} is not a training setting of the VAE trainer; name it after "
                    "a TrainConfig field (hpo_service/schemas/train_config.py), e.g. base_lr, "
                    "batch_size, latent_dim, kl_schedule, free_bits",
                )
            )
            continue
        if "value" in body:
            (top if name in TOP_LEVEL else fixed)[name] = body["value"]
        elif name in TOP_LEVEL:
            problems.append((where, f"`{name}` is set once per study: give one `value`"))
        elif "values" in body:
            values = body["values"]
            if not isinstance(values, list) or not values:
                problems.append((f"{where}.values", "must be a non-empty list"))
            elif body.get("distribution", "categorical") != "categorical":
                problems.append((f"{where}.distribution", "`values` go with categorical only"))
            else:
                space[name] = {"choices": values}
        elif "min" in body or "max" in body:
            if extra:
                continue
            translated = _range(where, body, problems)
            if translated:
                space[name] = translated
        else:
            problems.append((where, "needs `value`, `values`, or `min` and `max`"))
    return top, fixed, space


def _objective(metric: Any, problems: list[tuple[str, str]]) -> dict[str, Any] | None:
    if not isinstance(metric, Mapping) or "name" not in metric:
        problems.append(("metric", "needs a `name` (and a `goal`)"))
        return None
    for key in sorted(set(metric) - {"name", "goal"}):
        why = (
            "no counterpart: a study runs its budget rather than stopping at a target value"
            if key == "target"
            else "unknown key"
        )
        problems.append((f"metric.{key}", why))
    name, goal = metric["name"], metric.get("goal", "minimize")
    if name not in OBJECTIVE_METRICS:
        problems.append(
            (
                "metric.name",
                f"{name!r} is not a metric the service optimises; use one of "
                f"{sorted(OBJECTIVE_METRICS)} (report your validation −ELBO as val_neg_elbo)",
            )
        )
        return None
    if goal not in ("minimize", "maximize"):
        problems.append(("metric.goal", f"must be minimize or maximize (got {goal!r})"))
        return None
    return {"metric": name, "direction": goal}


def _pruner(early: Any, problems: list[tuple[str, str]], notes: list[str]) -> dict[str, Any] | None:
    if early is None:
        return {"name": "none"}  # W&B stops no run early unless asked to
    if not isinstance(early, Mapping) or early.get("type") != "hyperband":
        kind = early.get("type") if isinstance(early, Mapping) else early
        problems.append(
            ("early_terminate.type", f"only hyperband has a counterpart (got {kind!r})")
        )
        return None
    for key in sorted(set(early) - {"type", "min_iter", "max_iter", "eta", "s"}):
        problems.append((f"early_terminate.{key}", "no counterpart"))
    eta = early.get("eta", 3)
    if not _is_int(eta) or eta < 2:
        problems.append(("early_terminate.eta", f"must be an integer >= 2 (got {eta!r})"))
        return None
    if "min_iter" in early:
        min_resource = early["min_iter"]
    elif "max_iter" in early and "s" in early:
        min_resource = max(1, math.floor(early["max_iter"] / eta ** early["s"]))
        notes.append(
            f"early_terminate: max_iter {early['max_iter']} with s {early['s']} → "
            f"min_resource {min_resource}; Optuna's Hyperband takes max_resource = epochs"
        )
    else:
        problems.append(("early_terminate", "needs `min_iter`, or `max_iter` with `s`"))
        return None
    if not _is_int(min_resource) or min_resource < 1:
        problems.append(
            ("early_terminate.min_iter", f"must be a positive integer ({min_resource!r})")
        )
        return None
    return {"name": "hyperband", "min_resource": min_resource, "reduction_factor": eta}


def _default_space_names(epochs: int) -> list[str]:
    """The default VAE space's parameter names (the server's search space module)."""
    try:
        from hpo_service.search_space import default_space
    except ImportError as error:  # the server extra (Optuna) is not installed here
        raise SweepUntranslatable(
            [("(install)", f"translating a W&B sweep needs the server extra: {error}")]
        ) from error
    return [param.name for param in default_space(epochs)]


def translate(sweep: Mapping[str, Any], fallback_name: str = "sweep") -> Translation:
    """A W&B sweep config as a study spec. Raises ``SweepUntranslatable`` listing every key
    with no counterpart, or ``pydantic.ValidationError`` when the translated spec is invalid."""
    problems: list[tuple[str, str]] = []
    notes: list[str] = []
    for key in sorted(set(sweep) - WANDB_KEYS):
        problems.append((key, "not a key of a W&B sweep config"))
    method = sweep.get("method")
    if method not in METHODS:
        problems.append(("method", f"must be one of {sorted(METHODS)} (got {method!r})"))
    elif method == "bayes":
        notes.append("method bayes → sampler tpe (W&B's bayes is a Gaussian-process search)")
    objective = _objective(sweep.get("metric"), problems)
    top, fixed, space = _parameters(sweep.get("parameters"), problems)
    pruner = _pruner(sweep.get("early_terminate"), problems, notes)
    run_cap = sweep.get("run_cap")
    if run_cap is not None and (not _is_int(run_cap) or run_cap < 1):
        problems.append(("run_cap", f"must be a positive integer (got {run_cap!r})"))
    if problems:
        raise SweepUntranslatable(problems)
    for key in ("description", "project", "entity"):
        if key in sweep:
            notes.append(f"{key}: W&B bookkeeping, dropped")
    epochs = top.get("epochs", StudySpec.model_fields["epochs"].default)
    budget: dict[str, Any] = {}
    if run_cap is not None:
        budget["n_trials"] = run_cap
    elif method == "grid":
        budget["n_trials"] = 100_000  # the server caps a grid study at its grid's size
    else:
        notes.append("no run_cap: budget.n_trials is the spec's default")
    listed = set(space) | set(fixed)
    drop = [name for name in _default_space_names(epochs) if name not in listed]
    spec = StudySpec.model_validate(
        {
            "name": _study_name(sweep.get("name"), fallback_name),
            **top,
            "objectives": [objective],
            "sampler": {"name": METHODS[str(method)], "seed": 0},
            "pruner": pruner,
            "search_space": space,
            "fixed": fixed,
            "drop": drop,
            **({"budget": budget} if budget else {}),
        }
    )
    return Translation(spec=spec, notes=notes, program=_program(sweep, notes))


def _program(sweep: Mapping[str, Any], notes: list[str]) -> list[str] | None:
    """The command `hpo agent` should run: W&B's ``command`` without its macros, or
    ``python PROGRAM``. W&B passes parameters as ``--name=value`` flags; the agent passes them
    in HPO_CONFIG_FILE and HPO_CONFIG_* variables instead."""
    program = sweep.get("program")
    command = sweep.get("command")
    if isinstance(command, list) and command:
        words = [
            str(w) for w in command if str(w) not in ("${env}", "${args}", "${args_no_hyphens}")
        ]
        words = ["python" if w == "${interpreter}" else w for w in words]
        words = [str(program) if w == "${program}" and program else w for w in words]
        notes.append("command: ${args} dropped; read the trial's config from HPO_CONFIG_FILE")
        return [w for w in words if not w.startswith("${")] or None
    if program:
        notes.append("program: read the trial's config from HPO_CONFIG_FILE, not --name=value")
        return ["python", str(program)]
    return None

"""Recurring sweeps: schedules, their firings, and the morning report (pydantic only)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from ._fields import Direction, JSONScalar, SpecNumber, WholeNumber, refuse_bool
from .spec import StudySpec
from .studies import TrialCounts

#: ``per_night`` (default): seed + n, where n counts the schedule's earlier runs, so each night
#: explores new configurations, reproducibly. ``fixed``: every night uses the template's seed —
#: with a seeded sampler that re-samples the same start-up configurations night after night.
SeedPolicy = Literal["fixed", "per_night"]
FiringKind = Literal["scheduled", "catch_up", "manual"]
FiringStatus = Literal["claimed", "created", "skipped", "failed"]


class StudyTemplate(StudySpec):
    """A study spec without ``name``: each run of a schedule names its own study."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "dataset": "mnist5k",
                    "epochs": 10,
                    "budget": {"n_trials": 40, "max_concurrent": 4},
                    "sampler": {"name": "tpe", "seed": 0},
                }
            ]
        },
    )

    # Hidden from the schema and from dumps: every run sets its own name.
    name: SkipJsonSchema[str] = Field("template", exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _no_name(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "name" in data:
            raise ValueError(
                "`name`: a schedule names its studies `{schedule}-{YYYY-MM-DD}`; leave it out"
            )
        return data


#: The shape of a five-field cron expression, stated in the document; ``update`` and ``create``
#: check the expression itself (and name the field with their own reason).
CRON_FIELDS = r"^\s*\S+(\s+\S+){4}\s*$"


class ScheduleSpec(BaseModel):
    """A nightly (or any cron) sweep: when it fires and the study it creates each time."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "name": "nightly-mnist",
                    "cron": "30 2 * * *",
                    "timezone": "Europe/Berlin",
                    "template": {
                        "dataset": "mnist5k",
                        "epochs": 10,
                        "budget": {"n_trials": 40, "max_concurrent": 4},
                    },
                    "warm_start_top_k": 5,
                }
            ]
        },
    )

    name: str = Field(
        ...,
        pattern=r"^[A-Za-z][A-Za-z0-9_.\-]{0,79}$",
        description="Starts with a letter (so a number in a URL is always an id).",
    )
    cron: str = Field(
        ...,
        min_length=1,
        max_length=100,
        json_schema_extra={"pattern": CRON_FIELDS},
        description="Five-field cron (minute hour day-of-month month day-of-week) read on the "
        "wall clock of `timezone`.",
    )
    timezone: str = Field("UTC", min_length=1, max_length=64, description="IANA zone name.")
    template: StudyTemplate
    warm_start_top_k: WholeNumber = Field(
        5, ge=0, le=1000, description="Enqueue the previous run's best k parameter sets first."
    )
    seed_policy: SeedPolicy = "per_night"
    enabled: StrictBool = True
    catchup_grace_s: float | None = Field(
        None,
        ge=60,
        le=7 * 24 * 3600,
        description="Run one missed fire time if it is at most this late; default: the server's "
        "HPO_SCHEDULE_CATCHUP_GRACE_S.",
    )
    regression_threshold: SpecNumber = Field(
        0.05,
        ge=0,
        le=100,
        description="Flag a run whose best is worse than the best earlier run by more than this "
        "fraction (0.05 = 5 %).",
    )
    _grace_not_bool = field_validator("catchup_grace_s", mode="before")(refuse_bool)


def _given_means_not_null(schema: dict[str, Any]) -> None:
    """The document says what ``update`` enforces: a field given is not null (left out, it
    keeps its value), except ``catchup_grace_s``, whose null restores the server's default."""
    for name, prop in schema.get("properties", {}).items():
        kept = [o for o in prop.get("anyOf", []) if o.get("type") != "null"]
        if name != "catchup_grace_s" and len(kept) == 1:
            del prop["anyOf"]
            prop.pop("default", None)
            prop.update(kept[0])


class ScheduleUpdate(BaseModel):
    """A partial update; fields left out keep their value. A schedule cannot be renamed."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_given_means_not_null)

    cron: str | None = Field(
        None, min_length=1, max_length=100, json_schema_extra={"pattern": CRON_FIELDS}
    )
    timezone: str | None = Field(None, min_length=1, max_length=64)
    template: StudyTemplate | None = None
    warm_start_top_k: int | None = Field(None, ge=0, le=1000)
    _not_bool = field_validator(
        "warm_start_top_k", "catchup_grace_s", "regression_threshold", mode="before"
    )(refuse_bool)
    seed_policy: SeedPolicy | None = None
    enabled: StrictBool | None = None
    catchup_grace_s: float | None = Field(None, ge=60, le=7 * 24 * 3600)  # null: the default
    regression_threshold: float | None = Field(None, ge=0, le=100)


class FiringInfo(BaseModel):
    """One fire time of a schedule and what became of it."""

    id: int
    schedule: str
    fire_key: str
    kind: FiringKind
    status: FiringStatus
    scheduled_for: str  # the fire instant, ISO 8601 UTC
    local_time: str  # the wall-clock fire time in the schedule's zone
    study: str | None
    seed: int | None
    warm_started: int  # parameter sets enqueued from the previous run
    detail: str | None
    claimed_at: str | None
    finished_at: str | None


class ScheduleInfo(BaseModel):
    id: int
    name: str
    cron: str
    timezone: str
    template: StudyTemplate
    warm_start_top_k: int
    seed_policy: SeedPolicy
    enabled: bool
    catchup_grace_s: float  # the effective grace period
    regression_threshold: float
    active_since: str
    created_at: str
    updated_at: str
    next_fire_local: str | None  # wall-clock time in `timezone`; None when paused
    next_fire_at: str | None  # the same instant in UTC
    last_firing: FiringInfo | None
    links: dict[str, str] = Field(default_factory=dict)


class ParamDrift(BaseModel):
    """How one parameter of the best trial moved since the previous run's best."""

    name: str
    previous: JSONScalar
    current: JSONScalar
    relative_change: float | None  # (current − previous) / |previous| for numbers, else None
    changed: bool


class NightReport(BaseModel):
    """One run of a schedule: its study's outcome on the report's objective."""

    date: str  # local date of the fire time
    local_time: str
    study: str
    kind: FiringKind
    state: str  # the study's state, or "deleted"
    best_value: float | None
    best_params: dict[str, Any]
    trials: TrialCounts
    drift: list[ParamDrift]
    importances: dict[str, float]  # Optuna's default evaluator (PED-ANOVA in Optuna 5)
    importance_note: str | None
    change_vs_best: float | None  # relative change against the best earlier run, signed so > 0
    # means worse
    regression: bool
    warm_started: int
    seed: int | None
    note: str | None = None  # why a value is missing (no complete trial, study deleted, ...)
    # The run's LR range test (``StudyInfo.lr_range_test``): status and ranges; None when off.
    lr_range_test: dict[str, Any] | None = None
    # The run's final evaluation of its winners (``StudyInfo.final_evaluation``, issue 14.4):
    # test IS-NLL by trial number; None when off.
    final_evaluation: dict[str, Any] | None = None


class ScheduleReport(BaseModel):
    schedule: str
    timezone: str
    metric: str  # the first objective of the template
    direction: Direction
    note: str | None
    regression_threshold: float
    nights: list[NightReport]  # oldest first
    regressions: list[str]  # studies flagged as regressions
    best_study: str | None
    best_value: float | None
    skipped: list[FiringInfo]  # missed fire times recorded but not run, in the window

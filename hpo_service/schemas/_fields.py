"""Field types and checks shared by more than one part of the wire contract."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, Strict

Direction = Literal["minimize", "maximize"]
JSONScalar = str | int | float | bool | None
ParamValue = str | int | float | bool
#: A number only: the string "1.0" and booleans are refused, ints are taken as floats.
StrictNumber = Annotated[float, Strict()]


def refuse_bool(value: Any) -> Any:
    """JSON's ``true``/``false`` are not numbers: pydantic's lax int would take them as 1/0."""
    if isinstance(value, bool):
        raise ValueError("must be an integer, not a boolean")
    return value


#: An integer from JSON: ``3`` or ``3.0`` (JSON Schema's integer), never ``true``/``false``.
WholeNumber = Annotated[int, BeforeValidator(refuse_bool)]
#: A number in a study or schedule spec: never ``true``/``false``, but a numeric string stays
#: accepted there, because YAML 1.1 (PyYAML, which `hpo submit` reads specs with) keeps ``1e-4``
#: a string.
SpecNumber = Annotated[float, BeforeValidator(refuse_bool)]
#: The largest trial id accepted: Optuna's ``trials.trial_id`` (and our ``hpo_leases``) is an
#: SQL ``INTEGER``, 32 bits on PostgreSQL, so a larger one is a 422 naming the field, never an
#: out-of-range error in the driver (a 500 on PostgreSQL up to 2**63 before). Exact as a double,
#: so a client that reads the schema's `maximum` as a float (schemathesis does) sends one that
#: holds.
MAX_TRIAL_ID = 2**31 - 1
#: A trial id as the lease gave it (Optuna's ids start at 0).
TrialIdField = Annotated[
    int,
    # Field first: after a BeforeValidator pydantic writes its bounds as `ge`/`le`, not JSON
    # Schema's `minimum`/`maximum`.
    Field(ge=0, le=MAX_TRIAL_ID, description="`trial_id` from the lease."),
    BeforeValidator(refuse_bool),
]


def finite_number(value: float | None, field: str) -> None:
    """Raise ``ValueError`` naming ``field`` when ``value`` is NaN or ±Infinity."""
    if value is not None and not math.isfinite(value):
        raise ValueError(f"`{field}` must be a finite number (got {value})")

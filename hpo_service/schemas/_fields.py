"""Field types and checks shared by more than one part of the wire contract."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import Field, Strict

Direction = Literal["minimize", "maximize"]
JSONScalar = str | int | float | bool | None
ParamValue = str | int | float | bool
#: A number only: the string "1.0" and booleans are refused, ints are taken as floats.
StrictNumber = Annotated[float, Strict()]
#: A trial id as the databases store it (signed 64 bits; Optuna's ids start at 0): a larger one
#: is a 422 naming the item's field, never an overflow in the storage.
TrialIdField = Annotated[int, Field(ge=0, le=2**63 - 1, description="`trial_id` from the lease.")]


def finite_number(value: float | None, field: str) -> None:
    """Raise ``ValueError`` naming ``field`` when ``value`` is NaN or ±Infinity."""
    if value is not None and not math.isfinite(value):
        raise ValueError(f"`{field}` must be a finite number (got {value})")

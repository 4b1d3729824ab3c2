"""Typed, validated training settings: a trial's parameters merged over the defaults.

The model itself lives in the wire contract (``hpo_service.schemas``) so the server can validate
a study's fixed values and resolved trial configs without importing torch; the trainer imports it
from here. Edit fields and validation there.
"""

from hpo_service.schemas import CYCLICAL_LR_POLICIES, TrainConfig

__all__ = ["CYCLICAL_LR_POLICIES", "TrainConfig"]

"""Errors raised by the trainer.

The tree::

    TrainerError                  root: anything the trainer raises on purpose
    ├── ConfigError               (also a ValueError) a setting is invalid; `.field`, `.reason`
    ├── NonFiniteLossError        the loss became NaN/Inf; `.epoch`, `.step`, `.term`
    └── CheckpointError           a checkpoint is corrupt, unreadable or does not fit the run

The worker maps these to trial outcomes: a ``ConfigError`` is the parameters' fault (the trial
fails without retry), a ``NonFiniteLossError`` is a diverged run (reported as such, not a crash).
A ``CheckpointError`` never fails a trial: the worker starts the run fresh and says so.
"""

from __future__ import annotations


class TrainerError(Exception):
    """Root of every error the trainer raises deliberately."""


class ConfigError(TrainerError, ValueError):
    """Raised when a training setting is invalid, naming the offending field.

    Raised for schema violations (wrapped from pydantic) and for data-dependent checks that only
    the trainer can make (e.g. ``batch_size`` larger than the training set).
    """

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"`{field}`: {reason}")

    def __reduce__(self) -> tuple[type[ConfigError], tuple[str, str]]:
        # Keep the two-argument constructor when pickled across worker processes.
        return (type(self), (self.field, self.reason))


class NonFiniteLossError(TrainerError):
    """Raised when a training loss becomes NaN or infinite.

    ``epoch`` is 1-based, ``step`` is the 0-based global optimizer step of the first non-finite
    value, and ``term`` names the loss that went bad (e.g. ``"objective"``, ``"disc_loss"``).
    """

    def __init__(self, epoch: int, step: int, term: str = "objective") -> None:
        self.epoch = epoch
        self.step = step
        self.term = term
        super().__init__(f"non-finite {term} at epoch {epoch}, step {step}")

    def __reduce__(self) -> tuple[type[NonFiniteLossError], tuple[int, int, str]]:
        return (type(self), (self.epoch, self.step, self.term))


class CheckpointError(TrainerError):
    """Raised when a checkpoint cannot be resumed from: its bytes do not match their SHA-256,
    do not load, or do not fit the run (another architecture, epoch range or format)."""

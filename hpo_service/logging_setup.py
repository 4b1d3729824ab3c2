"""Process-wide logging: JSON lines for containers and log shippers, or text for a terminal.

Key events carry their identifiers as ``extra`` fields (``study``, ``study_id``, ``trial_id``,
``trial_number``, ``worker_id``): the JSON formatter writes every such field as a key, and the
text formatter appends them as ``key=value`` so the two formats say the same thing.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

from pythonjsonlogger.json import JsonFormatter

LogFormat = Literal["text", "json"]

#: The identifiers key events carry (``log.info(..., extra=trial_fields(...))``).
CONTEXT_FIELDS = ("study", "study_id", "trial_id", "trial_number", "worker_id", "event")


class ContextTextFormatter(logging.Formatter):
    """``time level logger message key=value …`` with the context fields a record carries."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = " ".join(
            f"{key}={getattr(record, key)}" for key in CONTEXT_FIELDS if hasattr(record, key)
        )
        return f"{line} {context}" if context else line


def json_formatter() -> logging.Formatter:
    """One JSON object per line: ``time``, ``level``, ``logger``, ``message`` plus extras."""
    return JsonFormatter(
        "{asctime}{levelname}{name}{message}",
        style="{",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
    )


def configure_logging(level: str = "info", log_format: LogFormat = "text") -> None:
    """Send every logger (uvicorn's included) through one stderr handler in ``log_format``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(json_formatter() if log_format == "json" else ContextTextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        # uvicorn attaches its own handlers unless told not to; ours are on the root.
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True


def trial_fields(
    event: str,
    *,
    study: str | None = None,
    study_id: int | None = None,
    trial_id: int | None = None,
    trial_number: int | None = None,
    worker_id: str | None = None,
) -> dict[str, object]:
    """``extra=`` for a key event: the identifiers that are known, under stable names."""
    fields: dict[str, object] = {
        "event": event,
        "study": study,
        "study_id": study_id,
        "trial_id": trial_id,
        "trial_number": trial_number,
        "worker_id": worker_id,
    }
    return {key: value for key, value in fields.items() if value is not None}

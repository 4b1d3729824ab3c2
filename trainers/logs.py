"""Worker logging: JSON lines (``--log-format json``, for containers) or text for a terminal.

The same field names as the server's logs (``study``, ``trial_id``, ``trial_number``,
``worker_id``, ``event``), so one query finds a trial on both sides. Kept here rather than
imported from the server package: trainers use only the wire contract and the client.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

from pythonjsonlogger.json import JsonFormatter

LogFormat = Literal["text", "json"]
CONTEXT_FIELDS = ("study", "trial_id", "trial_number", "worker_id", "device", "event")


class _ContextTextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = " ".join(
            f"{key}={getattr(record, key)}" for key in CONTEXT_FIELDS if hasattr(record, key)
        )
        return f"{line} {context}" if context else line


def configure_logging(log_format: LogFormat = "text", level: int = logging.INFO) -> None:
    """One stderr handler on the root logger, in ``log_format``."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(
            JsonFormatter(
                "{asctime}{levelname}{name}{message}",
                style="{",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(_ContextTextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)

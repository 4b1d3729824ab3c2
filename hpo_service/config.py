"""Service settings: the only place that reads the environment (prefix ``HPO_``).

Nothing is built at import time: ``get_settings()`` reads the environment when called and the
result is passed to ``create_app(settings)``; tests build their own ``Settings``.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

Scope = Literal["admin", "worker", "viewer"]
SCOPES: tuple[Scope, ...] = ("admin", "worker", "viewer")


def default_database_url() -> str:
    """A SQLite file in the working directory: the embedded default."""
    return f"sqlite:///{Path.cwd() / 'hpo.db'}"


class FileSettingsSource(PydanticBaseSettingsSource):
    """``HPO_<NAME>_FILE=/path``: read a setting from a file (Docker/Compose secrets).

    Secrets never have to sit in the environment or an image: compose mounts them under
    ``/run/secrets`` and points ``HPO_TOKENS_FILE`` (say) at one. One trailing newline is
    dropped. A plain ``HPO_<NAME>`` variable wins over the file.
    """

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        path = os.environ.get(f"HPO_{field_name.upper()}_FILE")
        if not path:
            return None, field_name, False
        try:
            text = Path(path).read_text()
        except OSError as error:
            raise ValueError(
                f"HPO_{field_name.upper()}_FILE={path}: cannot read it ({error})"
            ) from error
        return text.removesuffix("\n").removesuffix("\r"), field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, field in self.settings_cls.model_fields.items():
            value, key, _ = self.get_field_value(field, name)
            if value is not None:
                values[key] = value
        return values


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HPO_", env_file=None, extra="ignore")

    database_url: str = Field(default_factory=default_database_url)
    # API tokens as "scope:token" pairs separated by commas, e.g. "admin:s3cret,worker:w0rk".
    # Empty: no auth, allowed only on a loopback bind address.
    tokens: SecretStr = SecretStr("")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    heartbeat_interval_s: float = Field(10.0, gt=0, description="How often workers beat.")
    lease_timeout_s: float = Field(
        60.0, gt=0, description="A trial with no heartbeat for this long is failed and retried."
    )
    reap_interval_s: float = Field(5.0, gt=0, description="How often the reaper runs.")
    long_poll_step_s: float = Field(0.5, gt=0)
    # SQLite runs in WAL mode (readers never block the writer, nor it them). "normal": a commit
    # is durable once the OS has it (a power cut may roll back the last commits, never corrupt
    # the file); "full": each commit also waits for the disk.
    sqlite_synchronous: Literal["normal", "full"] = "normal"
    db_pool_size: int = Field(10, ge=1)
    db_max_overflow: int = Field(20, ge=0)
    db_connect_retries: int = Field(10, ge=0, description="Start-up retries while the DB comes up.")
    run_reaper: bool = True
    log_level: str = "info"
    # --- recurring sweeps (schedules) ---------------------------------------------------------
    run_scheduler: bool = Field(True, description="Run the scheduler inside `hpo serve`.")
    scheduler_tick_s: float = Field(30.0, gt=0, description="How often the scheduler looks.")
    schedule_catchup_grace_s: float = Field(
        6 * 3600.0,
        gt=0,
        description="After downtime, run the latest missed fire time if at most this late.",
    )
    schedule_claim_timeout_s: float = Field(
        300.0, gt=0, description="A firing claimed this long ago and not finished is taken over."
    )
    # "json": one JSON object per line (containers, log shippers); "text": for a terminal.
    log_format: Literal["text", "json"] = "text"
    # Merged into database_url, so the URL can be configured without its password and the
    # password mounted as a secret (HPO_DATABASE_PASSWORD_FILE).
    database_password: SecretStr = SecretStr("")
    # How long /metrics reuses its per-study trial counts, in seconds (0: count every scrape).
    metrics_cache_s: float = Field(5.0, ge=0)
    # --- HTTP limits and failure answers ------------------------------------------------------
    max_body_bytes: int = Field(
        1 << 20, ge=1024, description="Largest request body accepted (bytes); larger → 413."
    )
    storage_retry_after_s: int = Field(
        2, ge=1, le=3600, description="Retry-After (seconds) of a 503 when the database fails."
    )
    # Once tokens are set, /v1/docs and /v1/openapi.json need a token (any scope) unless true.
    public_docs: bool = False
    # --- Artifacts (checkpoints, diagnostics plots): Optuna's artifact stores -----------------
    # Workers never hold bucket credentials: they send artifacts to the server over HTTP and the
    # server writes them here. A directory by default; an S3-compatible bucket once a bucket is set.
    artifact_dir: Path = Field(
        default_factory=lambda: Path.cwd() / "hpo-artifacts",
        description="Directory of the file-system artifact store (used when no bucket is set).",
    )
    artifact_s3_bucket: str = Field("", description="S3 bucket for artifacts (needs boto3).")
    artifact_s3_prefix: str = Field("", description="Key prefix inside the bucket.")
    # For S3-compatible stores (MinIO, Ceph, R2); empty: AWS. Credentials come from boto3's usual
    # chain (AWS_ACCESS_KEY_ID…, a profile, an instance role), never from this service's settings.
    artifact_s3_endpoint_url: str = Field("", description="S3 endpoint URL; empty for AWS.")
    # --- Checkpoints and resume (issue 14) ------------------------------------------------------
    # Every N epochs a worker sends its trial's checkpoint; a retry resumes from the latest one.
    # The default is measured (benchmarks/checkpoint_cost.py, README "Checkpoints and resume"):
    # for the default MLP on mnist5k a checkpoint is 17.3 MB, serialized and sent in 0.55 s,
    # 2.7 % of a CPU epoch (load 19 on 2 cores); every 5 epochs: 0.5 %, ≤ 5 epochs lost per kill.
    checkpoint_every_epochs: int = Field(
        5, ge=0, description="Epochs between a trial's checkpoints; 0: no checkpoints."
    )
    # Checkpoints exceed max_body_bytes: their routes have their own limit.
    max_checkpoint_bytes: int = Field(
        256 << 20, ge=1024, description="Largest checkpoint or best model accepted (bytes)."
    )
    # Finished trials keep only their selected model's weights, and only the best few per study
    # (what the final evaluation of the winners re-evaluates); the rest are deleted.
    best_models_kept: int = Field(
        5, ge=0, description="Trials per study whose best model is kept once they finish."
    )
    # Redraw a running trial's diagnostics plot every this many epochs, on a background thread
    # (and once more before it finishes); 0: no plots (the per-epoch history is kept anyway).
    diagnostics_plot_every: int = Field(
        5, ge=0, le=10_000, description="Epochs between redraws of a trial's diagnostics plot."
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, FileSettingsSource(settings_cls))

    @model_validator(mode="after")
    def _merge_database_password(self) -> Settings:
        password = self.database_password.get_secret_value()
        if password:
            from sqlalchemy.engine import make_url

            url = make_url(self.database_url).set(password=password)
            self.database_url = url.render_as_string(hide_password=False)
        return self

    @property
    def database_url_redacted(self) -> str:
        """The URL with its password masked, for logs and messages."""
        from sqlalchemy.engine import make_url

        return make_url(self.database_url).render_as_string(hide_password=True)

    @model_validator(mode="after")
    def _timeout_longer_than_heartbeat(self) -> Settings:
        # A lease must survive at least one missed beat, or healthy workers get reaped.
        if self.lease_timeout_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"HPO_LEASE_TIMEOUT_S ({self.lease_timeout_s:g}) must be longer than "
                f"HPO_HEARTBEAT_INTERVAL_S ({self.heartbeat_interval_s:g})"
            )
        return self

    @model_validator(mode="after")
    def _grace_longer_than_tick(self) -> Settings:
        # A fire time is seen up to one tick late; a shorter grace would skip on-time runs.
        if self.schedule_catchup_grace_s <= self.scheduler_tick_s:
            raise ValueError(
                f"HPO_SCHEDULE_CATCHUP_GRACE_S ({self.schedule_catchup_grace_s:g}) must be longer "
                f"than HPO_SCHEDULER_TICK_S ({self.scheduler_tick_s:g})"
            )
        return self

    def token_scopes(self) -> dict[str, Scope]:
        """Map each configured token to its scope. Raises ValueError on a malformed entry."""
        result: dict[str, Scope] = {}
        raw = self.tokens.get_secret_value().strip()
        if not raw:
            return result
        for entry in raw.split(","):
            scope, sep, token = entry.strip().partition(":")
            if not sep or scope not in SCOPES or not token:
                raise ValueError(
                    "HPO_TOKENS entries must look like 'admin:TOKEN', 'worker:TOKEN' or "
                    f"'viewer:TOKEN' (got {entry.strip()[:20]!r}...)"
                )
            result[token] = scope
        return result

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def check_safe_to_serve(self) -> None:
        """Refuse to expose an unauthenticated server beyond this machine."""
        if not self.is_loopback and not self.token_scopes():
            raise ValueError(
                f"refusing to bind {self.host}:{self.port} without API tokens: set HPO_TOKENS "
                "(e.g. 'admin:...,worker:...,viewer:...') or bind to 127.0.0.1"
            )

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def get_settings() -> Settings:
    return Settings()

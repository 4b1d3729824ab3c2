"""``deploy/kubernetes`` offline: every manifest against the Kubernetes API schemas (the pinned
``kubernetes-validate``, strict: an unknown field is an error), the kustomization's own
bookkeeping, and the wiring no schema knows (``kubernetes_checks``), each rule shown to catch an
injected defect. With ``CI`` set a missing validator fails the run instead of skipping."""

from __future__ import annotations

import copy
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes_checks import KUSTOMIZE, Doc, kubernetes_problems, kustomization, load_resources

#: Oldest and newest Kubernetes releases the base is checked against.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")


def _validator() -> Any:
    if importlib.util.find_spec("kubernetes_validate") is None:
        if os.environ.get("CI"):
            pytest.fail("kubernetes-validate is required in CI (pip install -e '.[dev]')")
        pytest.skip("kubernetes-validate is not installed")
    import kubernetes_validate

    return kubernetes_validate


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(version: str) -> None:
    validator = _validator()
    docs = load_resources()
    assert {d["kind"] for d in docs} >= {
        "Namespace", "ConfigMap", "Service", "StatefulSet", "Job", "Deployment",
    }  # fmt: skip
    for doc in docs:
        validator.validate(doc, version, strict=True)  # raises naming the bad field


def test_the_schema_check_catches_a_misspelt_field() -> None:
    validator = _validator()
    worker = next(d for d in load_resources() if d["metadata"]["name"] == "hpo-worker")
    broken = copy.deepcopy(worker)
    broken["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # not `resources`
    with pytest.raises(validator.ValidationError, match="resource"):
        validator.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_kustomization_lists_every_manifest_and_renames_the_images_used() -> None:
    base = kustomization()
    assert base["namespace"] == "vae-hpo"
    listed = set(base["resources"])
    on_disk = {p.name for p in KUSTOMIZE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk  # nothing forgotten, nothing missing
    images = {
        c["image"]
        for d in load_resources()
        if d["kind"] in ("Deployment", "StatefulSet", "Job")
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    renamed = {i["name"] for i in base["images"]}
    assert renamed == {"vae-hpo-server", "vae-hpo-worker"} and renamed <= images


def test_the_wiring_holds() -> None:
    assert kubernetes_problems(load_resources()) == []


def _find(docs: list[Doc], name: str, kind: str = "Deployment") -> Doc:
    return next(d for d in docs if d["metadata"]["name"] == name and d["kind"] == kind)


def _container(docs: list[Doc], name: str, kind: str = "Deployment") -> Doc:
    return _find(docs, name, kind)["spec"]["template"]["spec"]["containers"][0]  # type: ignore[no-any-return]


def _no_gpu(docs: list[Doc]) -> None:
    del _container(docs, "hpo-worker")["resources"]["limits"]["nvidia.com/gpu"]


def _two_gpus(docs: list[Doc]) -> None:
    _container(docs, "hpo-worker")["resources"]["limits"]["nvidia.com/gpu"] = 2


def _ready_on_healthz(docs: list[Doc]) -> None:
    _container(docs, "hpo-server")["readinessProbe"]["httpGet"]["path"] = "/healthz"


def _token_as_variable(docs: list[Doc]) -> None:
    _container(docs, "hpo-worker")["env"].append(
        {"name": "HPO_WORKER_TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}
    )


def _token_file_not_mounted(docs: list[Doc]) -> None:
    _container(docs, "hpo-worker")["volumeMounts"][0]["mountPath"] = "/elsewhere"


def _selector_mismatch(docs: list[Doc]) -> None:
    _find(docs, "hpo-server", "Service")["spec"]["selector"] = {"app.kubernetes.io/name": "x"}


def _worker_to_nowhere(docs: list[Doc]) -> None:
    for item in _container(docs, "hpo-worker")["env"]:
        if item["name"] == "HPO_SERVER_URL":
            item["value"] = "http://server:8000"


def _migrate_serves(docs: list[Doc]) -> None:
    _container(docs, "hpo-migrate", "Job")["command"] = ["hpo", "serve"]


def _no_worker_id(docs: list[Doc]) -> None:
    _container(docs, "hpo-worker")["args"] = []


@pytest.mark.parametrize(
    ("defect", "expected"),
    [
        (_no_gpu, "nvidia.com/gpu"),
        (_two_gpus, "nvidia.com/gpu"),
        (_ready_on_healthz, "readiness"),
        (_token_as_variable, "from a Secret as a variable"),
        (_token_file_not_mounted, "HPO_WORKER_TOKEN_FILE"),
        (_selector_mismatch, "selects no pods"),
        (_worker_to_nowhere, "HPO_SERVER_URL"),
        (_migrate_serves, "hpo-migrate runs"),
        (_no_worker_id, "worker-id"),
    ],
)
def test_each_wiring_rule_catches_its_defect(
    defect: Callable[[list[Doc]], None], expected: str
) -> None:
    docs = copy.deepcopy(load_resources())
    defect(docs)
    problems = kubernetes_problems(docs)
    assert any(expected in p for p in problems), problems

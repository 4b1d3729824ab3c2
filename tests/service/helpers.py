"""Shared builders for the service tests."""

from __future__ import annotations

from typing import Any

TOKENS = "admin:admin-token,worker:worker-token,viewer:viewer-token"
ADMIN = {"Authorization": "Bearer admin-token"}
WORKER = {"Authorization": "Bearer worker-token"}
VIEWER = {"Authorization": "Bearer viewer-token"}

#: A tiny, fast training config: synthetic data, a small MLP, cheap final IS-NLL.
TINY_FIXED: dict[str, Any] = {
    "hidden_sizes": [32],
    "latent_dim": 4,
    "synthetic_size": 512,
    "final_is_samples": 8,
    "final_is_examples": 64,
    "active_unit_examples": 64,
    "device": "cpu",
}


def spec(name: str = "s", **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": name,
        "dataset": "synthetic",
        "epochs": 3,
        "budget": {"n_trials": 4, "max_concurrent": 2},
        "fixed": dict(TINY_FIXED),
    }
    body.update(overrides)
    return body

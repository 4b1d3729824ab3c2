"""A worker process that speaks the worker protocol over HTTP and logs every answer.

The chaos tests kill, starve and restart what is *around* a worker (the server, the database)
and the worker itself; what they check is the server's side of the protocol. So this worker
does what ``hpo-worker`` does on the wire — lease, heartbeat, report each epoch, complete —
with an epoch that is a short sleep and a value that is a pure function of the trial's
parameters instead of a PyTorch run (the real trainer under SIGKILL is ``test_e2e.py``'s).
It writes one JSON line per answer to stdout, so a test can count statuses and see which
completions the server acknowledged.

    python protocol_worker.py URL TOKEN WORKER_ID [--epochs 3] [--epoch-s 0.3]
        [--after-lease hang] [--idle-exit 5] [--exit-when-idle]

Transport errors and 503s are retried (after ``Retry-After``), as ``hpo-worker`` does.
``--after-lease hang`` leases one trial, says so, and then never heartbeats (to be SIGKILLed).
``--exit-when-idle`` exits (0) at the first empty lease answer whose ``HPO-Work`` header says
``idle`` (no study can give work now), as ``hpo-worker --exit-when-idle`` does, instead of after
``--idle-exit`` seconds without work.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import httpx

#: The empty lease answer's header (``hpo_service.schemas.worker.WORK_HEADER``), spelled out so
#: this process imports httpx only and starts fast.
WORK_HEADER = "HPO-Work"


def emit(**record: Any) -> None:
    print(json.dumps(record), flush=True)


class Worker:
    def __init__(self, url: str, token: str, worker_id: str) -> None:
        self.http = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30
        )
        self.worker_id = worker_id

    def call(self, path: str, body: dict[str, Any], *, give_up_s: float = 120) -> httpx.Response:
        """POST, retrying while the server is unreachable or answers 503."""
        deadline = time.monotonic() + give_up_s
        while True:
            try:
                response = self.http.post(path, json=body)
            except httpx.TransportError as error:
                emit(event="transport_error", path=path, error=type(error).__name__)
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
                continue
            emit(event="answer", path=path, status=response.status_code)
            if response.status_code != 503 or time.monotonic() > deadline:
                return response
            time.sleep(min(float(response.headers.get("retry-after", "1")), 1.0))

    def run(
        self,
        epochs: int,
        epoch_s: float,
        after_lease: str | None,
        idle_exit_s: float,
        exit_when_idle: bool = False,
    ) -> int:
        idle_since = time.monotonic()
        while True:
            granted = self.call("/v1/leases", {"worker_id": self.worker_id, "wait_s": 1})
            if granted.status_code == 204:
                if exit_when_idle and granted.headers.get(WORK_HEADER) == "idle":
                    emit(event="idle_exit")
                    return 0
                if time.monotonic() - idle_since > idle_exit_s:
                    return 0
                continue
            if granted.status_code != 200:
                emit(event="lease_refused", status=granted.status_code, body=granted.text[:300])
                time.sleep(0.5)
                continue
            lease = granted.json()
            emit(event="leased", trial_id=lease["trial_id"], number=lease["trial_number"])
            if after_lease == "hang":
                time.sleep(3600)  # never heartbeat: the test kills this process now
            self.train(lease, epochs, epoch_s)
            idle_since = time.monotonic()

    def train(self, lease: dict[str, Any], epochs: int, epoch_s: float) -> None:
        trial = f"/v1/trials/{lease['trial_id']}"
        token = lease["lease_token"]
        # A deterministic objective of the sampled settings: lower learning rates "win".
        base = 100.0 + 1000.0 * float(lease["config"].get("base_lr", 1e-3))
        for epoch in range(1, epochs + 1):
            time.sleep(epoch_s)
            value = base + 10.0 / epoch
            answer = self.call(
                f"{trial}/report",
                {"lease_token": token, "epoch": epoch, "value": value, "metrics": {"x": 1.0}},
            )
            if answer.status_code != 200:
                emit(event="lost", trial_id=lease["trial_id"], status=answer.status_code)
                return
            action = answer.json()["action"]
            if action != "continue":
                stop = {"lease_token": token, "reason": "told to stop", "pruned": action == "prune"}
                self.call(f"{trial}/fail", stop)
                return
        done = self.call(f"{trial}/complete", {"lease_token": token, "values": [base]})
        if done.status_code == 200:
            emit(event="completed", trial_id=lease["trial_id"], value=base)
        else:
            emit(event="complete_refused", trial_id=lease["trial_id"], status=done.status_code)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("token")
    parser.add_argument("worker_id")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--epoch-s", type=float, default=0.3)
    parser.add_argument("--after-lease", choices=["hang"], default=None)
    parser.add_argument("--idle-exit", type=float, default=5.0)
    parser.add_argument("--exit-when-idle", action="store_true")
    args = parser.parse_args()
    worker = Worker(args.url, args.token, args.worker_id)
    return worker.run(
        args.epochs, args.epoch_s, args.after_lease, args.idle_exit, args.exit_when_idle
    )


if __name__ == "__main__":
    sys.exit(main())

"""``hpo-worker --population K``: lease up to K trials and train the compatible ones fused.

Per trial everything stays as in the single-trial worker (``trainers.worker``): each trial has
its own lease, reports, prune/stop answers and settlement (decided by the same ``Worker``
methods), so a killed population worker leaves K ordinary leases that the server reaps and
retries one by one. What is shared is the training (``train_population``) and the requests:
the population talks to the server through the batched routes (issue 12) — one lease request
for all free slots, one heartbeat for all its trials, one report per group epoch, one
complete and one fail request for the members that ended together.

Lease identities: the server hands an identity its own running trial back (so a restarted
worker resumes), so each of the K slots holds its lease under its own id,
``<worker-id>/<slot>``, sent as the batched lease's ``slots``.

The flow: one long-polled batched lease for all K slots; trials that cannot be fused
(``unfusable_reason``: conv, VAE-GAN, compiled) are kept leased (with their own heartbeat) and
trained alone, one by one, once the population has finished — and no further trials are leased
while one waits. A member that leaves (completed, pruned, cancelled, failed) is settled at the
end of its group epoch, before its slot is leased again. Trials of another group (e.g. another
batch size) train as a second stack beside the first, within the same K.

Checkpoints and best models (issue 14), as the single-trial worker's: each member's state is
sent every ``checkpoint_every_epochs`` (and at the epoch a worker shutting down stops at) through
the same route and in the same format (``trainers.checkpoint_sync``), so a retry resumes on
either kind of worker; a retry leased here resumes its member from its checkpoint; a member
that completes sends its best model first when the lease asks for it.

Tasks (``lr_range_test``, ``final_evaluation``): the population's first batched lease lists
them in its ``kinds``, and the server answers a pending task alone, held by slot 0; the
worker's loop (``Worker._population_round``) runs it by itself, as the single-trial worker
does, then leases its slots again. Refills while members train ask for trials only. A
population worker is often a study's only worker, so it must run them, and one request per
round (not a task lease before every batched lease) does.

K = ``auto`` (``auto_population``): the power of two that fits in half the free device memory
and still raised the measured samples/s by at least 10 % over half as many members — if its
samples/s beat ``train()``'s own single-trial step by at least 10 %; else K = 1, and then every
trial is trained alone by ``train()``, as without ``--population``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Mapping

from hpo_service.client import NoWork, ServerUnavailable, finite_metrics
from hpo_service.schemas import ItemError, Lease, TrialComplete, TrialFail
from trainers.checkpoint_sync import (
    checkpoint_due,
    fell_back,
    fetch_resume,
    say_resumed,
    send_best_model,
    send_checkpoint,
)
from trainers.checkpoints import TrainState
from trainers.errors import ConfigError
from trainers.population import NewMember, Outcome, Resume, train_population
from trainers.population_auto import AUTO_MAX, auto_population
from trainers.population_stack import unfusable_reason
from trainers.train import Decision, EpochMetrics, TrainResult, parse_config
from trainers.worker import TASK_KINDS, ActiveTrial, Settlement, Worker, epoch_report

log = logging.getLogger("hpo.worker")


def lease_population(worker: Worker) -> list[Lease]:
    """The first leases of a population: all K slots in one long-polled batched request (for
    ``auto``, slot 0 alone until K is measured on its config, then the rest). The request
    lists the task kinds too, so its answer may instead be one task (an LR range test, a
    final evaluation), alone and held by slot 0, which the caller runs by itself."""
    wait_s = worker.options.wait_s
    kinds = ("trial", *TASK_KINDS)
    if worker.options.population == "auto" and worker.auto_population is None:
        first = _lease(worker, [0], wait_s, kinds)
        if not first or first[0].kind != "trial":
            return first  # nothing, or a task: K is measured on a trial's config
        return first + _lease(worker, list(range(1, _capacity(worker, first[0]))), 0.0)
    return _lease(worker, list(range(_capacity(worker, None))), wait_s, kinds)


def _lease(
    worker: Worker, slots: list[int], wait_s: float, kinds: tuple[str, ...] | None = None
) -> list[Lease]:
    """A batched lease for ``slots``; ``kinds`` None: trials only (a refill while members
    train, which could not run a task beside them)."""
    cap = worker.options.max_trials
    if cap is not None:
        slots = slots[: max(cap - worker.trials_done, 0)]
    if not slots:
        return []
    identities = [worker.lease_identity(slot) for slot in slots]
    granted = worker._retrying(
        "lease",
        lambda: worker.client.next_leases(
            worker.options.worker_id,
            len(identities),
            wait_s,
            worker.options.device,
            identities,
            kinds,
        ),
    )
    if isinstance(granted, NoWork):
        worker.last_idle = granted.idle  # hpo-worker --exit-when-idle reads it
        return []
    return granted


def run_population(worker: Worker, first: list[Lease]) -> int:
    """Train the ``first`` leases and those leased beside them; returns how many trials were
    settled."""
    capacity = _capacity(worker, first[0])
    slots: dict[Hashable, ActiveTrial] = {}  # slot number → its trial
    slot_of = {worker.lease_identity(slot): slot for slot in range(capacity)}
    alone: list[ActiveTrial] = []
    ended: list[Settlement] = []  # members that left, settled before the slots are leased again
    settled = 0
    guard = threading.Lock()  # the heartbeat thread reads ``slots``
    beats = _Heartbeats(worker, lambda: _members(guard, slots, ended))

    def remaining() -> int | None:
        cap = worker.options.max_trials
        return None if cap is None else cap - worker.trials_done - settled - len(slots) - len(alone)

    def admit(lease: Lease) -> NewMember | None:
        slot = slot_of[str(lease.worker_id)]
        try:
            reason = unfusable_reason(parse_config(lease.config))
        except ConfigError:
            reason = None  # the population reports the error as this member's outcome
        if reason is None and capacity == 1 and worker.options.population == "auto":
            # auto measured no gain from fusing: train() alone beats a stack of one
            reason = "--population auto chose K = 1"
        # An unfusable trial waits for the population with a heartbeat of its own.
        active = worker.start_trial(lease, beat=reason is not None)
        if reason is not None:
            log.info("trial %d: %s; trained after the population", lease.trial_number, reason)
            alone.append(active)
            return None
        with guard:
            slots[slot] = active
        return slot, active.config

    def settle() -> None:
        nonlocal settled
        settled += settle_many(worker, ended)
        ended.clear()

    def refill_many(free: int) -> list[NewMember]:
        settle()  # first, so the budget and the caps see the slots free
        want = [s for s in range(capacity) if s not in slots][:free]
        left = remaining()
        if worker.shutting_down or alone or left == 0:
            return []
        if left is not None:
            want = want[:left]
        leases = _lease(worker, want, 0.0)
        return [m for lease in leases if (m := admit(lease)) is not None]

    def on_epochs(epochs: list[tuple[Hashable, EpochMetrics]]) -> Mapping[Hashable, Decision]:
        return report_many(worker, [(slots[key], metrics) for key, metrics in epochs], epochs)

    def should_leave(slot: Hashable) -> bool:
        state = slots[slot].state
        return state.lost or state.stop_reason is not None

    def resume_state(slot: Hashable) -> TrainState | None:
        return fetch_resume(worker.client, slots[slot].lease, worker._retrying)

    def resume_started(slot: Hashable, epoch: int | None, reason: str | None) -> None:
        lease = slots[slot].lease
        if epoch is not None:
            say_resumed(worker.client, lease, epoch, worker._retrying)
        else:
            fell_back(worker.client, lease, worker._retrying, reason or "")

    def on_done(slot: Hashable, outcome: Outcome | Exception) -> None:
        with guard:
            active = slots.pop(slot)
        ended.append(worker.settlement(active, outcome))

    members = [m for lease in first if (m := admit(lease)) is not None]
    beats.start()
    try:
        if members:
            log.info("population of %d trials (capacity %d)", len(members), capacity)
            try:
                train_population(
                    members, capacity=capacity, refill_many=refill_many, should_leave=should_leave,
                    on_done=on_done, on_epochs=on_epochs, patience=worker.options.patience,
                    resume=Resume(resume_state, resume_started),
                )  # fmt: skip
            except Exception as error:  # the fused step itself failed: every member, retryable
                log.exception("population crashed")
                for slot in list(slots):
                    on_done(slot, error)
        settle()
    finally:
        beats.stop()
    for active in alone:
        worker.train_started(active)
        settled += 1
    return settled


def _members(
    guard: threading.Lock, slots: Mapping[Hashable, ActiveTrial], ended: list[Settlement]
) -> list[ActiveTrial]:
    """The population's trials still leased: training, or ended and not yet settled."""
    with guard:
        return [*slots.values(), *(s.active for s in ended if not s.lost)]


def report_many(
    worker: Worker,
    members: list[tuple[ActiveTrial, EpochMetrics]],
    keys: list[tuple[Hashable, EpochMetrics]],
) -> dict[Hashable, Decision]:
    """One batched report for a group epoch; per member the decision ``Worker`` takes alone."""
    reports = [epoch_report(active.lease, metrics) for active, metrics in members]
    items = worker._retrying("report", lambda: worker.client.report_many(reports))
    decisions: dict[Hashable, Decision] = {}
    for (active, metrics), (key, _), item in zip(members, keys, items, strict=True):
        if item.answer is None:
            active.state.lost, active.state.stop_reason = True, _refusal(item.error)
            decisions[key] = "stop"
            continue
        answer = worker.epoch_answered(active.lease, active.state, metrics, item.answer)
        decisions[key] = "stop" if answer == "stop" else "continue"
        # issue 14: the member's state, as the single-trial worker sends its trial's
        due = checkpoint_due(active.lease, metrics.epoch, answer, lambda: worker.shutting_down)
        if metrics.checkpoint is not None and due:
            send_checkpoint(worker.client, active.lease, metrics.epoch, metrics.checkpoint)
    return decisions


def settle_many(worker: Worker, settlements: list[Settlement]) -> int:
    """Settle the members that ended together: one ``complete`` and one ``fail`` request for
    all of them (each item answered on its own). Returns how many were settled."""
    trained = time.monotonic()
    names: dict[int, str] = {id(s): "lost" for s in settlements if s.lost}
    completing = [s for s in settlements if not s.lost and s.values is not None]
    failing = [s for s in settlements if not s.lost and s.values is None]
    if completing:
        for s in completing:  # issue 14: kept for the study's best, before complete
            if isinstance(s.outcome, TrainResult):
                send_best_model(worker.client, s.active.lease, s.outcome)
        results = [
            TrialComplete(
                trial_id=s.active.lease.trial_id,
                lease_token=s.active.lease.lease_token,
                values=s.values or [],
                metrics=finite_metrics(s.final or {}),
            )
            for s in completing
        ]
        done = worker._retrying("complete", lambda: worker.client.complete_many(results))
        for s, item in zip(completing, done, strict=True):
            names[id(s)] = s.settled("complete") if item.answer else s.refused(_refusal(item.error))
    if failing:
        failures = [
            TrialFail(
                trial_id=s.active.lease.trial_id,
                lease_token=s.active.lease.lease_token,
                reason=s.reason,
                retryable=s.retryable,
                pruned=s.pruned,
                diverged=s.diverged,
            )
            for s in failing
        ]
        failed = worker._retrying("fail", lambda: worker.client.fail_many(failures))
        for s, fitem in zip(failing, failed, strict=True):
            names[id(s)] = (
                s.settled(fitem.answer.state) if fitem.answer else s.refused(_refusal(fitem.error))
            )
    for s in settlements:
        worker.log_finished(s, names[id(s)], trained)
    return len(settlements)


def _refusal(error: ItemError | None) -> str:
    return "refused" if error is None else f"{error.code}: {error.message}"


class _Heartbeats:
    """One thread beating every trial of the population in one request per interval."""

    def __init__(self, worker: Worker, members: Callable[[], list[ActiveTrial]]) -> None:
        self.worker = worker
        self.members = members
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="heartbeat-pop")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        interval: float | None = None
        while True:
            actives = self.members()
            if actives:
                interval = min(a.lease.heartbeat_interval_s for a in actives)
            if self._stop.wait(interval or 1.0):
                return
            actives = self.members()
            if not actives:
                continue
            leases = [(a.lease.trial_id, a.lease.lease_token) for a in actives]
            try:
                items = self.worker.client.heartbeat_many(leases)
            except ServerUnavailable as error:
                log.warning("heartbeat: server unreachable (%s)", error)
                continue
            for active, item in zip(actives, items, strict=True):
                if item.answer is None:
                    active.state.lost, active.state.stop_reason = True, _refusal(item.error)
                elif item.answer.action == "stop":
                    active.state.stop_reason = item.answer.reason or "stopped by the server"


def _capacity(worker: Worker, first: Lease | None) -> int:
    population = worker.options.population
    if population != "auto":
        return int(population)
    if worker.auto_population is None and first is not None:
        config = dict(first.config)
        if worker.options.device is not None:
            config["device"] = worker.options.device
        try:
            worker.auto_population = auto_population(parse_config(config))
        except ConfigError:
            worker.auto_population = 1
        log.info("--population auto: %d members", worker.auto_population)
    return worker.auto_population or 1


__all__ = ["AUTO_MAX", "auto_population", "lease_population", "run_population"]

"""Warm starts and the morning report never pick an infeasible trial (issue 10), with nights
made by the real scheduler on a simulated clock, on SQLite and PostgreSQL."""

from __future__ import annotations

from schedule_helpers import SimClock, nodes, schedule_settings, schedule_spec, utc

from hpo_service.reports import build_report

HEALTHY = {"active_units": 3.0, "val_kl": 10.0}
COLLAPSED = {"active_units": 0.0, "val_kl": 0.001}


def test_a_collapsed_best_is_neither_reported_nor_warm_started(database_url: str) -> None:
    clock = SimClock(utc(2026, 1, 1))
    with nodes(schedule_settings(database_url), clock, 1) as [node]:
        node.schedules.create(schedule_spec(warm_start_top_k=2))
        node.scheduler.tick(utc(2026, 1, 1, 2, 30))
        first = "nightly-2026-01-01"
        planted = []
        # The collapsed trial has the best value of the night (50): it must not count.
        for value, metrics in ((100.0, HEALTHY), (50.0, COLLAPSED), (90.0, HEALTHY)):
            lease = node.studies.lease("planter")
            assert lease is not None and lease.study == first
            node.studies.complete(lease.trial_id, lease.lease_token, [value], metrics)
            planted.append(dict(node.studies.storage.get_trial(lease.trial_id).params))
        node.studies.set_state(first, "stopped")

        [fired] = node.scheduler.tick(utc(2026, 1, 2, 2, 30))
        assert fired.warm_started == 2
        second = "nightly-2026-01-02"
        leased = [node.studies.lease(f"w{i}") for i in range(2)]
        # The two feasible trials, best first (90, then 100); the collapsed one left out.
        expected = [planted[2]["base_lr"], planted[0]["base_lr"]]
        assert [(lease.study, lease.config["base_lr"]) for lease in leased if lease] == [
            (second, lr) for lr in expected
        ]

        report = build_report(node.studies, "nightly")
        night = next(n for n in report.nights if n.study == first)
        assert night.best_value == 90.0

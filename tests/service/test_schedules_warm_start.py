"""Warm start: tonight's study begins with last night's top-k parameter sets; seed policies."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState
from schedule_helpers import SimClock, nodes, plant, schedule_settings, schedule_spec, template, utc

from hpo_service.schemas import ScheduleUpdate, StudyTemplate


def waiting_params(storage: optuna.storages.BaseStorage, study: str) -> list[dict[str, object]]:
    loaded = optuna.load_study(study_name=study, storage=storage)
    waiting = [t for t in loaded.trials if t.state == TrialState.WAITING]
    # A waiting trial's parameters are the ones fixed when it was enqueued.
    return [t.system_attrs["fixed_params"] for t in sorted(waiting, key=lambda t: t.number)]


def test_tonight_enqueues_exactly_last_nights_top_k(database_url: str) -> None:
    clock = SimClock(utc(2026, 1, 1))
    with nodes(schedule_settings(database_url), clock, 1) as [node]:
        node.schedules.create(schedule_spec(warm_start_top_k=3))
        node.scheduler.tick(utc(2026, 1, 1, 2, 30))
        assert waiting_params(node.studies.storage, "nightly-2026-01-01") == []  # first night
        values = [5.0, 3.0, "pruned", 4.0, 1.0, "fail", 2.0]
        params = plant(node.studies, "nightly-2026-01-01", values)
        by_value = {v: p for v, p in zip(values, params, strict=True) if isinstance(v, float)}
        [fired] = node.scheduler.tick(utc(2026, 1, 2, 2, 30))
        assert fired.warm_started == 3
        # The three best complete trials, best first; pruned and failed ones never count.
        expected = [by_value[1.0], by_value[2.0], by_value[3.0]]
        assert waiting_params(node.studies.storage, "nightly-2026-01-02") == expected
        # Tonight's first leases are exactly those configurations.
        node.studies.set_state("nightly-2026-01-01", "stopped")
        leased = [node.studies.lease(f"w{i}") for i in range(3)]
        assert [(lease.study, lease.config["base_lr"]) for lease in leased if lease] == [
            ("nightly-2026-01-02", p["base_lr"]) for p in expected
        ]


def test_parameters_missing_from_tonights_space_are_dropped(database_url: str) -> None:
    clock = SimClock(utc(2026, 1, 1))
    with nodes(schedule_settings(database_url), clock, 1) as [node]:
        node.schedules.create(schedule_spec(warm_start_top_k=2))
        node.scheduler.tick(utc(2026, 1, 1, 2, 30))
        params = plant(node.studies, "nightly-2026-01-01", [2.0, 1.0])
        assert all("grad_clip_norm" in p for p in params)
        # Tonight grad_clip_norm is no longer searched, and base_lr's range shrank to a point
        # that last night's best value lies outside.
        new_template = template(
            drop=["grad_clip_norm"],
            search_space={"base_lr": {"low": 5e-4, "high": 5.000001e-4}},
        )
        node.schedules.update(
            "nightly", ScheduleUpdate(template=StudyTemplate.model_validate(new_template))
        )
        node.scheduler.tick(utc(2026, 1, 2, 2, 30))
        queued = waiting_params(node.studies.storage, "nightly-2026-01-02")
        expected = [
            {k: v for k, v in p.items() if k not in ("grad_clip_norm", "base_lr")}
            for p in (params[1], params[0])
        ]
        assert queued == expected


@pytest.mark.parametrize(("policy", "seeds"), [("fixed", [7, 7, 7]), ("per_night", [7, 8, 9])])
def test_seed_policy(database_url: str, policy: str, seeds: list[int]) -> None:
    clock = SimClock(utc(2026, 1, 1))
    with nodes(schedule_settings(database_url), clock, 1) as [node]:
        node.schedules.create(schedule_spec(seed_policy=policy, warm_start_top_k=0))
        for day in (1, 2, 3):
            node.scheduler.tick(utc(2026, 1, day, 2, 30))
        recorded = []
        for day in (1, 2, 3):
            info = node.studies.get_study(f"nightly-2026-01-{day:02d}")
            recorded.append(info.spec.sampler.seed)
            study = optuna.load_study(
                study_name=f"nightly-2026-01-{day:02d}", storage=node.studies.storage
            )
            assert study.user_attrs["spec"]["sampler"]["seed"] == info.spec.sampler.seed
            assert study.user_attrs["schedule"]["run_index"] == day - 1
        assert recorded == seeds

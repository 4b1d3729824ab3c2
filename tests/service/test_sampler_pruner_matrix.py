"""Every sampler and every pruner the spec accepts, in use through ``StudyService`` (issue 17).

A short study each on a real SQLite file, driven through lease / report / complete with a
synthetic response (the decision under test is the sampler's or the pruner's, not training's).
Each case asserts the class the service really samples or prunes with — read back from a second
``StudyService`` on the same file, so it is what the spec rebuilds, not what was recorded — and
one decision that class makes and a wrong one would not.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import optuna
import pytest
from helpers import TINY_FIXED

from hpo_service.config import Settings
from hpo_service.phase_pruning import PhaseAwarePruner
from hpo_service.schemas import PrunerName, SamplerName, StudySpec
from hpo_service.studies import StudyService

#: Two searched dimensions; every other default dimension dropped.
SPACE = {"free_bits": {"low": 0.0, "high": 1.0}, "kl_ratio": {"low": 0.2, "high": 1.0}}
DROP = [
    "kl_schedule",
    "kl_cycles",
    "kl_warmup_epochs",
    "lr_policy",
    "base_lr",
    "lr_warmup_epochs",
    "optimizer",
    "weight_decay",
    "grad_clip_norm",
    "batch_size",
]
OPTIMUM = (0.8, 0.4)


def _distance(params: dict[str, Any]) -> float:
    return math.hypot(params["free_bits"] - OPTIMUM[0], params["kl_ratio"] - OPTIMUM[1])


def _value(params: dict[str, Any]) -> float:
    """A smooth bowl around ``OPTIMUM``: what a sampler that models the response homes in on."""
    return 100.0 + 50.0 * _distance(params) ** 2


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(database_url=f"sqlite:///{tmp_path / 'matrix.db'}", run_reaper=False)


@pytest.fixture
def service(settings: Settings) -> Iterator[StudyService]:
    studies = StudyService(settings)
    yield studies
    studies.storage.engine.dispose()


def _spec(name: str, sampler: dict[str, Any], pruner: dict[str, Any], **extra: Any) -> StudySpec:
    body: dict[str, Any] = {
        "name": name,
        "dataset": "synthetic",
        "epochs": 4,
        "budget": {"n_trials": 50, "max_concurrent": 1},
        "sampler": sampler,
        "pruner": pruner,
        "search_space": SPACE,
        "drop": DROP,
        "fixed": {**TINY_FIXED, "kl_schedule": "cyclical"},  # kl_ratio is a cyclical child
        "constraints": {"active_units": False, "kl": False},
    }
    body.update(extra)
    return StudySpec.model_validate(body)


def _in_use(settings: Settings, name: str) -> optuna.Study:
    """The study as a fresh service process loads it: sampler and pruner rebuilt from the spec."""
    other = StudyService(settings)
    try:
        study_id = other.get_study(name).study_id
        return other.core.load(study_id).study
    finally:
        other.storage.engine.dispose()


def _sample(
    service: StudyService,
    n: int,
    values: Callable[[dict[str, Any]], Sequence[float]] = lambda p: [_value(p)],
) -> list[dict[str, Any]]:
    """Lease and complete ``n`` trials in turn; the params each was given, in order."""
    sampled = []
    for _ in range(n):
        lease = service.lease("matrix")
        assert lease is not None
        params = {k: lease.config[k] for k in SPACE}
        service.complete(lease.trial_id, lease.lease_token, list(values(params)), {})
        sampled.append(params)
    return sampled


def _points(params: Sequence[dict[str, Any]]) -> list[float]:
    return [p[key] for p in params for key in sorted(SPACE)]


def _mean_distance(points: Sequence[dict[str, Any]]) -> float:
    return sum(_distance(p) for p in points) / len(points)


# --- samplers ------------------------------------------------------------------------------------


def test_every_sampler_name_has_a_case_below() -> None:
    """The spec's names are the cases here: a new sampler or pruner gets a test or fails this."""
    assert set(typing.get_args(SamplerName)) == set(SAMPLER_CASES)
    assert set(typing.get_args(PrunerName)) == set(PRUNER_CASES)


def _model_based(
    name: str, cls: type, n_startup: int, n: int, nearer: bool = True
) -> Callable[[StudyService, Settings], None]:
    """TPE, GP: the startup trials are the seed's random ones; the trials after them are the
    model's, not the random sampler's, and nearer the optimum on average than the same seed's
    random trials (a deterministic comparison: both seeds are fixed). GP's first model trials
    probe the corners of the box (its acquisition's exploration), so for it only the first
    two hold after so few trials."""

    def case(service: StudyService, settings: Settings) -> None:
        sampler = {"name": name, "seed": 3, "n_startup_trials": n_startup}
        service.create_study(_spec(name, sampler, {"name": "none"}))
        modelled = _sample(service, n)
        service.set_state(name, "stopped")  # the next leases come from the random study
        service.create_study(_spec("random", {"name": "random", "seed": 3}, {"name": "none"}))
        random = _sample(service, n)
        assert type(_in_use(settings, name).sampler) is cls
        assert _points(modelled[:n_startup]) == pytest.approx(_points(random[:n_startup]))
        later, later_random = modelled[n_startup:], random[n_startup:]
        assert _points(later) != pytest.approx(_points(later_random))
        if nearer:
            assert _mean_distance(later) < _mean_distance(later_random), (later, later_random)

    return case


def _random_case(service: StudyService, settings: Settings) -> None:
    """Exactly the draws of Optuna's RandomSampler with the spec's seed, in the space's order
    (``kl_ratio`` comes before ``free_bits`` in the default space)."""
    service.create_study(_spec("random", {"name": "random", "seed": 11}, {"name": "none"}))
    sampled = _sample(service, 4)
    assert type(_in_use(settings, "random").sampler) is optuna.samplers.RandomSampler
    reference = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=11))
    expected = []
    for _ in range(4):
        trial = reference.ask()
        kl_ratio = trial.suggest_float("kl_ratio", 0.2, 1.0)
        expected.append({"kl_ratio": kl_ratio, "free_bits": trial.suggest_float("free_bits", 0, 1)})
        reference.tell(trial, 0.0)
    assert _points(sampled) == pytest.approx(_points(expected))


def _qmc_case(service: StudyService, settings: Settings) -> None:
    """Sobol points (the spec's default, unscrambled): after the first trial, drawn at random
    because QMC learns the space from it, every trial is a distinct point of the Sobol sequence
    (Sobol 1967) in the unit square of the two dimensions; a random draw never is."""
    from scipy.stats import qmc

    service.create_study(_spec("qmc", {"name": "qmc", "seed": 5}, {"name": "none"}))
    sampled = _sample(service, 7)[1:]
    assert type(_in_use(settings, "qmc").sampler) is optuna.samplers.QMCSampler
    sobol = {tuple(round(x, 9) for x in row) for row in qmc.Sobol(2, scramble=False).random(16)}
    units = [
        tuple(round((p[k] - SPACE[k]["low"]) / (SPACE[k]["high"] - SPACE[k]["low"]), 9)
              for k in sorted(SPACE))
        for p in sampled
    ]  # fmt: skip
    assert len(set(units)) == len(units) and set(units) <= sobol, (units, sorted(sobol))


def _cmaes_case(service: StudyService, settings: Settings) -> None:
    """After its random startup trials every trial is sampled by CMA-ES (it records the
    generation it came from), and the search moves toward the optimum."""
    from hpo_service.optimizers import ConstraintBlindCmaEsSampler

    sampler = {"name": "cmaes", "seed": 2, "n_startup_trials": 3}
    service.create_study(_spec("cmaes", sampler, {"name": "none"}))
    sampled = _sample(service, 12)
    study = _in_use(settings, "cmaes")
    assert type(study.sampler) is ConstraintBlindCmaEsSampler
    trials = study.get_trials(deepcopy=False)
    assert all("cma:generation" not in t.system_attrs for t in trials[:3])
    assert all("cma:generation" in t.system_attrs for t in trials[3:])
    assert _mean_distance(sampled[-4:]) < _mean_distance(sampled[:3])


def _nsga2_case(service: StudyService, settings: Settings) -> None:
    """Two objectives; the first population is generation 0, the next one generation 1, bred
    from it (NSGA-II, Deb et al. 2002) — with the spec's population size."""
    spec = _spec(
        "nsga2",
        {"name": "nsga2", "seed": 0, "population_size": 4},
        {"name": "none"},
        objectives=[{"metric": "val_neg_elbo"}, {"metric": "val_recon"}],
    )
    service.create_study(spec)
    _sample(service, 8, lambda p: [_value(p), 100.0 + p["free_bits"]])
    study = _in_use(settings, "nsga2")
    assert type(study.sampler) is optuna.samplers.NSGAIISampler
    generations = [t.system_attrs["NSGAIISampler:generation"] for t in study.get_trials()]
    assert generations == [0, 0, 0, 0, 1, 1, 1, 1]


def _grid_case(service: StudyService, settings: Settings) -> None:
    """Every combination of the stepped values exactly once, and then no more trials."""
    from hpo_service.grid import StudyGridSampler

    space = {"free_bits": {"low": 0.0, "high": 1.0, "step": 0.5}, "kl_ratio": {"choices": [0.5, 1]}}
    service.create_study(_spec("grid", {"name": "grid"}, {"name": "none"}, search_space=space))
    sampled = _sample(service, 6)
    assert service.lease("matrix") is None  # the grid is done: the study ended with it
    assert type(_in_use(settings, "grid").sampler) is StudyGridSampler
    points = {(p["free_bits"], p["kl_ratio"]) for p in sampled}
    assert points == {(f, k) for f in (0.0, 0.5, 1.0) for k in (0.5, 1)}


SAMPLER_CASES: dict[str, Callable[[StudyService, Settings], None]] = {
    "tpe": _model_based("tpe", optuna.samplers.TPESampler, n_startup=4, n=10),
    "gp": _model_based("gp", optuna.samplers.GPSampler, n_startup=3, n=5, nearer=False),
    "random": _random_case,
    "qmc": _qmc_case,
    "cmaes": _cmaes_case,
    "nsga2": _nsga2_case,
    "grid": _grid_case,
}


@pytest.mark.parametrize("name", sorted(SAMPLER_CASES))
def test_the_sampler_in_use_and_a_decision_it_makes(
    name: str, service: StudyService, settings: Settings
) -> None:
    SAMPLER_CASES[name](service, settings)


# --- pruners -------------------------------------------------------------------------------------

EPOCHS = 6
#: Finished trials, each better than the one before at every epoch (so none of them is pruned).
GOOD_CURVES = [[130.0 - 3 * e - i for e in range(EPOCHS)] for i in range(6)]


def _train(service: StudyService, curve: Sequence[float]) -> int | None:
    """Lease a trial and report ``curve`` epoch by epoch; the epoch it was pruned at (then it
    is failed as pruned, as a worker does), or None when it ran to the end and completed."""
    lease = service.lease("matrix")
    assert lease is not None
    for epoch, value in enumerate(curve, start=1):
        answer = service.report(lease.trial_id, lease.lease_token, epoch, value, {})
        if answer.action == "prune":
            service.fail(lease.trial_id, lease.lease_token, answer.reason or "", False, True)
            return epoch
        assert answer.action == "continue"
    service.complete(lease.trial_id, lease.lease_token, [curve[-1]], {})
    return None


def _pruning_study(service: StudyService, pruner: dict[str, Any], **extra: Any) -> None:
    spec = _spec(
        f"prune-{pruner['name']}",
        {"name": "random", "seed": 0},
        {"n_startup_trials": 0, "n_warmup_steps": 0, "phase_aware": False, **pruner},
        epochs=EPOCHS,
        **extra,
    )
    service.create_study(spec)


PruneCase = tuple[dict[str, Any], type, list[list[float]], list[float], list[float]]
BAD = [200.0] * EPOCHS  # far worse than every good curve at every epoch
GOOD = [100.0 - e for e in range(EPOCHS)]  # better than every good curve at every epoch

PRUNER_CASES: dict[str, PruneCase] = {
    # name: (pruner spec, inner class, finished curves, a curve it must prune, one it must keep)
    "median": ({"name": "median"}, optuna.pruners.MedianPruner, GOOD_CURVES[:3], BAD, GOOD),
    "percentile": (
        {"name": "percentile", "percentile": 25.0},
        optuna.pruners.PercentilePruner,
        GOOD_CURVES[:3],
        # Between the best (128 + …) and the median (129 + …) finished value at every epoch:
        # the 25th percentile prunes it (128.5 + …); a median pruner would not.
        [c - 1.25 for c in GOOD_CURVES[0]],
        GOOD,
    ),
    "successive_halving": (
        {"name": "successive_halving", "min_resource": 1, "reduction_factor": 2},
        optuna.pruners.SuccessiveHalvingPruner,
        GOOD_CURVES[:3],
        BAD,
        GOOD,
    ),
    "hyperband": (
        {"name": "hyperband", "min_resource": 1, "reduction_factor": 3},
        optuna.pruners.HyperbandPruner,
        GOOD_CURVES,  # a few in each of its two brackets
        BAD,
        GOOD,
    ),
    "wilcoxon": (
        {"name": "wilcoxon"},
        optuna.pruners.WilcoxonPruner,
        GOOD_CURVES[:2],
        # Worse than the best trial at every epoch, by little: a signed-rank test over the
        # epochs finds it (Wilcoxon 1945); it is never worse by enough for a single step to.
        [c + 1.0 for c in GOOD_CURVES[1]],
        GOOD,
    ),
    "none": ({"name": "none"}, optuna.pruners.NopPruner, GOOD_CURVES[:3], BAD, BAD),
}


@pytest.mark.parametrize("name", sorted(PRUNER_CASES))
def test_the_pruner_in_use_prunes_a_bad_curve_and_keeps_a_good_one(
    name: str, service: StudyService, settings: Settings
) -> None:
    pruner, cls, finished, bad, good = PRUNER_CASES[name]
    _pruning_study(service, pruner)
    for curve in finished:
        assert _train(service, curve) is None
    pruned_at = _train(service, bad)
    kept = _train(service, good)
    study = _in_use(settings, f"prune-{name}")
    assert type(study.pruner) is cls
    if name == "none":
        assert pruned_at is None and kept is None  # nothing is ever pruned
    else:
        assert pruned_at is not None, f"{name} never pruned {bad}"
        assert kept is None, f"{name} pruned {good} at epoch {kept}"


def test_patience_waits_while_a_bad_trial_improves_then_prunes_it_on_a_plateau(
    service: StudyService, settings: Settings
) -> None:
    """PatientPruner(median, patience=1): an improving trial is left alone however bad; once its
    last two epochs are both worse than its best before them, the median rule decides and
    prunes it (a plateau is not enough: Optuna compares strictly)."""
    _pruning_study(service, {"name": "median", "patience": 1})
    for curve in GOOD_CURVES[:3]:
        assert _train(service, curve) is None
    assert _train(service, [200.0 - 10 * e for e in range(EPOCHS)]) is None  # bad, improving
    assert _train(service, [200.0, 190.0, 195.0, 196.0, 197.0, 198.0]) == 4
    study = _in_use(settings, "prune-median")
    assert type(study.pruner) is optuna.pruners.PatientPruner
    assert type(study.pruner._wrapped_pruner) is optuna.pruners.MedianPruner


def test_phase_aware_wraps_the_spec_s_pruner_and_holds_it_back_during_the_kl_warmup(
    service: StudyService, settings: Settings
) -> None:
    """The default ``phase_aware``: the median pruner inside ``PhaseAwarePruner``, which does not
    let it decide before the trial's KL warm-up is over (epoch 2 here) and then lets it prune."""
    spec = _spec(
        "phase",
        {"name": "random", "seed": 0},
        {"name": "median", "n_startup_trials": 0, "n_warmup_steps": 0},
        epochs=EPOCHS,
        fixed={**TINY_FIXED, "kl_schedule": "linear", "kl_warmup_epochs": 2.0},
        search_space={"free_bits": {"low": 0.0, "high": 1.0}},
    )
    service.create_study(spec)
    for curve in GOOD_CURVES[:3]:
        assert _train(service, curve) is None
    assert _train(service, BAD) == 2  # not at epoch 1: β is still warming up
    study = _in_use(settings, "phase")
    assert type(study.pruner) is PhaseAwarePruner
    assert type(study.pruner.inner) is optuna.pruners.MedianPruner

"""Which sampler settings should a small-budget study (16–64 trials) default to? (issue 10.1)

A cheaper, faithful variant of ``search_quality.py``: the service's own search space
(``hpo_service.search_space``: the default VAE space, its conditional parameters and its
``max_lr_factor`` / batch-size reparameterisations), the service's constraint values
(``hpo_service.constraints.measure``; a diverged trial completes infeasible with the worst value
seen, as ``settle_diverged`` does) and the real trainer (``trainers.train.train``) on a real
dataset, but driven in process by ``optuna.Study.ask/tell`` in memory — no HTTP, no SQLite — so
a 2-core host can afford several seeds. Every arm runs the same data, model and epochs; no
pruner (pruning is the same for every arm and adds noise at these budgets).

Arms (sampler seed ``seed·10 + arm index``, so no two arms share a random stream):

* ``tpe-10``: TPE as the service ships it (10 random start-up trials, multivariate, constant liar);
* ``tpe-4``: the same with 4 start-up trials;
* ``tpe-4-group``: 4 start-up trials, multivariate with ``group=True`` (the space is conditional:
  cycle parameters exist only under some schedules, which plain multivariate TPE samples
  independently);
* ``gp-4``: Optuna's GPSampler with 4 start-up trials (needs torch; the server image has none);
* ``random-2x``: random search with twice the trials;
* ``cmaes-4``: Optuna's CmaEsSampler with 4 start-up trials (categorical and conditional
  dimensions sampled independently, at random). Last in the list so the other arms' seeds
  (``seed·10 + arm index``) stay those of earlier runs.

Per arm and seed it prints the best feasible validation −ELBO (the study's objective, nats per
example), that trial's test −ELBO, the best value after each quarter of the budget, the
infeasible fraction, the wall time and the sampler's own time per trial, then per arm the mean
± sd over seeds and the mean rank against the others on the same seed. From the repository
root::

    .venv/bin/python benchmarks/sampler_defaults.py --dataset digits --epochs 5 --trials 16 \
        --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.exceptions import ExperimentalWarning
from optuna.samplers import BaseSampler
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _service_common import load_average, machine_header  # noqa: E402

from hpo_service.constraints import CONSTRAINTS_ATTR, diverged, measure  # noqa: E402
from hpo_service.schemas import StudySpec  # noqa: E402
from hpo_service.search_space import build_space, resolve_config, suggest  # noqa: E402
from trainers.errors import TrainerError  # noqa: E402
from trainers.train import train  # noqa: E402

ARMS = ("tpe-10", "tpe-4", "tpe-4-group", "gp-4", "random-2x", "cmaes-4")


def _sampler(arm: str, seed: int) -> BaseSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        if arm == "random-2x":
            return optuna.samplers.RandomSampler(seed=seed)
        if arm == "gp-4":
            return optuna.samplers.GPSampler(
                seed=seed, n_startup_trials=4, warn_independent_sampling=False
            )
        if arm == "cmaes-4":
            # CMA-ES models the numerical dimensions; the categorical and conditional ones
            # (schedule, optimizer, batch size, cycle parameters) go to its independent
            # sampler, random search — which is what a user picking `cmaes` gets.
            return optuna.samplers.CmaEsSampler(
                seed=seed, n_startup_trials=4, warn_independent_sampling=False
            )
        startup = 10 if arm == "tpe-10" else 4
        return optuna.samplers.TPESampler(
            seed=seed,
            n_startup_trials=startup,
            multivariate=True,
            group=arm.endswith("group"),
            constant_liar=True,
            warn_independent_sampling=False,
        )


def _spec(args: argparse.Namespace) -> StudySpec:
    return StudySpec.model_validate(
        {
            "name": "sampler-defaults",
            "dataset": args.dataset,
            "epochs": args.epochs,
            "fixed": {
                "hidden_sizes": args.hidden,
                "latent_dim": args.latent,
                "device": "cpu",
                "amp": "off",
                "final_is_samples": 0,  # the test −ELBO is enough to compare samplers
                "binarize": args.binarize,
            },
        }
    )


def _run_arm(arm: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    spec = _spec(args)
    space = build_space(spec)
    n_trials = args.trials * (2 if arm == "random-2x" else 1)
    sampler_seed = seed * 10 + ARMS.index(arm)
    study = optuna.create_study(direction="minimize", sampler=_sampler(arm, sampler_seed))
    best: list[float] = []  # best feasible value after each trial
    best_test: float | None = None
    infeasible = 0
    sample_s = 0.0  # the sampler's own time (ask + suggest): the server pays it under the lock
    started = time.perf_counter()
    for _ in range(n_trials):
        asked = time.perf_counter()
        trial = study.ask()
        params = suggest(trial, spec, space)
        sample_s += time.perf_counter() - asked
        config = resolve_config(spec, params)
        config["seed"] = sampler_seed  # a trial's weights differ across seeds, not across arms
        try:
            metrics = train(config).metrics
            value = float(metrics["val_neg_elbo"])
            if not math.isfinite(value):
                raise ValueError("non-finite objective")
            constraints = measure(spec.constraints, config, metrics)
        except (TrainerError, ValueError, FloatingPointError):
            constraints = diverged(spec.constraints)
            seen = [t.value for t in study.get_trials(states=(TrialState.COMPLETE,))]
            value = max(v for v in seen if v is not None) if seen else 1e4
            metrics = {}
        study._storage.set_trial_system_attr(
            trial._trial_id, CONSTRAINTS_ATTR, list(constraints.values)
        )
        study.tell(trial, value)
        if constraints.feasible:
            if not best or value < best[-1]:
                best_test = metrics.get("test_neg_elbo")
            best.append(min(value, best[-1]) if best else value)
        else:
            infeasible += 1
            best.append(best[-1] if best else math.inf)
    quarters = [best[max(0, n_trials * q // 4 - 1)] for q in (1, 2, 3, 4)]
    return {
        "arm": arm,
        "seed": seed,
        "trials": n_trials,
        "best_val_neg_elbo": best[-1],
        "best_at_budget": best[args.trials - 1],  # random-2x after as many trials as the others
        "best_test_neg_elbo": best_test,
        "best_by_quarter": quarters,
        "infeasible_fraction": infeasible / n_trials,
        "wall_s": round(time.perf_counter() - started, 1),
        "sample_s_per_trial": round(sample_s / n_trials, 3),
    }


def _summary(rows: list[dict[str, Any]], arms: list[str]) -> list[str]:
    lines = [
        f"{'arm':12} {'seed':>4} {'trials':>6} {'best val':>9} {'@budget':>8} {'test':>8} "
        f"{'infeas.':>7} {'wall s':>7} {'sample s/trial':>14}"
    ]
    for r in rows:
        test = r["best_test_neg_elbo"]
        lines.append(
            f"{r['arm']:12} {r['seed']:>4} {r['trials']:>6} {r['best_val_neg_elbo']:>9.3f} "
            f"{r['best_at_budget']:>8.3f} {'n/a' if test is None else f'{test:.3f}':>8} "
            f"{r['infeasible_fraction']:>7.2f} {r['wall_s']:>7} "
            f"{r.get('sample_s_per_trial', math.nan):>14}"
        )
    seeds = sorted({r["seed"] for r in rows})
    ranks: dict[str, list[int]] = {arm: [] for arm in arms}
    for seed in seeds:
        on_seed = sorted(
            (r for r in rows if r["seed"] == seed), key=lambda r: r["best_val_neg_elbo"]
        )
        for rank, r in enumerate(on_seed, start=1):
            ranks[r["arm"]].append(rank)
    for arm in arms:
        values = [r["best_val_neg_elbo"] for r in rows if r["arm"] == arm]
        if not values:
            continue
        sd = statistics.stdev(values) if len(values) > 1 else math.nan
        lines.append(
            f"{arm}: best val −ELBO mean {statistics.fmean(values):.3f} ± {sd:.3f} "
            f"(sd over {len(values)} seeds), mean rank {statistics.fmean(ranks[arm]):.2f}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="digits", choices=("digits", "mnist5k"))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--trials", type=int, default=16, help="random-2x gets twice this")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--hidden", type=int, nargs="+", default=[64])
    parser.add_argument("--latent", type=int, default=8)
    parser.add_argument("--binarize", action="store_true")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per trial")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)  # a loaded 2-core host: oversubscribed threads thrash
    logging.basicConfig(level=logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(machine_header("sampler defaults (issue 10.1)"))
    print(f"command: {' '.join(sys.argv)}")
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        for arm in args.arms:
            row = _run_arm(arm, seed, args)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=2))
    print(f"load average after: {load_average()}")
    for line in _summary(rows, args.arms):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

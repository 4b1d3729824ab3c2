"""One reaper pass over 50 dead leases: how long it takes, on SQLite and PostgreSQL.

Run from the repository root (``PYTHONPATH`` picks which code is timed, so an older checkout
can be timed in the same session for a ratio)::

    .venv/bin/python benchmarks/reap_pass.py [--leases 50]

For each backend, a fresh database and a ``StudyService`` in this process; ``--leases`` trials
are leased and never beat; after the 1 s lease timeout has passed (2.5 s waited, by the
database clock) one ``reap()`` is timed. Prints the load average before and after.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _service_common import database, load_average, machine_header

from hpo_service.config import Settings
from hpo_service.schemas import StudySpec
from hpo_service.studies import StudyService


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--leases", type=int, default=50)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.disable(logging.WARNING)  # one warning line per reaped trial
    print(machine_header("reap_pass: one reaper pass over dead leases"))
    print(f"code:     {Path(sys.modules[StudyService.__module__].__file__ or '').parent}")
    for backend in ("sqlite", "postgresql"):
        with database(backend) as url:
            settings = Settings(
                database_url=url,
                heartbeat_interval_s=0.2,
                lease_timeout_s=1,
                run_reaper=False,
                db_connect_retries=0,
            )
            service = StudyService(settings)
            spec = {
                "name": "mass",
                "dataset": "synthetic",
                "epochs": 3,
                "budget": {"n_trials": args.leases, "max_concurrent": args.leases},
                "sampler": {"name": "random", "seed": 3},
                "max_retries": 1,
            }
            service.create_study(StudySpec.model_validate(spec))
            for index in range(args.leases):
                service.lease(f"killed-{index}")
            time.sleep(2.5)
            started = time.perf_counter()
            service.reap()
            elapsed = time.perf_counter() - started
            counts = service.get_study("mass").counts
            print(
                f"{backend}: one pass over {args.leases} dead leases: {elapsed:.3f} s "
                f"(running {counts.running}, fail {counts.fail}, waiting {counts.waiting})"
            )
            service.storage.engine.dispose()
    print(f"load avg: {load_average()} (at the end)")


if __name__ == "__main__":
    main()

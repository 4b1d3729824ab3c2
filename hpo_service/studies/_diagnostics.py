"""Per-epoch diagnostics: keep every report's record, and keep the trial's plot fresh.

Each accepted report's metrics go to ``hpo_epoch_records`` (``hpo_service.history``), all of a
request's in one statement. At a trial's first epoch and every ``HPO_DIAGNOSTICS_PLOT_EVERY``
epochs its curves are redrawn (``hpo_service.diagnostics_plot``) and attached to it as
``diagnostics.png`` under a stable artifact id, so the dashboard's trial page shows the latest.
Drawing takes seconds (1.4–9 s at load 15–21 on two cores, ``benchmarks/diagnostics_plot.py``),
so it never runs on the report request: a background thread has a child process draw (drawing
holds the GIL, so in a thread of the server it would slow every request), one trial at a time,
and a trial already waiting for a redraw is not queued twice (the redraw reads the newest
records when it runs).

Optuna lists artifacts in system attributes, which it refuses once a trial has finished. The
first epoch's redraw lists the plot; the last redraw, queued by ``complete`` and ``fail``
before they tell Optuna (``before_finish``), then only replaces the listed file's bytes, so it
costs the result nothing. A trial that finishes before its plot was listed gets a placeholder
listed in ``before_finish``, before the tell, and its queued last drawing replaces the
placeholder's bytes: no result ever waits for the drawing process. A redraw queued after
the last one skips; a per-trial lock orders drawings. A plot that fails is logged and never
fails the report or the result.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from typing import Any, Protocol, TypeVar

from optuna.artifacts._protocol import ArtifactStore
from optuna.exceptions import UpdateFinishedTrialError

from hpo_service.artifacts import (
    ARTIFACT_ATTR_PREFIX,
    artifact_id_for,
    attach_to_study,
    attach_to_trial,
)
from hpo_service.diagnostics_plot import placeholder_png, render_diagnostics
from hpo_service.errors import HPOError
from hpo_service.history import EpochHistory, EpochRecord
from hpo_service.models import LeaseRow
from hpo_service.schemas import ReportAnswer
from hpo_service.studies._core import StudyCore

log = logging.getLogger(__name__)

PLOT_KIND = "diagnostics.png"
_Drawn = TypeVar("_Drawn")
#: Trials whose last plot this process drew (so a late background redraw skips), remembered.
FINISHED_MEMORY = 4096


class Diagnostics:
    """The history table and the plot refreshes over one ``StudyCore``. Thread-safe."""

    def __init__(self, core: StudyCore, store: ArtifactStore | None) -> None:
        self.core = core
        self.history = EpochHistory(core.db)
        self.store = store
        self.every = core.settings.diagnostics_plot_every
        self._executor: ThreadPoolExecutor | None = None
        # Drawing holds the GIL for its whole length: in a thread of this process it slowed
        # every report by 2.7× while a drawing ran (benchmarks/diagnostics_plot.py), so it runs
        # in a child process; the waiting thread here releases the GIL.
        self._renderer: ProcessPoolExecutor | None = None
        self._guard = threading.Lock()
        self._pending: set[int] = set()  # a refresh is queued
        # Trials whose plot this process listed (a reaped trial's stays until pushed out).
        self._listed: OrderedDict[int, None] = OrderedDict()
        self._final: OrderedDict[int, None] = OrderedDict()  # the last plot is queued or drawn
        self._locks: dict[int, threading.Lock] = {}
        self.last_render_s: float | None = None  # how long the last drawing took

    @property
    def plotting(self) -> bool:
        return self.store is not None and self.every > 0

    # --- on the report path: one statement, and maybe a background job -------------------

    def epochs_reported(
        self,
        found: Mapping[int, tuple[LeaseRow, str | None]],
        reports: Sequence[EpochReportLike],
        answers: Sequence[ReportAnswer | HPOError],
    ) -> None:
        """Keep the records of the reports that were accepted (any answer but an error) and
        queue a redraw of each trial at its first epoch and every ``every`` epochs: the first
        lists the plot on the trial early, so its last redraw need not wait in ``complete``."""
        kept: list[EpochRecord] = []
        due: list[LeaseRow] = []
        for item, answer in zip(reports, answers, strict=True):
            if isinstance(answer, HPOError) or item.trial_id not in found:
                continue
            row = found[item.trial_id][0]
            kept.append(EpochRecord(row.study_id, item.trial_id, item.epoch, item.metrics))
            if self.plotting and (item.epoch <= 1 or item.epoch % self.every == 0):
                due.append(row)
        self.history.record_many(kept)
        for row in due:
            self._queue(row, last=False)

    def _queue(self, row: LeaseRow, *, last: bool) -> None:
        with self._guard:
            if row.trial_id in self._final:
                return  # the last plot is queued or drawn already
            if last:
                self._remember_final(row.trial_id)
            elif row.trial_id in self._pending:
                return  # the queued refresh will read the newest records
            else:
                self._pending.add(row.trial_id)
        self._thread_pool().submit(self._job, row, last)

    def _thread_pool(self) -> ThreadPoolExecutor:
        with self._guard:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="hpo-diagnostics")
            return self._executor

    # --- plots of a study (the LR range test's curve) ------------------------------------------

    def draw_study_plot(
        self,
        study_id: int,
        artifact_id: str,
        filename: str,
        render: Callable[..., bytes | None],
        *args: Any,
    ) -> None:
        """Have ``render(*args)`` draw a PNG in the drawing process, off the request, and list
        it on the study under ``artifact_id`` (the dashboard's study page shows it). A render
        that returns None draws nothing; one that fails is logged, never raised."""
        if self.store is None:
            return
        self._thread_pool().submit(self._study_job, study_id, artifact_id, filename, render, args)

    def _study_job(
        self,
        study_id: int,
        artifact_id: str,
        filename: str,
        render: Callable[..., bytes | None],
        args: tuple[Any, ...],
    ) -> None:
        assert self.store is not None
        try:
            png = self._in_child(render, *args)
            if png is not None:
                attach_to_study(
                    self.store,
                    self.core.storage,
                    study_id,
                    artifact_id=artifact_id,
                    filename=filename,
                    content=png,
                    mimetype="image/png",
                )
        except Exception:  # a plot must never take the server down
            log.exception("drawing %s of study %d failed", filename, study_id)

    def _job(self, row: LeaseRow, last: bool) -> None:
        try:
            if last:
                # Optuna lists nothing on a finished trial; the listing is in place already,
                # so the newest bytes replace the file it points to.
                self._draw(row, list_it=False)
                return
            with self._guard:
                self._pending.discard(row.trial_id)
                if row.trial_id in self._final:
                    return  # the last plot follows in the queue
            self._draw(row, list_it=True)
        except Exception:  # a plot must never take the server down
            log.exception("drawing the diagnostics of trial %d failed", row.trial_id)
        finally:
            if last:
                with self._guard:
                    self._listed.pop(row.trial_id, None)
                    self._locks.pop(row.trial_id, None)

    # --- on complete / fail, before Optuna's tell ----------------------------------------------

    def before_finish(self, row: LeaseRow) -> None:
        """Queue the trial's last plot. A trial whose plot is not listed yet (it finished
        before its first epoch's drawing ran) gets a placeholder listed here, while Optuna
        still lets it be listed; the queued drawing then replaces the placeholder's bytes.

        The result never waits for a drawing: drawing here made every finishing trial wait
        for the one drawing process in turn (issue 12, ``benchmarks/service_vs_optuna.py``:
        complete p50 8.6 s at 32 workers, ≈ 0.3 s per drawing in series, every study held
        to ≈ 3 trials/s)."""
        if not self.plotting:
            return
        try:
            if not self._is_listed(row) and self.history.latest_epoch(row.trial_id) is not None:
                self._list_placeholder(row)
            self._queue(row, last=True)
        except Exception:
            log.exception("queueing the last diagnostics of trial %d failed", row.trial_id)

    def _list_placeholder(self, row: LeaseRow) -> None:
        """List the trial's plot with placeholder bytes, bytes first as ``attach_to_trial``
        always writes them (no listed file is ever missing). Without the trial's drawing lock:
        a drawing of it under way may write its bytes before or after these, and the last
        drawing, queued next on the one drawing thread, runs after it and writes last."""
        assert self.store is not None
        attach_to_trial(
            self.store,
            self.core.storage,
            row.trial_id,
            artifact_id=artifact_id_for(row.study_id, row.trial_id, PLOT_KIND),
            filename=PLOT_KIND,
            content=placeholder_png(),
            mimetype="image/png",
        )
        with self._guard:
            self._listed[row.trial_id] = None

    def _is_listed(self, row: LeaseRow) -> bool:
        with self._guard:
            if row.trial_id in self._listed:
                return True
        # Listed by another replica, or before this process started.
        key = ARTIFACT_ATTR_PREFIX + artifact_id_for(row.study_id, row.trial_id, PLOT_KIND)
        return key in self.core.storage.get_trial_system_attrs(row.trial_id)

    def _remember_final(self, trial_id: int) -> None:
        self._final[trial_id] = None
        while len(self._final) > FINISHED_MEMORY:
            self._final.popitem(last=False)

    def _draw(self, row: LeaseRow, *, list_it: bool) -> None:
        """Draw the trial's records; list the plot on the trial (``list_it``), or only replace
        the bytes of the listed file."""
        assert self.store is not None
        with self._guard:
            lock = self._locks.setdefault(row.trial_id, threading.Lock())
        with lock:
            records = self.history.records(row.trial_id)
            if not records:
                return
            started = time.perf_counter()
            name = self.core.load(row.study_id).spec.name
            png = self._in_child(render_diagnostics, records, f"{name} · trial {row.trial_number}")
            self.last_render_s = time.perf_counter() - started
            artifact_id = artifact_id_for(row.study_id, row.trial_id, PLOT_KIND)
            if not list_it:
                self.store.write(artifact_id, io.BytesIO(png))
            else:
                # Finished meanwhile (reaped, or on another replica): nothing can be listed.
                with contextlib.suppress(UpdateFinishedTrialError):
                    attach_to_trial(
                        self.store,
                        self.core.storage,
                        row.trial_id,
                        artifact_id=artifact_id,
                        filename=PLOT_KIND,
                        content=png,
                        mimetype="image/png",
                    )
                    with self._guard:
                        self._listed[row.trial_id] = None
                        while len(self._listed) > FINISHED_MEMORY:
                            self._listed.popitem(last=False)
            log.debug(
                "drew diagnostics of trial %d (%d epochs) in %.3fs",
                row.trial_id,
                len(records),
                self.last_render_s,
            )

    def _in_child(self, render: Callable[..., _Drawn], *args: Any) -> _Drawn:
        """``render(*args)`` in the child process (started on first use; a new one if it
        died). Spawned, not forked: forking a process with running threads is unsafe."""
        with self._guard:
            if self._renderer is None:
                self._renderer = ProcessPoolExecutor(
                    1,
                    mp_context=get_context("spawn"),
                    initializer=_yield_to_the_server,
                    initargs=(os.getpid(),),
                )
            renderer = self._renderer
        try:
            return renderer.submit(render, *args).result()
        except BrokenProcessPool:
            with self._guard:
                if self._renderer is renderer:
                    self._renderer = None
            raise

    def shutdown(self) -> None:
        """The server stops: finish the drawing under way, drop the queued ones (a trial keeps
        its last drawn plot; waiting for every queued one could hold a shutdown for minutes),
        then stop the drawing process."""
        with self._guard:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        with self._guard:
            renderer, self._renderer = self._renderer, None
        if renderer is not None:
            renderer.shutdown(wait=True)


def _yield_to_the_server(server: int) -> None:
    """In the drawing process: the lowest CPU priority, so on a small host the server's
    requests get the CPU first and the plot waits (it is not urgent); and a watch that ends
    this process once the server (pid ``server``) is gone (a SIGKILLed server cannot stop its
    pool, and the orphan would sit waiting on its queue for ever). The server passes its pid:
    read here with ``getppid``, a server killed while this process was still starting would
    already be replaced by the new parent, and the watch would wait on that one for ever."""
    with contextlib.suppress(OSError):
        os.nice(19)
    threading.Thread(target=_exit_with, args=(server,), daemon=True, name="hpo-orphan").start()


def _exit_with(server: int, every_s: float = 1.0) -> None:
    while os.getppid() == server:  # re-parented (to init or a subreaper) once it died
        time.sleep(every_s)
    os._exit(0)


class EpochReportLike(Protocol):
    """What ``epochs_reported`` reads of a report (``_reporting.EpochReport``)."""

    @property
    def trial_id(self) -> int: ...
    @property
    def epoch(self) -> int: ...
    @property
    def metrics(self) -> Mapping[str, Any]: ...

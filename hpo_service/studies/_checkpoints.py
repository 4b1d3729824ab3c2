"""Checkpoints, resume and retention (issue 14), over the server's artifact store.

A worker sends its running trial's checkpoint every few epochs (``store``, kind
``"checkpoint"``) and, before ``complete``, the selected model's weights (kind
``"best_model"``). The bytes go to the artifact store under a stable id per trial and kind
(``artifacts.artifact_id_for``, so a newer checkpoint overwrites the older one); the trial's
system attribute ``hpo:checkpoint`` / ``hpo:best_model`` records the epoch, size and SHA-256.
These files are not listed as dashboard artifacts: retention deletes them after their trial has
finished, when Optuna no longer lets the listing change.

A retry of a failed trial (``_reaping.requeue``, same parameters) lists the earlier attempts in
its ``retry_history``; the latest of them with a checkpoint is its ``resume_from``
(``resume_source``), which its lease names and ``fetch`` serves. The worker then says how it
started (``resumed``): resumed at epoch E — the earlier attempt's intermediate values and
per-epoch records (``hpo_epoch_records``) up to E are copied onto the retry, so the pruner sees
one curve and the retry's history and diagnostics plot show epochs 1..N, and ``resumed_from``
records where from — or fresh, with the reason (``resume_fallback``).

Retention (``lineage_ended``, ``after_complete``): once a trial's line of attempts ends
(completed, pruned, or failed with no retry queued) every checkpoint of that line is deleted;
of the completed trials, the best ``best_models_kept`` per study keep their best model, the
rest lose it.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
from typing import Literal

from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.exceptions import UpdateFinishedTrialError
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from hpo_service.artifacts import artifact_id_for, read_artifact
from hpo_service.errors import CheckpointNotFound, InvalidSpec
from hpo_service.history import EpochHistory
from hpo_service.logging_setup import trial_fields
from hpo_service.models import LeaseRow
from hpo_service.schemas import CheckpointAnswer, ResumedAnswer, ResumeFrom
from hpo_service.studies._checks import check_lease, finished_meanwhile, running_trial
from hpo_service.studies._core import LoadedStudy, StudyCore

log = logging.getLogger(__name__)

#: The system attribute that records a trial's stored file of each kind.
ATTRS = {"checkpoint": "hpo:checkpoint", "best_model": "hpo:best_model"}


class Checkpoints:
    """Store, find, serve and delete checkpoints over one ``StudyCore``."""

    def __init__(self, core: StudyCore) -> None:
        self.core = core
        self.history = EpochHistory(core.db)

    # --- a running trial's files -------------------------------------------------------------

    def store(
        self,
        trial_id: int,
        token: str,
        kind: Literal["checkpoint", "best_model"],
        epoch: int,
        content: bytes,
        sha256: str | None,
    ) -> CheckpointAnswer:
        """Store a running trial's checkpoint or best model (replacing its previous one).

        Raises ``TrialNotFound``, ``LeaseMismatch``, ``TrialReaped`` (the trial no longer runs:
        nothing is kept) or ``InvalidSpec`` (``sha256`` does not match the bytes received).
        """
        core = self.core
        actual = hashlib.sha256(content).hexdigest()
        if sha256 is not None and sha256.lower() != actual:
            raise InvalidSpec(
                "X-Checkpoint-SHA256",
                f"does not match the {len(content)} bytes received (their SHA-256 is {actual})",
            )
        with core.db.session() as session:
            row = check_lease(session, trial_id, token)
        running_trial(core, row)
        artifact_id = artifact_id_for(row.study_id, trial_id, kind)
        meta: dict[str, str | int] = {
            "artifact_id": artifact_id,
            "epoch": epoch,
            "bytes": len(content),
            "sha256": actual,
        }
        # Bytes first, the record second: a crash in between leaves an unrecorded file, which
        # retention deletes with its trial's line, never a record without its file.
        core.artifacts.write(artifact_id, io.BytesIO(content))
        try:
            core.storage.set_trial_system_attr(trial_id, ATTRS[kind], meta)
        except UpdateFinishedTrialError as error:
            _remove(core, artifact_id)  # the trial finished meanwhile: its line may have ended
            raise finished_meanwhile(core, row, error) from error
        log.info(
            "trial %d: %s of epoch %d stored (%d bytes)",
            row.trial_number,
            kind,
            epoch,
            len(content),
            extra=_fields(row, f"{kind}_stored"),
        )
        return CheckpointAnswer(
            trial_id=trial_id, kind=kind, epoch=epoch, bytes=len(content), sha256=actual
        )

    # --- resuming a retry ---------------------------------------------------------------------

    def fetch(self, trial_id: int, token: str) -> tuple[bytes, ResumeFrom]:
        """The checkpoint a leased retry resumes from, with where it comes from. Raises
        ``CheckpointNotFound`` (none recorded, or its file is gone), ``TrialNotFound``,
        ``LeaseMismatch`` or ``TrialReaped``."""
        core = self.core
        with core.db.session() as session:
            row = check_lease(session, trial_id, token)
        trial = running_trial(core, row)
        source = resume_source(core, row.study_id, trial)
        if source is None:
            raise CheckpointNotFound(f"trial {row.trial_number} has no checkpoint to resume from")
        try:
            content = read_artifact(
                core.artifacts, artifact_id_for(row.study_id, source.trial_id, "checkpoint")
            )
        except ArtifactNotFound as error:
            raise CheckpointNotFound(
                f"the checkpoint of trial {source.trial_number} (epoch {source.epoch}) is "
                "missing from the artifact store"
            ) from error
        return content, source

    def resumed(
        self,
        trial_id: int,
        token: str,
        from_trial_number: int,
        epoch: int | None,
        reason: str | None,
    ) -> ResumedAnswer:
        """Record how a retry started: resumed at ``epoch`` from trial ``from_trial_number``
        (its intermediate values and epoch records up to ``epoch`` are copied onto the
        retry), or fresh
        (``epoch`` None) for ``reason``. Raises ``InvalidSpec`` when the trial named is not an
        earlier attempt of this one, or ``epoch`` is past its checkpoint; ``TrialReaped``…"""
        core = self.core
        with core.db.session() as session:
            row = check_lease(session, trial_id, token)
        trial = running_trial(core, row)
        if from_trial_number not in (trial.system_attrs.get("retry_history") or []):
            raise InvalidSpec(
                "from_trial_number",
                f"trial {from_trial_number} is not an earlier attempt of trial {row.trial_number}",
            )
        copied = 0
        try:
            if epoch is None:
                core.storage.set_trial_user_attr(
                    trial_id,
                    "resume_fallback",
                    {"trial": from_trial_number, "reason": (reason or "")[:2000]},
                )
                log.warning(
                    "trial %d: could not resume from trial %d (%s); started fresh",
                    row.trial_number,
                    from_trial_number,
                    reason,
                    extra=_fields(row, "resume_fallback"),
                )
            else:
                source_id = core.cache.get_trial_id_from_study_id_trial_number(
                    row.study_id, from_trial_number
                )
                source = core.storage.get_trial(source_id)
                recorded = (source.system_attrs.get(ATTRS["checkpoint"]) or {}).get("epoch")
                if recorded is None or epoch > recorded:
                    raise InvalidSpec(
                        "epoch",
                        f"trial {from_trial_number} has no checkpoint of epoch {epoch} "
                        f"(its latest: {recorded})",
                    )
                # The earlier attempt's curve up to the checkpoint, then the retry's own
                # reports from epoch + 1: the pruner compares one curve.
                for step, value in sorted(source.intermediate_values.items()):
                    if step <= epoch and math.isfinite(value):
                        core.storage.set_trial_intermediate_value(trial_id, step, value)
                        copied += 1
                # ... and its per-epoch records, so the retry's history is one run too.
                records = self.history.copy_epochs(source_id, trial_id, row.study_id, epoch)
                core.storage.set_trial_user_attr(
                    trial_id, "resumed_from", {"trial": from_trial_number, "epoch": epoch}
                )
                log.info(
                    "trial %d resumed from trial %d at epoch %d (%d epoch records carried)",
                    row.trial_number,
                    from_trial_number,
                    epoch,
                    records,
                    extra=_fields(row, "trial_resumed"),
                )
        except UpdateFinishedTrialError as error:
            raise finished_meanwhile(core, row, error) from error
        finally:
            core.forget_running(trial_id)  # the next report re-reads the copied values
        return ResumedAnswer(
            trial_id=trial_id, resumed=epoch is not None, intermediate_values=copied
        )


def resume_source(core: StudyCore, study_id: int, trial: FrozenTrial) -> ResumeFrom | None:
    """The latest checkpoint an earlier attempt of ``trial`` recorded, or None."""
    for number in reversed(trial.system_attrs.get("retry_history") or []):
        try:
            earlier_id = core.cache.get_trial_id_from_study_id_trial_number(study_id, number)
        except KeyError:
            continue
        meta = core.cache.get_trial(earlier_id).system_attrs.get(ATTRS["checkpoint"])
        if meta:
            return ResumeFrom(
                trial_id=earlier_id,
                trial_number=number,
                epoch=meta["epoch"],
                bytes=meta["bytes"],
                sha256=meta["sha256"],
            )
    return None


# --- retention ------------------------------------------------------------------------------


def lineage_ended(core: StudyCore, loaded: LoadedStudy, trial: FrozenTrial) -> None:
    """Delete the checkpoints of ``trial`` and of every earlier attempt it retried: nothing
    will resume from them. Never raises (a failed delete is logged and left behind)."""
    try:
        _end_lineage(core, loaded, trial)
    except Exception:  # retention must never fail the trial's own transition
        log.exception("trial %d: could not delete its checkpoints", trial.number)


def _end_lineage(core: StudyCore, loaded: LoadedStudy, trial: FrozenTrial) -> None:
    study_id = loaded.study._study_id
    ids = [trial._trial_id]
    for number in trial.system_attrs.get("retry_history") or []:
        try:
            ids.append(core.cache.get_trial_id_from_study_id_trial_number(study_id, number))
        except KeyError:
            continue
    for trial_id in ids:
        _remove(core, artifact_id_for(study_id, trial_id, "checkpoint"))


def after_complete(core: StudyCore, loaded: LoadedStudy, trial_id: int) -> None:
    """Retention once ``trial_id`` completed: its line's checkpoints go, and of the study's
    completed trials with a best model only the best ``best_models_kept`` keep it (ranked by
    the first objective). At most two best models are deleted per completion — the one this
    trial pushed out of the top, or its own — so the cost does not grow with the study.
    Never raises."""
    try:
        _retain_best_models(core, loaded, trial_id)
    except Exception:  # retention must never fail the completion itself
        log.exception("trial id %d: retention of best models failed", trial_id)


def _retain_best_models(core: StudyCore, loaded: LoadedStudy, trial_id: int) -> None:
    study_id = loaded.study._study_id
    trials = core.cache.get_all_trials(study_id, deepcopy=False, states=(TrialState.COMPLETE,))
    by_id = {t._trial_id: t for t in trials}
    finished = by_id.get(trial_id)
    if finished is not None:
        _end_lineage(core, loaded, finished)
    keep = core.settings.best_models_kept
    sign = -1.0 if loaded.study.directions[0] == StudyDirection.MAXIMIZE else 1.0
    ranked = sorted(
        (t for t in trials if t.values and ATTRS["best_model"] in t.system_attrs),
        key=lambda t: (sign * t.values[0], t.number),
    )
    ranks = {t._trial_id: i for i, t in enumerate(ranked)}
    dropped: list[FrozenTrial] = ranked[keep : keep + 1]
    if finished is not None and ranks.get(trial_id, -1) >= keep:
        dropped.append(finished)
    for t in dropped:
        _remove(core, artifact_id_for(study_id, t._trial_id, "best_model"))


def _remove(core: StudyCore, artifact_id: str) -> None:
    try:
        core.artifacts.remove(artifact_id)
    except ArtifactNotFound:
        pass  # never stored, or already deleted
    except Exception:  # a bucket outage must not fail the trial's completion
        log.exception("could not delete artifact %s", artifact_id)


def _fields(row: LeaseRow, event: str) -> dict[str, object]:
    return trial_fields(
        event,
        study_id=row.study_id,
        trial_id=row.trial_id,
        trial_number=row.trial_number,
        worker_id=row.worker_id,
    )

"""Several trials trained at once as stacked models: ``train_population(members, ...)``.

The loop of ``train()`` for K members: setup, then rounds; in each round every group (members
that can share a step, ``population_stack.group_key``) runs one epoch of all its members — for
each minibatch: schedules → fused forward → per-member backward, clip, step — then validates,
reports and selects per member with ``train()``'s own functions (``validate``,
``vae_epoch_values``, ``final_metrics``). In fp32 each member's numbers equal those of
``train()`` on its config alone (``tests/trainers/test_population.py`` states the tolerance).

Per member, exactly as alone: the initial weights (``torch.manual_seed(seed)`` before
``build_vae``), its own ``torch.Generator`` for data order, binarization and posterior noise, its
own step counter and epochs, LR schedule (batch-scaled), β(t), free bits, optimizer, weight decay
and clipping. A member leaves the stack when it finishes, when ``on_epoch`` says ``"stop"``
(pruned), when ``should_leave`` says so (checked before every step: a cancelled study or a lost
lease leaves mid-epoch), or when its loss goes NaN/Inf (it fails alone, the others go on). The
stack is then compacted, and at the end of every group epoch free slots are offered to
``refill``, whose new members start at their own epoch 1 in the next round.

Checkpoints (issue 14), as ``train()``'s: each member's ``EpochMetrics.checkpoint`` captures the
member's state (``trainers.checkpoints.capture``, the same ``TrainState`` ``train()`` captures,
so either kind of worker can resume it), and with ``resume`` a member starts from a
checkpoint's epoch instead of its epoch 1 (``trainers.checkpoints.restore``). A member's
``TrainResult`` carries its ``best_state`` for the kept best model.

Units and metric names are ``train()``'s. ``samples_per_sec`` is the member's own samples over
the fused epoch's wall time (the population's total is the sum over members).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch

from trainers.checkpoints import TrainState, capture, restore
from trainers.config import TrainConfig
from trainers.data import Dataset
from trainers.errors import CheckpointError, ConfigError, NonFiniteLossError, TrainerError
from trainers.models import VAE, build_vae
from trainers.population_stack import (
    GroupKey,
    MemberStack,
    group_key,
    stacked_vae_step,
    unfusable_reason,
)
from trainers.schedules import (
    KLSchedule,
    LRSchedule,
    kl_beta,
    kl_schedule_from_config,
    lr_schedule_from_config,
)
from trainers.train import (
    VAE_CHECKS,
    VAE_STEP_STATS,
    Decision,
    EpochMetrics,
    TrainResult,
    amp_context,
    build_optimizer,
    final_metrics,
    first_nonfinite,
    load_training_data,
    parse_config,
    resolve_device,
    set_schedule,
    snapshot,
    vae_epoch_values,
    validate,
)

MemberKey = Hashable
#: ``on_epoch(key, metrics)``: a member's epoch; ``"stop"`` ends that member (pruned/stopped).
PopulationOnEpoch = Callable[[MemberKey, EpochMetrics], Decision]
#: ``on_epochs([(key, metrics), ...])``: a group epoch's members at once (one batched report);
#: the decision per key (a key left out continues).
PopulationOnEpochs = Callable[[list[tuple[MemberKey, EpochMetrics]]], Mapping[MemberKey, Decision]]
NewMember = tuple[MemberKey, TrainConfig | Mapping[str, Any]]
#: ``refill()``: a new member ``(key, config)`` for a free slot, or None when there is none.
Refill = Callable[[], NewMember | None]
#: ``refill_many(free)``: up to ``free`` new members at once (one batched lease); [] for none.
RefillMany = Callable[[int], list[NewMember]]
#: What a member ends with: its result, or the error that ended it alone.
Outcome = TrainResult | TrainerError
GRAD_NORM_ROW = VAE_STEP_STATS.index("grad_norm")


@dataclass(frozen=True)
class Resume:
    """How members resume from checkpoints (issue 14). ``state_of(key)``: the checkpoint a new
    member resumes from, or None (a fresh start); ``started(key, epoch, reason)``: it resumed
    at ``epoch``, or (``epoch`` None) the checkpoint did not fit its run, for ``reason``, and
    it starts fresh. Both are called as the member joins, before its first epoch."""

    state_of: Callable[[MemberKey], TrainState | None]
    started: Callable[[MemberKey, int | None, str | None], None]


@dataclass
class _Member:
    """One trial in the population: its config, model, optimizer, schedules and history."""

    key: MemberKey
    cfg: TrainConfig
    vae: VAE
    optimizer: torch.optim.Optimizer
    ksched: KLSchedule
    lsched: LRSchedule
    gen: torch.Generator
    step: int = 0  # 0-based global optimizer step, as in train()
    history: list[EpochMetrics] = field(default_factory=list)
    best: tuple[float, int, float] = (math.inf, 0, 0.0)  # val −ELBO, epoch, active units
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    perm: torch.Tensor | None = None
    beta: float = 0.0
    lr: float = 0.0

    @property
    def epoch(self) -> int:
        return len(self.history)


@dataclass
class _Group:
    """Members that share a step, on one dataset and device."""

    key: GroupKey
    data: Dataset
    device: torch.device
    batch_size: int
    steps_per_epoch: int
    autocast: Callable[[], AbstractContextManager[Any]]
    members: list[_Member] = field(default_factory=list)
    stack: MemberStack | None = None

    def restack(self) -> None:
        self.stack = MemberStack([m.vae for m in self.members]) if self.members else None


def train_population(
    members: Iterable[tuple[MemberKey, TrainConfig | Mapping[str, Any]]],
    on_epoch: PopulationOnEpoch | None = None,
    *,
    capacity: int | None = None,
    refill: Refill | None = None,
    should_leave: Callable[[MemberKey], bool] | None = None,
    on_done: Callable[[MemberKey, Outcome], None] | None = None,
    on_epochs: PopulationOnEpochs | None = None,
    refill_many: RefillMany | None = None,
    patience: int | None = None,
    resume: Resume | None = None,
) -> dict[MemberKey, Outcome]:
    """Train every member (and those ``refill`` adds, up to ``capacity`` at a time) fused.

    ``on_epochs`` and ``refill_many`` are the batched forms of ``on_epoch`` and ``refill``: all
    members of a group epoch reported in one call, all free slots offered in one call. Give
    one form of each, not both.

    ``patience`` (epochs), as ``train()``'s: a member whose validation −ELBO has not improved on
    its best for that many epochs ends alone (``plateaued=True``, still evaluated on the test
    set); the others go on.

    ``resume``: members that continue from a checkpoint (``Resume``); the rest start fresh.

    Returns each member's outcome by key, and hands it to ``on_done`` as soon as the member
    ends: a ``TrainResult`` as ``train()`` returns it (``stopped_early`` when ``on_epoch`` said
    ``"stop"`` or ``should_leave`` fired; then no test-set evaluation), or the ``ConfigError``
    / ``NonFiniteLossError`` that ended it. A config ``train()`` accepts but the population
    cannot fuse (``unfusable_reason``) ends with a ``ConfigError`` naming ``model``/``compile``:
    the caller trains it alone.
    """
    if patience is not None and patience < 1:
        raise ConfigError("patience", f"must be at least 1 epoch (got {patience})")
    if on_epoch is not None and on_epochs is not None:
        raise ValueError("give `on_epoch` or `on_epochs`, not both")
    if refill is not None and refill_many is not None:
        raise ValueError("give `refill` or `refill_many`, not both")
    if on_epochs is None and on_epoch is not None:
        one_by_one = on_epoch
        on_epochs = lambda epochs: {key: one_by_one(key, m) for key, m in epochs}  # noqa: E731
    if refill_many is None and refill is not None:
        one = refill
        refill_many = lambda free: [new] if (new := one()) is not None else []  # noqa: E731
    population = _Population(on_epochs, should_leave, on_done, patience, resume)
    for key, config in members:
        population.add(key, config)
    limit = capacity if capacity is not None else max(len(population), 1)
    while True:
        for group in list(population.groups.values()):
            if group.members:
                population.run_epoch(group)
            while refill_many is not None and len(population) < limit:
                new_members = refill_many(limit - len(population))
                if not new_members:
                    break
                for new in new_members:
                    population.add(*new)
        population.groups = {k: g for k, g in population.groups.items() if g.members}
        if not population.groups:
            return population.outcomes


class _Population:
    def __init__(
        self,
        on_epochs: PopulationOnEpochs | None,
        should_leave: Callable[[MemberKey], bool] | None,
        on_done: Callable[[MemberKey, Outcome], None] | None,
        patience: int | None,
        resume: Resume | None = None,
    ) -> None:
        self.on_epochs = on_epochs
        self.resume = resume
        self.patience = patience
        self.should_leave = should_leave
        self.on_done = on_done
        self.groups: dict[GroupKey, _Group] = {}
        self.outcomes: dict[MemberKey, Outcome] = {}

    def __len__(self) -> int:
        return sum(len(g.members) for g in self.groups.values())

    def _end(self, member: _Member, outcome: Outcome) -> None:
        self.outcomes[member.key] = outcome
        if self.on_done is not None:
            self.on_done(member.key, outcome)

    # --- setup: train()'s steps 1–3, per member -----------------------------------------------

    def add(self, key: MemberKey, config: TrainConfig | Mapping[str, Any]) -> None:
        """Set a member up as ``train()`` would; a bad config ends that member alone."""
        try:
            cfg = parse_config(config)
            reason = unfusable_reason(cfg)
            if reason is not None:
                raise ConfigError("compile" if cfg.compile else "model", reason)
            group = self._group(cfg)
            member = self._build(key, cfg, group)
        except ConfigError as error:
            self.outcomes[key] = error
            if self.on_done is not None:
                self.on_done(key, error)
            return
        state = self.resume.state_of(key) if self.resume is not None else None
        if state is not None and self.resume is not None:
            try:  # before restacking: the member's own tensors take the checkpoint
                self._restore(member, state, group)
                self.resume.started(key, state.epoch, None)
            except CheckpointError as error:  # it does not fit: a fresh start, said so
                member = self._build(key, cfg, group)
                self.resume.started(key, None, str(error))
        group.members.append(member)
        group.restack()

    @staticmethod
    def _build(key: MemberKey, cfg: TrainConfig, group: _Group) -> _Member:
        torch.manual_seed(cfg.seed)  # model initialisation, as in train()
        gen = torch.Generator(device=group.device)
        gen.manual_seed(cfg.seed)
        vae = build_vae(cfg, group.data.image_shape).to(group.device)
        member = _Member(
            key=key, cfg=cfg, vae=vae, optimizer=build_optimizer(vae, cfg, group.device),
            ksched=kl_schedule_from_config(cfg, group.steps_per_epoch),
            lsched=lr_schedule_from_config(cfg, group.steps_per_epoch), gen=gen,
        )  # fmt: skip
        member.best_state = snapshot(vae)
        return member

    @staticmethod
    def _restore(member: _Member, state: TrainState, group: _Group) -> None:
        """``state`` into a freshly built member, as ``train(resume=state)`` does. Raises
        ``CheckpointError`` when it does not fit (the member is then left half-loaded)."""
        member.best_state = restore(
            state, member.vae, [member.optimizer], member.gen, group.device, member.cfg.epochs
        )
        member.step, member.best = state.step, state.best
        member.history = [
            EpochMetrics(int(e["epoch"]), dict(e["values"]), list(e["kl_per_dim"]))
            for e in state.history
        ]

    def _group(self, cfg: TrainConfig) -> _Group:
        key = group_key(cfg)
        if key in self.groups:
            return self.groups[key]
        device = resolve_device(cfg.device)
        data = load_training_data(cfg, device)
        n_train = data.train.shape[0]
        group = _Group(
            key=key, data=data, device=device, batch_size=cfg.batch_size,
            steps_per_epoch=n_train // cfg.batch_size, autocast=amp_context(cfg, device),
        )  # fmt: skip
        self.groups[key] = group
        return group

    # --- one epoch of every member of a group ---------------------------------------------------

    def run_epoch(self, group: _Group) -> None:
        t_epoch = time.perf_counter()
        device, bs, data = group.device, group.batch_size, group.data
        members = group.members
        n_train = data.train.shape[0]
        for m in members:
            m.perm = torch.randperm(n_train, device=device, generator=m.gen)
        k = len(members)
        sums = torch.zeros(len(VAE_STEP_STATS), k, device=device)
        maxima = torch.zeros(1, k, device=device)
        first_bad = torch.full((len(VAE_CHECKS), k), -1, dtype=torch.long, device=device)
        start_steps = torch.tensor([m.step for m in members], device=device)
        free_bits = torch.tensor([m.cfg.free_bits for m in members], device=device)
        for i in range(group.steps_per_epoch):
            leaving = self._leaving(members)
            if leaving:
                keep = [j for j in range(len(members)) if j not in leaving]
                for j in leaving:
                    self._end(members[j], _stopped(members[j]))
                members = group.members = [members[j] for j in keep]
                if not members:
                    return
                group.restack()
                index = torch.tensor(keep, device=device)
                sums, maxima, first_bad = (t[:, index] for t in (sums, maxima, first_bad))
                start_steps, free_bits = start_steps[index], free_bits[index]
            stack = group.stack
            assert stack is not None  # members is not empty
            # 1) minibatches: each member's own permutation (and binarization)
            idx = torch.stack(
                [m.perm[i * bs : (i + 1) * bs] for m in members if m.perm is not None]
            )
            x = data.train[idx]
            if any(m.cfg.binarize for m in members):
                x = torch.stack(
                    [torch.bernoulli(x[j], generator=m.gen) if m.cfg.binarize else x[j]
                     for j, m in enumerate(members)]
                )  # fmt: skip
            # 2) schedules: pure functions of each member's own step
            for m in members:
                m.beta = kl_beta(m.step, m.ksched)
                m.lr = set_schedule(m.optimizer, m.step, m.lsched)
            beta = torch.tensor([m.beta for m in members], device=device)
            # 3) forward, backward, per-member clip and step
            latent = members[0].cfg.latent_dim
            eps = torch.stack(
                [torch.randn(bs, latent, device=device, generator=m.gen) for m in members]
            )
            stats, checks = stacked_vae_step(
                stack, [m.cfg for m in members], [m.optimizer for m in members], x, eps, beta,
                free_bits, group.autocast,
            )  # fmt: skip
            # 4) accumulate on the device, as train() does
            sums += stats
            maxima = torch.maximum(maxima, stats[GRAD_NORM_ROW : GRAD_NORM_ROW + 1])
            first_bad = torch.where(
                (first_bad < 0) & ~torch.isfinite(checks), start_steps + i, first_bad
            )
            for m in members:
                m.step += 1
        self._end_epoch(group, sums, maxima, first_bad, t_epoch)

    def _leaving(self, members: list[_Member]) -> list[int]:
        if self.should_leave is None:
            return []
        return [j for j, m in enumerate(members) if self.should_leave(m.key)]

    def _end_epoch(
        self,
        group: _Group,
        sums: torch.Tensor,
        maxima: torch.Tensor,
        first_bad: torch.Tensor,
        t_epoch: float,
    ) -> None:
        """One host read for the group, then validation, reporting and selection per member."""
        host = torch.cat([sums.double(), maxima.double(), first_bad.double()]).T.tolist()
        train_seconds = time.perf_counter() - t_epoch
        n_sums, steps = len(VAE_STEP_STATS), group.steps_per_epoch
        rate = steps * group.batch_size / max(train_seconds, 1e-9)
        reported: list[_Member] = []
        for m, column in zip(group.members, host, strict=True):
            epoch = m.epoch + 1
            try:
                nonfinite = first_nonfinite(column[n_sums + 1 :], VAE_CHECKS)
                if nonfinite is not None:
                    raise NonFiniteLossError(epoch, *nonfinite)
                means = {n: total / steps for n, total in zip(VAE_STEP_STATS, column, strict=False)}
                values = vae_epoch_values(means, {"grad_norm": column[n_sums]}, m.beta, m.lr, rate)
                m.vae.eval()
                val, kl_per_dim = validate(
                    m.vae, group.data.val, m.cfg, group.device, epoch, m.step - 1
                )
                m.vae.train()
            except NonFiniteLossError as error:
                self._end(m, error)  # fails alone; the others go on
                continue
            values |= val
            values["epoch_seconds"] = time.perf_counter() - t_epoch
            metrics = EpochMetrics(epoch, values, kl_per_dim, checkpoint=_state_now(m))
            m.history.append(metrics)
            if val["val_neg_elbo"] < m.best[0]:
                m.best = (val["val_neg_elbo"], epoch, val["active_units"])
                m.best_state = snapshot(m.vae)
            reported.append(m)
        # One call for the group's epoch (a population worker sends one batched report).
        decisions: Mapping[MemberKey, Decision] = {}
        if self.on_epochs is not None and reported:
            decisions = self.on_epochs([(m.key, m.history[-1]) for m in reported])
        staying: list[_Member] = []
        for m in reported:
            if decisions.get(m.key) == "stop":
                self._end(m, _stopped(m))
            elif self.patience is not None and m.epoch - m.best[1] >= self.patience:
                self._end(m, _finished(m, group, plateaued=True))  # as train(): alone
            elif m.epoch >= m.cfg.epochs:
                self._end(m, _finished(m, group))
            else:
                staying.append(m)
        if len(staying) != len(group.members):
            group.members = staying
            group.restack()


def _state_now(m: _Member) -> Callable[[], TrainState]:
    """``m``'s checkpoint, as ``train()``'s ``state_now``: call it inside ``on_epochs``,
    before the next step moves the weights (and a restack re-points them)."""
    return lambda: capture(m.epoch, m.step, m.vae, [m.optimizer], m.gen, m.best, m.best_state,
                           m.history)  # fmt: skip


def _stopped(m: _Member) -> TrainResult:
    """A member stopped early: its history so far, no test-set evaluation (as ``train()``)."""
    metrics: dict[str, float] = {}
    if m.history:
        metrics = final_metrics(
            m.vae, m.best_state, torch.empty(0), m.cfg, torch.device("cpu"), m.history, m.best,
            test=False,
        )  # fmt: skip
    return TrainResult(
        metrics=metrics, history=m.history, epochs_run=m.epoch, best_epoch=m.best[1],
        stopped_early=True, best_state=m.best_state,
    )  # fmt: skip


def _finished(m: _Member, group: _Group, plateaued: bool = False) -> TrainResult:
    """A member that ran all its epochs (or ran out of ``patience``, ``plateaued``): the
    selected model on the test set (as ``train()``).

    Its parameters view the stack, which is compacted right after, so loading the best state
    into them first touches no other member's weights (the rows are only this member's).
    """
    metrics = final_metrics(
        m.vae, m.best_state, group.data.test, m.cfg, group.device, m.history, m.best, test=True
    )
    return TrainResult(
        metrics=metrics, history=m.history, epochs_run=m.epoch, best_epoch=m.best[1],
        stopped_early=False, plateaued=plateaued, best_state=m.best_state,
    )  # fmt: skip


__all__ = [
    "MemberKey",
    "NewMember",
    "Outcome",
    "PopulationOnEpoch",
    "PopulationOnEpochs",
    "Refill",
    "RefillMany",
    "Resume",
    "train_population",
]

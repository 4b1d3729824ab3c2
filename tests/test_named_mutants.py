"""Named mutants, each killed by its named test: the cheap part of mutation testing CI runs.

``scripts/mutation`` (mutmut, tens of minutes) is not part of ``.ci/run``. This keeps the key
tests honest in the normal suite: each mutant below — the three hand-made ones of issue 17 and a
few that mutmut found surviving or that would silently ruin results — is applied by text
substitution to a copy of its package in a temporary folder, and its killing test is run in a
subprocess that imports that copy first. The test must fail there (and the copy must really be
the one imported: the subprocess checks the mutated text is in the module it loaded).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    path: str  # the module's file, relative to the repository root
    before: str  # text that occurs exactly once in it
    after: str  # what the mutant has instead
    killer: str  # the test node id that must fail on it


MUTANTS: dict[str, Mutant] = {
    # issue 17, hand-made: the optimizer ignores the LR schedule
    "set_schedule_drops_the_lr": Mutant(
        "trainers/optim.py",
        '        group["lr"] = lr\n',
        "",
        "tests/trainers/test_optimizer_update.py::"
        "test_the_fused_step_moves_each_member_by_its_own_scheduled_lr",
    ),
    # issue 17, hand-made: gradient clipping measures the norm but never clips
    "clip_gradients_never_clips": Mutant(
        "trainers/optim.py",
        "norm = torch.nn.utils.clip_grad_norm_(params, max_norm)",
        "norm = torch.nn.utils.get_total_norm(grads)",
        "tests/trainers/test_optimizer_update.py::"
        "test_train_s_step_clips_the_gradient_the_optimizer_sees",
    ),
    # issue 17, hand-made: every conditional parameter is always sampled
    "search_space_active_always_true": Mutant(
        "hpo_service/search_space.py",
        "    if param.parent is None:\n        return True\n",
        "    if True:\n        return True\n",
        "tests/service/test_search_space_conditions.py::"
        "test_children_are_sampled_exactly_when_their_parent_uses_them",
    ),
    # β1 cycled with the cosine policy is right at a cycle's ends only (mutmut's survivor)
    "cycled_beta1_ignores_the_cosine_shape": Mutant(
        "trainers/schedules.py",
        "return s.beta1_max - swing * _cosine_height(step, s)",
        "return s.beta1_max - swing / _cosine_height(step, s)",
        "tests/trainers/test_schedules.py::test_cycled_beta1_inside_a_cosine_cycle_mirrors_the_lr",
    ),
    # a log-scaled range starting at 0 accepted (Optuna would raise at the first sample)
    "search_space_log_range_from_zero": Mutant(
        "hpo_service/search_space.py",
        "if param.log and param.low <= 0:",
        "if param.log and param.low < 0:",
        "tests/service/test_search_space_rules.py::"
        "test_a_bad_range_is_refused_naming_the_field_and_the_reason",
    ),
    # the KL's μ² term with the wrong sign (Kingma & Welling 2014, App. B)
    "kl_mu_squared_sign": Mutant(
        "trainers/losses.py",
        "0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)",
        "0.5 * (-mu.pow(2) + logvar.exp() - 1.0 - logvar)",
        "tests/trainers/test_vae_losses.py::test_analytic_kl_matches_monte_carlo_estimate",
    ),
    # the percentile pruner built at the median whatever the spec says
    "percentile_pruner_ignores_its_percentile": Mutant(
        "hpo_service/optimizers.py",
        "            spec.percentile,\n",
        "            50.0,\n",
        "tests/service/test_sampler_pruner_matrix.py::"
        "test_the_pruner_in_use_prunes_a_bad_curve_and_keeps_a_good_one[percentile]",
    ),
    # retries of a reaped trial never run out
    "retries_unbounded": Mutant(
        "hpo_service/studies/_reaping.py",
        "    if len(history) > loaded.spec.max_retries:\n",
        "    if False:\n",
        "tests/service/test_api.py::test_retries_are_bounded[sqlite]",
    ),
    # the reaper's mark of expired leases loses its compare-and-set: a beat that landed after
    # the read no longer saves the lease (``xǁReaperǁreap__mutmut_45`` of the service sample)
    "reaper_mark_ignores_a_late_beat": Mutant(
        "hpo_service/studies/_reaping.py",
        ".where(LeaseRow.trial_id.in_([lease.trial_id for lease in found]), expired)",
        ".where(LeaseRow.trial_id.in_([lease.trial_id for lease in found]))",
        "tests/service/test_protocol_edges.py::"
        "test_a_beat_that_lands_between_the_reaper_s_read_and_its_mark_keeps_the_lease[sqlite]",
    ),
}

#: Run first in the subprocess: fail loudly (exit 3, not 1) unless the mutated copy is imported.
_CHECK = """
import importlib, sys
module = importlib.import_module({module!r})
if {after!r} not in open(module.__file__).read() or not module.__file__.startswith({where!r}):
    sys.exit(3)
import pytest
sys.exit(pytest.main({args!r}))
"""


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_the_named_mutant_is_killed_by_its_test(name: str, tmp_path: Path) -> None:
    mutant = MUTANTS[name]
    package = mutant.path.split("/")[0]
    copy = tmp_path / package
    shutil.copytree(ROOT / package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / mutant.path
    source = target.read_text()
    assert source.count(mutant.before) == 1, f"{mutant.path} no longer has {mutant.before!r}"
    target.write_text(source.replace(mutant.before, mutant.after))

    module = mutant.path.removesuffix(".py").replace("/", ".")
    args = [
        str(ROOT / mutant.killer.split("::")[0]) + "::" + mutant.killer.split("::", 1)[1],
        "-q", "-x", "-p", "pytest_timeout", "-p", "no:cacheprovider", f"--rootdir={ROOT}",
        "-c", str(ROOT / "pyproject.toml"),
    ]  # fmt: skip
    script = _CHECK.format(module=module, after=mutant.after, where=str(tmp_path), args=args)
    # Only the plugin the config needs (its --timeout): loading every installed one (xdist,
    # schemathesis, hypothesis) costs a second or two of CPU per subprocess.
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    output = result.stdout[-3000:] + result.stderr[-2000:]
    assert result.returncode != 3, f"the mutated copy was not the module imported:\n{output}"
    # pytest's 1 is "tests failed"; collection or usage errors (2-5) would not be a kill.
    assert result.returncode == 1, f"{name} survived {mutant.killer}:\n{output}"
    assert "1 failed" in result.stdout, output

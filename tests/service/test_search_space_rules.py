"""The search space's rules, checked without a server (issue 17: mutation testing of
``hpo_service/search_space.py``): the default ranges README.md documents, how overrides, fixed
and dropped parameters shape the space, the refusals (each naming its field and reason), the
``max_lr`` reparameterisation, and the distributions Optuna is given.

Pure: specs are built in memory and Optuna studies are in-memory; no database decides these.
"""

from __future__ import annotations

import math
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from hpo_service.errors import InvalidSpec
from hpo_service.schemas import StudySpec
from hpo_service.search_space import (
    Param,
    build_space,
    check_spec,
    default_space,
    distributions,
    is_active,
    resolve_config,
    suggest,
)


def _spec(**fields: Any) -> StudySpec:
    return StudySpec(name="rules", **fields)


def _refusal(**fields: Any) -> tuple[str, str]:
    with pytest.raises(InvalidSpec) as caught:
        check_spec(_spec(**fields))
    return caught.value.field, caught.value.reason


def _ranges(space: list[Param]) -> dict[str, tuple[Any, ...]]:
    return {
        p.name: (p.choices,) if p.kind == "categorical" else (p.kind, p.low, p.high, p.log, p.step)
        for p in space
    }


def test_the_default_space_is_readme_s_table_scaled_to_the_run_length() -> None:
    """README.md, "The default VAE search space": ranges, log scales, and the lengths that
    follow the epochs (warm-ups up to half or a quarter of the run, at most 8 KL cycles)."""
    ranges = _ranges(default_space(12))
    assert ranges == {
        "kl_schedule": (("constant", "linear", "cosine", "cyclical"),),
        "kl_warmup_epochs": ("float", 0.0, 6.0, False, None),
        "kl_cycles": ("int", 1, 8, False, None),
        "kl_ratio": ("float", 0.25, 1.0, False, None),
        "lr_policy": (("constant", "triangular", "triangular2", "cosine", "one_cycle"),),
        "lr_half_cycle_epochs": ("float", 1.0, 6.0, False, None),
        "base_lr": ("float", 3e-4, 1e-2, True, None),
        "max_lr_factor": ("float", 2.0, 10.0, True, None),
        "lr_warmup_epochs": ("float", 0.0, 3.0, False, None),
        "optimizer": (("adamw", "radam"),),
        "weight_decay": ("float", 1e-6, 1e-1, True, None),
        "grad_clip_norm": ("float", 1.0, 100.0, True, None),
        "batch_size": ((32, 64, 128),),
        "free_bits": ("float", 0.0, 1.0, False, None),
    }
    # Parents come before their children (define-by-run samples in this order).
    names = list(ranges)
    for param in default_space(12):
        if param.parent is not None:
            assert names.index(param.parent) < names.index(param.name), param.name


@pytest.mark.parametrize(
    ("epochs", "warmup_high", "cycles_high", "half_cycle_low"),
    [(1, 0.5, 1, 0.25), (3, 1.5, 3, 0.75), (40, 20.0, 8, 1.0)],
)
def test_short_runs_shrink_the_warm_ups_and_cycles_to_fit(
    epochs: int, warmup_high: float, cycles_high: int, half_cycle_low: float
) -> None:
    params = {p.name: p for p in default_space(epochs)}
    assert params["kl_warmup_epochs"].high == warmup_high  # max(epochs/2, 0.5)
    assert params["lr_half_cycle_epochs"].high == warmup_high
    assert params["kl_cycles"].high == cycles_high  # max(1, min(8, epochs))
    assert params["lr_half_cycle_epochs"].low == half_cycle_low  # min(1, epochs/4)
    assert params["lr_warmup_epochs"].high == epochs / 4
    # Every default range of a short run is one the trainer accepts, at both ends.
    check_spec(_spec(epochs=epochs))


def test_conditions_name_the_parent_values_that_use_each_child() -> None:
    when = {p.name: (p.parent, set(p.when)) for p in default_space(10) if p.parent}
    assert when == {
        "kl_warmup_epochs": ("kl_schedule", {"linear", "cosine", "sigmoid"}),
        "kl_cycles": ("kl_schedule", {"cyclical"}),
        "kl_ratio": ("kl_schedule", {"cyclical"}),
        "lr_half_cycle_epochs": ("lr_policy", {"triangular", "triangular2", "exp_range"}),
        "max_lr_factor": (
            "lr_policy",
            {"triangular", "triangular2", "exp_range", "cosine", "one_cycle"},
        ),
    }


def test_an_override_replaces_only_the_keys_it_sets() -> None:
    space = build_space(
        _spec(
            search_space={
                "base_lr": {"high": 3e-3},  # keeps low and log
                "weight_decay": {"low": 0.0, "high": 0.1, "log": False, "step": 0.05},
                "optimizer": {"choices": ["adam"]},
                "free_bits": {"type": "categorical", "choices": [0.0, 0.5]},
            }
        )
    )
    ranges = _ranges(space)
    assert ranges["base_lr"] == ("float", 3e-4, 3e-3, True, None)
    assert ranges["weight_decay"] == ("float", 0.0, 0.1, False, 0.05)
    assert ranges["optimizer"] == (("adam",),)
    assert ranges["free_bits"] == ((0.0, 0.5),)
    free_bits = next(p for p in space if p.name == "free_bits")
    assert (free_bits.low, free_bits.high, free_bits.log, free_bits.step) == (
        None,
        None,
        False,
        None,
    )


def test_a_config_field_added_to_the_space_takes_the_field_s_kind() -> None:
    space = build_space(
        _spec(
            search_space={
                "latent_dim": {"low": 4, "high": 16},  # int field
                "gaussian_std": {"low": 0.05, "high": 0.5},  # float field
                "decoder_lr": {"low": 1e-4, "high": 1e-2, "log": True},  # float | None field
                "activation": {"choices": ["relu", "gelu"]},  # a Literal: categorical
                "likelihood": {"type": "categorical", "choices": ["bernoulli"]},
            }
        )
    )
    ranges = _ranges(space)
    assert ranges["latent_dim"][0] == "int"
    assert ranges["gaussian_std"] == ("float", 0.05, 0.5, False, None)
    assert ranges["decoder_lr"] == ("float", 1e-4, 1e-2, True, None)
    assert ranges["activation"] == (("relu", "gelu"),)
    assert ranges["likelihood"] == (("bernoulli",),)
    # Added parameters are searched unconditionally, after the default ones.
    assert [p.name for p in space][-5:] == [
        "latent_dim", "gaussian_std", "decoder_lr", "activation", "likelihood",
    ]  # fmt: skip
    assert all(p.parent is None for p in space[-5:])


def test_a_derived_parameter_re_added_after_a_drop_is_a_float() -> None:
    space = build_space(
        _spec(drop=["max_lr_factor"], search_space={"max_lr_factor": {"low": 2, "high": 4}})
    )
    (factor,) = [p for p in space if p.name == "max_lr_factor"]
    assert (factor.kind, factor.low, factor.high, factor.parent) == ("float", 2, 4, None)


def test_fixed_and_dropped_parameters_leave_the_search() -> None:
    space = build_space(_spec(fixed={"base_lr": 1e-3, "optimizer": "adamw"}, drop=["free_bits"]))
    names = {p.name for p in space}
    assert not {"base_lr", "optimizer", "free_bits"} & names
    assert {"weight_decay", "batch_size", "max_lr_factor"} <= names


@pytest.mark.parametrize(
    "fields",
    [{"fixed": {"max_lr": 0.05}}, {"search_space": {"max_lr": {"low": 0.01, "high": 0.1}}}],
)
def test_a_fixed_or_searched_max_lr_replaces_the_factor(fields: dict[str, Any]) -> None:
    names = [p.name for p in build_space(_spec(**fields))]
    assert "max_lr_factor" not in names
    assert ("max_lr" in names) is ("search_space" in fields)


def test_a_batch_size_range_becomes_the_powers_of_two_inside_it() -> None:
    space = build_space(
        _spec(drop=["batch_size"], search_space={"batch_size": {"low": 16, "high": 256}})
    )
    (batch,) = [p for p in space if p.name == "batch_size"]
    assert batch.kind == "categorical"
    assert batch.choices == (16, 32, 64, 128, 256)
    assert (batch.low, batch.high, batch.log, batch.step) == (None, None, False, None)
    typed = build_space(_spec(search_space={"batch_size": {"type": "int", "low": 8, "high": 8}}))
    assert next(p for p in typed if p.name == "batch_size").choices == (8,)


@pytest.mark.parametrize(
    ("fields", "field", "reason"),
    [
        (
            {"search_space": {"batch_size": {"choices": [32, 48, True]}}},
            "search_space.batch_size.choices",
            "batch sizes must be positive powers of two (got [48, True])",
        ),
        (
            {"search_space": {"batch_size": {"type": "int", "low": 24, "high": 64}}},
            "search_space.batch_size.low",
            "batch sizes must be positive powers of two (got 24)",
        ),
        (
            {"search_space": {"batch_size": {"type": "int", "low": 32, "high": 100}}},
            "search_space.batch_size.high",
            "batch sizes must be positive powers of two (got 100)",
        ),
        (
            {"search_space": {"batch_size": {"type": "int", "low": 0, "high": 64}}},
            "search_space.batch_size.low",
            "batch sizes must be positive powers of two (got 0)",
        ),
        (
            {"fixed": {"batch_size": 96}},
            "fixed.batch_size",
            "batch sizes must be positive powers of two (got 96)",
        ),
        (
            {"search_space": {"base_lr": {"low": 1e-2, "high": 1e-3}}},
            "search_space.base_lr",
            "`low` (0.01) is greater than `high` (0.001)",
        ),
        (
            {"search_space": {"weight_decay": {"low": 0.0}}},
            "search_space.weight_decay",
            "a log-scaled range needs `low` > 0 (got 0)",
        ),
        (
            {"search_space": {"grad_clip_norm": {"step": 1.0}}},
            "search_space.grad_clip_norm",
            "`step` cannot be combined with `log`",
        ),
        (
            {"search_space": {"max_lr_factor": {"low": 1.0}}},
            "search_space.max_lr_factor",
            "`low` must be greater than 1 (got 1)",
        ),
        (
            {"search_space": {"kl_cycles": {"low": 1, "high": 4.5}}},
            "search_space.kl_cycles",
            "an integer range needs integer `low` and `high`",
        ),
        (
            {"search_space": {"kl_cycles": {"low": 1.5}}},
            "search_space.kl_cycles",
            "an integer range needs integer `low` and `high`",
        ),
        (
            {"search_space": {"activation": {"type": "categorical"}}},
            "search_space.activation",
            "a categorical parameter needs `choices`",
        ),
        (  # a field of the config whose type is a set of names: categorical without saying so
            {"search_space": {"activation": {}}},
            "search_space.activation",
            "a categorical parameter needs `choices`",
        ),
        (
            {"search_space": {"latent_dim": {"low": 4}}},
            "search_space.latent_dim",
            "a range needs both `low` and `high`",
        ),
        (
            {"search_space": {"latent_dim": {"high": 4}}},
            "search_space.latent_dim",
            "a range needs both `low` and `high`",
        ),
    ],
)
def test_a_bad_range_is_refused_naming_the_field_and_the_reason(
    fields: dict[str, Any], field: str, reason: str
) -> None:
    assert _refusal(**fields) == (field, reason)


def test_a_log_range_starting_above_zero_and_an_equal_low_high_are_accepted() -> None:
    space = check_spec(
        _spec(search_space={"weight_decay": {"low": 1e-9}, "kl_ratio": {"low": 0.5, "high": 0.5}})
    )
    assert _ranges(space)["kl_ratio"] == ("float", 0.5, 0.5, False, None)
    assert _ranges(space)["weight_decay"][1] == 1e-9
    # an unlogged range may start at 0 or below (the trainer then names the bad value)
    check_spec(_spec(search_space={"free_bits": {"low": 0.0, "high": 0.0}}))


def test_a_categorical_batch_size_skips_the_range_checks() -> None:
    space = check_spec(_spec(search_space={"batch_size": {"choices": [1, 2]}}))
    assert _ranges(space)["batch_size"] == ((1, 2),)


def test_a_dropped_name_must_be_a_default_parameter() -> None:
    with pytest.raises(InvalidSpec) as caught:
        build_space(_spec().model_copy(update={"drop": ["latent_dim"]}))
    assert caught.value.field == "drop.latent_dim"
    assert caught.value.reason == "not a parameter of the default space"


def test_a_batch_larger_than_the_training_set_is_refused_naming_where_it_comes_from() -> None:
    # synthetic 100 examples: 80 train / 10 val / 10 test
    assert _refusal(dataset="synthetic", fixed={"synthetic_size": 100}) == (
        "search_space.batch_size",
        "batch sizes [128] exceed the 80 training examples of 'synthetic' (synthetic_size 100)",
    )
    assert _refusal(dataset="synthetic", fixed={"synthetic_size": 100, "batch_size": 128}) == (
        "fixed.batch_size",
        "batch sizes [128] exceed the 80 training examples of 'synthetic' (synthetic_size 100)",
    )
    # a searched size counts by its smallest value
    assert _refusal(
        dataset="synthetic", search_space={"synthetic_size": {"low": 100, "high": 4000}}
    )[0] == ("search_space.batch_size")
    # the default batch (128) is what a study without one trains
    assert _refusal(dataset="synthetic", fixed={"synthetic_size": 100}, drop=["batch_size"]) == (
        "fixed.batch_size",
        "batch sizes [128] exceed the 80 training examples of 'synthetic' (synthetic_size 100)",
    )
    # exactly the training set fits; a named dataset is counted as its standard split
    check_spec(_spec(dataset="synthetic", fixed={"synthetic_size": 160, "batch_size": 128}))
    check_spec(_spec(dataset="synthetic", search_space={"batch_size": {"choices": [64]}}))


def test_min_active_units_above_every_latent_size_is_refused() -> None:
    assert _refusal(fixed={"latent_dim": 4}, constraints={"min_active_units": 5}) == (
        "constraints.min_active_units",
        "5 active units cannot be reached with at most 4 latent dimensions",
    )
    assert _refusal(
        search_space={"latent_dim": {"low": 2, "high": 6}}, constraints={"min_active_units": 7}
    )[0] == ("constraints.min_active_units")
    # the searched range's top end, or the default latent size (16), can reach it
    check_spec(
        _spec(
            search_space={"latent_dim": {"low": 2, "high": 8}}, constraints={"min_active_units": 8}
        )
    )
    check_spec(_spec(constraints={"min_active_units": 16}))
    assert _refusal(constraints={"min_active_units": 17})[0] == "constraints.min_active_units"


def test_a_fixed_value_the_trainer_refuses_is_named_under_fixed() -> None:
    field, reason = _refusal(fixed={"gaussian_std": 0.0})
    assert field == "fixed.gaussian_std"
    assert reason == "Input should be greater than 0"  # pydantic's, without its prefix


def test_every_range_end_and_choice_is_probed_against_the_trainer() -> None:
    # kl_ratio's high end 2 is outside TrainConfig's (0, 1]: found although kl_ratio is sampled
    # only under the cyclical schedule (the probe sets its parent so that it applies).
    assert _refusal(search_space={"kl_ratio": {"high": 2.0}}) == (
        "search_space.kl_ratio",
        "value 2.0 is invalid: Input should be less than or equal to 1",
    )
    # a choice, not a range end
    field, reason = _refusal(search_space={"optimizer": {"choices": ["adamw", "lion"]}})
    assert field == "search_space.optimizer"
    assert reason.startswith("value 'lion' is invalid: ")
    # a fixed parent is not overridden by the probe: its children are never sampled, so a
    # child range the trainer would refuse does not matter
    check_spec(_spec(fixed={"kl_schedule": "constant"}, search_space={"kl_ratio": {"high": 2.0}}))


def test_a_bad_low_end_is_named_as_its_own_parameter() -> None:
    field, reason = _refusal(search_space={"kl_ratio": {"low": 0.0}})
    assert field == "search_space.kl_ratio"
    assert reason.startswith("value 0.0 is invalid: ")


def test_a_range_over_the_default_batch_sizes_replaces_them() -> None:
    # no `type`: the default is a set of choices, the range must not be dropped silently
    space = build_space(_spec(search_space={"batch_size": {"low": 16, "high": 256}}))
    assert next(p for p in space if p.name == "batch_size").choices == (16, 32, 64, 128, 256)
    field, reason = _refusal(search_space={"kl_schedule": {"low": 0, "high": 1}})
    assert field == "search_space.kl_schedule"
    assert "give `choices`" in reason


def test_resolve_config_turns_the_factor_into_max_lr() -> None:
    spec = _spec(epochs=10)
    config = resolve_config(spec, {"lr_policy": "one_cycle", "base_lr": 2e-3, "max_lr_factor": 4})
    assert config["max_lr"] == pytest.approx(8e-3)
    assert "max_lr_factor" not in config
    # without a sampled base_lr the config's default (1e-3) is the base
    fixed = _spec(epochs=10, drop=["base_lr"])
    assert resolve_config(fixed, {"max_lr_factor": 3.0})["max_lr"] == pytest.approx(3e-3)
    assert resolve_config(spec, {"base_lr": 2e-3})["max_lr"] is None
    # spec values are the base; sampled ones win over fixed ones nowhere (they are disjoint)
    assert resolve_config(_spec(epochs=7, fixed={"latent_dim": 5}), {})["latent_dim"] == 5
    assert resolve_config(spec, {})["epochs"] == 10


def test_resolve_config_names_the_bad_field() -> None:
    with pytest.raises(InvalidSpec) as caught:
        resolve_config(_spec(), {"kl_ratio": 2.0})
    assert caught.value.field == "kl_ratio"
    assert caught.value.reason == "Input should be less than or equal to 1"


@pytest.mark.parametrize(
    ("chosen", "fixed", "active"),
    [
        ({"kl_schedule": "cyclical"}, {}, True),
        ({"kl_schedule": "linear"}, {}, False),
        ({}, {"kl_schedule": "cyclical"}, True),
        ({"kl_schedule": "linear"}, {"kl_schedule": "cyclical"}, False),  # chosen wins
        ({}, {}, False),  # neither: TrainConfig's default, linear
    ],
)
def test_is_active_follows_the_chosen_then_the_fixed_then_the_default_parent(
    chosen: dict[str, Any], fixed: dict[str, Any], active: bool
) -> None:
    kl_cycles = next(p for p in default_space(10) if p.name == "kl_cycles")
    assert is_active(kl_cycles, chosen, _spec(fixed=fixed)) is active
    base_lr = next(p for p in default_space(10) if p.name == "base_lr")
    assert is_active(base_lr, chosen, _spec(fixed=fixed)) is True


def test_distributions_carry_each_parameter_s_range_scale_and_step() -> None:
    space = build_space(
        _spec(
            epochs=8,
            search_space={
                "latent_dim": {"low": 4, "high": 16, "step": 4},
                "kl_cycles": {"low": 2, "high": 6},
                "free_bits": {"low": 0.0, "high": 1.0, "step": 0.25},
            },
        )
    )
    dists = distributions(space)
    assert list(dists) == [p.name for p in space]
    assert dists["kl_schedule"] == CategoricalDistribution(
        ["constant", "linear", "cosine", "cyclical"]
    )
    assert dists["base_lr"] == FloatDistribution(3e-4, 1e-2, log=True)
    assert dists["free_bits"] == FloatDistribution(0.0, 1.0, step=0.25)
    assert dists["latent_dim"] == IntDistribution(4, 16, step=4)
    assert dists["kl_cycles"] == IntDistribution(2, 6, step=1)


def test_suggest_samples_each_kind_inside_its_distribution() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = _spec(
        epochs=8,
        fixed={"kl_schedule": "cyclical", "lr_policy": "triangular"},
        search_space={
            "latent_dim": {"low": 4, "high": 16, "step": 4},
            "gaussian_std": {"low": 0.05, "high": 0.5, "step": 0.05},
            "decoder_lr": {"low": 1e-4, "high": 1e-2, "log": True},
            "kl_cycles": {"low": 2, "high": 64, "log": True},
        },
    )
    space = build_space(spec)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    seen: dict[str, set[Any]] = {}
    for _ in range(40):
        trial = study.ask()
        params = suggest(trial, spec, space)
        # both parents fixed to values that use their children, but cyclical has no warm-up
        assert set(params) == {p.name for p in space} - {"kl_warmup_epochs"}
        assert trial.distributions == {n: d for n, d in distributions(space).items() if n in params}
        for name, value in params.items():
            seen.setdefault(name, set()).add(value)
        study.tell(trial, 0.0)
    assert seen["latent_dim"] <= {4, 8, 12, 16} and len(seen["latent_dim"]) > 1
    assert all(isinstance(v, int) for v in seen["latent_dim"] | seen["kl_cycles"])
    assert all(math.isclose(v / 0.05, round(v / 0.05)) for v in seen["gaussian_std"])
    # log scale: about half the draws of 1e-4..1e-2 fall below 1e-3 (uniform: about 9 %)
    below = sum(v < 1e-3 for v in seen["decoder_lr"])
    assert below >= 10


@pytest.mark.parametrize(
    ("param", "value", "inside"),
    [
        (Param("c", "categorical", choices=(1, "a", 0.5)), 1, True),
        (Param("c", "categorical", choices=(1, "a", 0.5)), True, False),  # bool is not 1
        (Param("c", "categorical", choices=(1, "a", 0.5)), 1.0, False),  # nor is 1.0
        (Param("c", "categorical", choices=(1, "a", 0.5)), "b", False),
        (Param("f", "float", 0.5, 2.0), 0.5, True),
        (Param("f", "float", 0.5, 2.0), 2.0, True),
        (Param("f", "float", 0.5, 2.0), 2.0001, False),
        (Param("f", "float", 0.5, 2.0), 0.4999, False),
        (Param("f", "float", 0.5, 2.0), 1, True),
        (Param("f", "float", 0.0, 2.0), False, False),
        (Param("f", "float", 0.5, 2.0), "1.0", False),
        (Param("i", "int", 1, 8), 3.0, True),
        (Param("i", "int", 1, 8), 3.5, False),
        (Param("i", "int", 1, 8), 9, False),
    ],
)
def test_contains_checks_type_and_range(param: Param, value: Any, inside: bool) -> None:
    assert param.contains(value) is inside


def test_bounds_are_the_ends_of_a_range_or_every_choice() -> None:
    assert Param("c", "categorical", choices=("a", "b", "c")).bounds() == ("a", "b", "c")
    ends = Param("i", "int", 2.0, 6.0).bounds()
    assert ends == (2, 6) and all(type(v) is int for v in ends)
    assert Param("f", "float", 0.25, 0.75).bounds() == (0.25, 0.75)


def test_a_cross_field_refusal_is_named_without_pydantic_s_prefix() -> None:
    spec = _spec(drop=["max_lr_factor"])
    with pytest.raises(InvalidSpec) as caught:
        resolve_config(spec, {"lr_policy": "triangular"})
    assert caught.value.field == "config"
    assert caught.value.reason == "`max_lr` is required by lr_policy='triangular'"


def test_the_batch_fit_counts_the_default_synthetic_size_and_a_searched_batch() -> None:
    # synthetic_size left at its default, 512: 410 training examples (80/10/10)
    assert _refusal(dataset="synthetic", fixed={"batch_size": 512}) == (
        "fixed.batch_size",
        "batch sizes [512] exceed the 410 training examples of 'synthetic' (synthetic_size 512)",
    )
    # the searched sizes decide, not the default 128 that would fit
    assert _refusal(dataset="synthetic", search_space={"batch_size": {"choices": [256, 512]}}) == (
        "search_space.batch_size",
        "batch sizes [512] exceed the 410 training examples of 'synthetic' (synthetic_size 512)",
    )

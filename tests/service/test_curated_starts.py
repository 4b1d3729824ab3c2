"""Curated start configurations fitted to a study (``hpo_service.curated_starts``): pure."""

from __future__ import annotations

from hpo_service.curated_starts import curated_starts
from hpo_service.schemas import StudySpec
from hpo_service.search_space import build_space, resolve_config


def _fit(**spec: object) -> dict[str, dict[str, object]]:
    study = StudySpec.model_validate({"name": "c", **spec})
    return dict(curated_starts(study, build_space(study)))


def test_every_source_fits_the_default_space_as_a_valid_config() -> None:
    study = StudySpec(name="c", epochs=20)
    starts = curated_starts(study, build_space(study))
    assert [source for source, _ in starts] == [
        "pytorch-examples",
        "bowman-warmup",
        "fu-cyclical",
        "one-cycle",
    ]
    for _, params in starts:
        config = resolve_config(study, params)
        assert config["base_lr"] == 1e-3 and config["batch_size"] == 128
    by_source = dict(starts)
    assert by_source["pytorch-examples"]["kl_schedule"] == "constant"
    assert by_source["fu-cyclical"]["kl_cycles"] == 4
    assert resolve_config(study, by_source["one-cycle"])["max_lr"] == 1e-2


def test_starts_adapt_to_the_run_length() -> None:
    short = _fit(epochs=2)
    assert short["bowman-warmup"]["kl_warmup_epochs"] == 0.5  # a quarter of the run
    assert short["fu-cyclical"]["kl_cycles"] == 2  # no more cycles than epochs
    assert _fit(epochs=40)["bowman-warmup"]["kl_warmup_epochs"] == 10.0


def test_values_outside_the_space_are_left_to_the_sampler() -> None:
    starts = _fit(
        epochs=10,
        search_space={"base_lr": {"low": 2e-3, "high": 5e-3}, "batch_size": {"choices": [32, 64]}},
        drop=["free_bits"],
    )
    for params in starts.values():
        assert "base_lr" not in params and "batch_size" not in params and "free_bits" not in params


def test_a_fixed_schedule_removes_the_duplicates_it_makes() -> None:
    """With the KL schedule fixed, the sources differ only in parameters that have no effect:
    those are left out and the duplicates they leave are enqueued once."""
    starts = _fit(epochs=10, fixed={"kl_schedule": "constant"}, drop=["lr_policy"])
    # Warm-up and cycle settings have no effect under a constant schedule, nor a peak LR
    # under the default constant LR policy: all four collapse into the first.
    assert list(starts) == ["pytorch-examples"]
    assert not {"kl_schedule", "kl_warmup_epochs", "kl_cycles", "max_lr_factor"} & set(
        starts["pytorch-examples"]
    )

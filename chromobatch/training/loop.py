"""Training loop of the paper's SCL strategy (Algorithm 1 + Eq. 4), usable from the CLI or as a library.

Every step draws B1 and B2 (24 images each, class k at row k) from `data.PairSampler`, augments them
independently, runs them through the network in ONE forward pass (cheaper, and DistributedDataParallel
wants one forward per backward), and minimises λ1 L_con + λ2 L_cls. `--no-scl` keeps the same sampler,
steps and images per step with λ1 = 0, so the ablation differs only in the loss.

Output folder: model.safetensors + model.json (the best model by validation accuracy, or the last when
there is no validation data), checkpoint/ (for --resume) and history.jsonl (loss, accuracy, t, lr).

The loop is cut where its concerns part: `_setup` (data, preprocessing, network, optimiser, resume),
`_step` (one optimiser step), `_validate` (model selection and early stopping on rank 0), `_checkpoint`
(every rank's sampler, saved by rank 0) and `_finish`; the state they share is one `_Run`. The checkpoint
format lives in `training.checkpoint`, torchrun in `training.distributed`, the forward pass in `ml.forward`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from tqdm import tqdm

from chromobatch import NUM_CLASSES
from chromobatch.errors import ConfigError, DataError, ModelError
from chromobatch.ml.device import resolve_device
from chromobatch.ml.factory import ChromosomeNet, create_model
from chromobatch.ml.folders import META, LoadedModel, save_model, update_meta
from chromobatch.ml.forward import forward_canvases
from chromobatch.ml.preprocess import PreprocessSpec, choose_scale, chromosome_length, to_tensor
from chromobatch.ml.runtime import native_bf16
from chromobatch.training.calibrate import calibrate as calibrate_size_prior
from chromobatch.training.checkpoint import (
    CHECKPOINT_DIR,
    Checkpoint,
    init_summary,
    load_checkpoint,
    load_init,
    restore_checkpoint,
    save_checkpoint,
)
from chromobatch.training.config import TrainConfig, TrainResult
from chromobatch.training.distributed import (
    DistContext,
    barrier,
    broadcast_tensor,
    gather_dicts,
    init_distributed,
    shutdown,
    wrap_model,
)
from chromobatch.training.losses import LossConfig, total_loss
from chromobatch.training.records import (
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

HISTORY = "history.jsonl"


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


def _as_records(data: str | Path | Sequence[Record] | None, splits: Sequence[str]) -> list[Record] | None:
    if data is None:
        return None
    if isinstance(data, (str, Path)):
        return load_records(data, splits=splits)
    return list(data)


@dataclass
class _Run:
    """One process's training run: what `_setup` builds and the step, validation and checkpoint share."""

    cfg: TrainConfig
    out: Path
    ctx: DistContext
    device: torch.device
    spec: PreprocessSpec
    loss_cfg: LossConfig
    train_recs: list[Record]
    val_recs: list[Record]
    #: the (subset of the) validation records, preprocessed; rank 0 only, the others never validate
    val_set: PreparedSet | None
    sampler: PairSampler
    images: torch.Tensor  # the training canvases, on the device
    gen: torch.Generator  # augmentation
    net: ChromosomeNet
    model: torch.nn.Module  # net, or net inside DistributedDataParallel
    opt: torch.optim.Optimizer
    init_info: dict[str, Any] | None
    fingerprint: dict[str, Any]
    val_fingerprint: dict[str, Any] | None
    targets: torch.Tensor  # class k at row k of B1 (and of B2)
    start: int = 0
    best_acc: float = -1.0
    best_step: int | None = None
    bad_vals: int = 0
    #: seconds of training loop before a --resume: the time budget covers the whole run
    spent_before: float = 0.0
    t0: float = 0.0
    time_frac: float = 0.0
    acc_ema: float | None = None
    hist: IO[str] | None = None

    @property
    def bf16(self) -> bool:
        """The forward pass under bf16 autocast (TrainConfig.precision, checked in `_setup`)."""
        if self.cfg.precision == "auto":
            return self.device.type == "cuda"
        return self.cfg.precision == "bf16"

    @property
    def have_val(self) -> bool:
        return bool(self.val_recs)

    @property
    def hist_path(self) -> Path:
        return self.out / HISTORY


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
    ctx = init_distributed(config.device)
    try:
        run = _setup(config, data, Path(out_dir), val_data, resume, ctx)
        return _finish(run, *_loop(run, progress))
    finally:
        shutdown(ctx)


# -------------------------------------------------------------------------------------------- setup


def _setup(
    cfg: TrainConfig,
    data: str | Path | Sequence[Record],
    out: Path,
    val_data: str | Path | Sequence[Record] | None,
    resume: bool,
    ctx: DistContext,
) -> _Run:
    """Records, preprocessing, the prepared sets, sampler, network and optimiser; a checkpoint restored."""
    device = resolve_device(cfg.device, ctx.local_rank)
    if cfg.precision == "bf16" and not native_bf16(device):
        raise ConfigError(f"--precision bf16 asked for, but {device} has no native bf16 (on a CPU: AVX-512 BF16 "
                          "or AMX); emulated it would be far slower than fp32", hint="Use --precision auto.")
    torch.manual_seed(cfg.seed + ctx.rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    train_recs, val_recs = _load_data(cfg, data, val_data)
    ckpt_dir = out / CHECKPOINT_DIR
    ckpt = load_checkpoint(ckpt_dir, cfg.to_dict()) if resume else None
    spec, init = _choose_spec(cfg, train_recs, ckpt)
    train_set, val_set = _prepare_sets(cfg, spec, train_recs, val_recs, ctx.main)
    sampler = PairSampler(
        train_set.labels.numpy(), train_set.cells, seed=cfg.seed + 1000 * ctx.rank,
        prefer_homolog=cfg.prefer_homolog,
    )  # fmt: skip
    images = train_set.images.to(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed * 7919 + ctx.rank)
    net, opt, loss_cfg = _build_net(cfg, device, init)
    init_info = init_summary(init) if init is not None else (ckpt[1].get("init_from") if ckpt else None)
    run = _Run(cfg=cfg, out=out, ctx=ctx, device=device, spec=spec, loss_cfg=loss_cfg, train_recs=train_recs,
               val_recs=val_recs, val_set=val_set, sampler=sampler, images=images, gen=gen, net=net, model=net,
               opt=opt, init_info=init_info, fingerprint=data_fingerprint(train_recs),
               val_fingerprint=data_fingerprint(val_recs) if val_recs else None,
               targets=torch.arange(NUM_CLASSES, device=device))  # fmt: skip
    if ckpt is not None:
        restore_checkpoint(ckpt, net, opt, sampler, gen, device, ctx.rank, ctx.world)
        meta = ckpt[1]
        run.start, run.spent_before = int(meta["step"]), float(meta.get("loop_seconds", 0.0))
        run.best_acc, run.best_step, run.bad_vals = float(meta["best_acc"]), meta["best_step"], int(meta["bad_vals"])
        log.info("resumed from %s at step %d", ckpt_dir, run.start)
    run.model = wrap_model(net, ctx, device)
    out.mkdir(parents=True, exist_ok=True)
    if ctx.main and not resume and run.hist_path.exists():
        run.hist_path.unlink()
    return run


def _load_data(
    cfg: TrainConfig, data: str | Path | Sequence[Record], val_data: str | Path | Sequence[Record] | None
) -> tuple[list[Record], list[Record]]:
    """(training, validation) records: the data's own split, or `val_data` instead of its validation part."""
    records = _as_records(data, ("train", "val"))
    assert records is not None
    train_recs, val_recs = split_records(records, seed=cfg.seed)
    override = _as_records(val_data, ("val",))
    if override is not None:
        val_recs = override
    if not train_recs:
        raise DataError("no training images (rows with split 'train' or no split)")
    return train_recs, val_recs


def _choose_spec(
    cfg: TrainConfig, train_recs: Sequence[Record], ckpt: Checkpoint | None
) -> tuple[PreprocessSpec, LoadedModel | None]:
    """The preprocessing of this run (the checkpoint's, the warm-start model's, or from the config and the
    training crops) and the warm-start model, if any."""
    if ckpt is not None:
        return PreprocessSpec.from_dict(ckpt[1]["preprocess"]), None
    if cfg.init_from:
        init = load_init(cfg)
        return replace(init.spec, input_size=cfg.input_size), init
    scale = cfg.scale or choose_scale((chromosome_length(r.crop) for r in train_recs), cfg.input_size)
    spec = PreprocessSpec(mode=cfg.preprocess, input_size=cfg.input_size, scale=round(scale, 6),
                          orient=cfg.orient, size_power=cfg.size_power)
    return spec, None


def _prepare_sets(cfg: TrainConfig, spec: PreprocessSpec, train_recs: Sequence[Record],
                  val_recs: Sequence[Record], main: bool) -> tuple[PreparedSet, PreparedSet | None]:
    """Canvases of the training records, and on rank 0 of (a fixed random subset of) the validation ones."""
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
    log.info(
        "prepared %d train / %d val images in %.1fs (%s, scale %.4g)",
        len(train_set), len(val_set) if val_set is not None else 0, time.perf_counter() - t_prep,
        spec.mode, spec.scale,
    )  # fmt: skip
    return train_set, val_set


def _build_net(
    cfg: TrainConfig, device: torch.device, init: LoadedModel | None
) -> tuple[ChromosomeNet, torch.optim.Optimizer, LossConfig]:
    """The network (warm-started from `init`), its Adam optimiser and the loss weights."""
    net = create_model(cfg.backbone, embed_dim=cfg.embed_dim, input_size=cfg.input_size).to(device)
    if init is not None:
        try:
            net.load_state_dict(init.net.state_dict())
        except RuntimeError as exc:
            raise ConfigError(f"--init-from {cfg.init_from}: its weights do not fit this network ({exc})",
                              hint="A backbone whose weights depend on the input size needs the model's "
                                   f"--input-size ({init.spec.input_size}).") from None
        log.info("warm start from %s (model identity %s)", cfg.init_from, init.sha256[:12])
    frozen = [name for name, p in net.named_parameters() if cfg.freeze and name.startswith(cfg.freeze)]
    for name, p in net.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    if cfg.freeze:
        if not frozen:
            raise ConfigError(f"--freeze {','.join(cfg.freeze)}: no parameter name starts with these",
                              hint="Parameter names look like backbone.layer1.0.conv1.weight.")
        log.info("%d of %d parameter tensors frozen (%s)", len(frozen), len(list(net.parameters())),
                 ", ".join(cfg.freeze))
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    loss_cfg = cfg.loss_config()
    net.logit_scale.requires_grad_(loss_cfg.lambda_con != 0)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return net, opt, loss_cfg


# --------------------------------------------------------------------------------------------- loop


def _loop(run: _Run, progress: bool) -> tuple[int, bool, bool, float]:
    """Steps until the last one, an early stop or the time budget; (steps done, stopped early, out of time,
    seconds). Validation and checkpoints at their intervals and at the end, on every rank at the same step."""
    cfg = run.cfg
    bar = tqdm(total=cfg.steps, initial=run.start, disable=not (progress and run.ctx.main), dynamic_ncols=True,
               unit="step")  # fmt: skip
    run.t0 = time.perf_counter()
    done = run.start
    stopped_early = ran_out = False
    run.hist = run.hist_path.open("a") if run.ctx.main else None
    run.model.train()
    try:
        for step in range(run.start, cfg.steps):
            if cfg.time_budget_s is not None and (step - run.start) % cfg.log_every == 0:
                run.time_frac = _spent(run)
                if step == run.start and run.time_frac >= 1.0 and step >= cfg.warmup_steps:
                    log.info("time budget of %.0fs already spent before step %d: nothing to resume",
                             cfg.time_budget_s, step + 1)  # fmt: skip
                    ran_out = True
                    break
            parts = _step(run, step)
            done = step + 1
            bar.update(1)
            out_of_time = run.time_frac >= 1.0 and done >= cfg.warmup_steps
            last = done == cfg.steps or out_of_time
            if done % cfg.log_every == 0 or last:
                _log_progress(run, done, parts, bar)
            stop = run.have_val and (done % cfg.val_every == 0 or last) and _validate(run, done)
            if done % cfg.checkpoint_every == 0 or last or stop:
                _checkpoint(run, done)
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
        if run.hist is not None:
            run.hist.close()
    return done, stopped_early, ran_out, time.perf_counter() - run.t0


def _spent(run: _Run) -> float:
    """Share of the time budget used, agreed by all ranks (rank 0's clock) so they stop at the same step."""
    if run.cfg.time_budget_s is None:
        return 0.0
    frac = torch.tensor([(run.spent_before + time.perf_counter() - run.t0) / run.cfg.time_budget_s])
    return float(broadcast_tensor(frac, run.ctx, run.device)[0])


def _step(run: _Run, step: int) -> dict[str, torch.Tensor]:
    """One optimiser step: B1 and B2 augmented and run in ONE forward pass, λ1 L_con + λ2 L_cls minimised.
    Returns the loss parts; the running training accuracy goes to run.acc_ema."""
    cfg, device = run.cfg, run.device
    i1, i2 = run.sampler.sample()
    idx = torch.from_numpy(np.concatenate([i1, i2])).to(device)
    x = augment(to_tensor(run.images[idx]).unsqueeze(1), cfg.augment, run.gen)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16) if run.bf16 else nullcontext():
        emb, logits = run.model(x)
    e1, e2 = emb.float().chunk(2)
    p1, p2 = logits.float().chunk(2)
    gamma = 0.0 if step < cfg.resolved_ce_epochs() * cfg.steps_per_epoch else cfg.gamma
    loss, parts = total_loss(e1, e2, p1, p2, run.net.logit_scale, run.loss_cfg, gamma=gamma, targets=run.targets)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    for g in run.opt.param_groups:
        g["lr"] = cfg.lr * lr_factor(step, cfg, run.time_frac)
    run.opt.step()
    run.net.clamp_logit_scale()
    if not math.isfinite(float(parts["loss"])):
        raise ModelError(f"training diverged at step {step + 1} (loss is {float(parts['loss'])})",
                         hint="Lower --lr or the loss weights.")  # fmt: skip
    acc = float((logits.detach().argmax(1) == torch.cat([run.targets, run.targets])).float().mean())
    run.acc_ema = acc if run.acc_ema is None else 0.9 * run.acc_ema + 0.1 * acc
    return parts


def _log_progress(run: _Run, done: int, parts: dict[str, torch.Tensor], bar: Any) -> None:
    """Loss parts, running accuracy, temperature and learning rate: the progress bar and history.jsonl."""
    assert run.acc_ema is not None
    t = float(run.net.temperature().detach())
    row: dict[str, Any] = {k: round(float(v), 5) for k, v in parts.items()}
    row.update(step=done, acc=round(run.acc_ema, 4), t=round(t, 3), lr=run.opt.param_groups[0]["lr"])
    bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{run.acc_ema:.3f}", t=f"{t:.1f}")
    _history(run, row)


def _history(run: _Run, row: dict[str, Any]) -> None:
    if run.hist is not None:
        run.hist.write(json.dumps(row) + "\n")
        run.hist.flush()


# ------------------------------------------------------------------------------- validate, checkpoint


def _validate(run: _Run, done: int) -> bool:
    """Rank 0 measures validation accuracy and saves the model when it is the best so far; every rank learns
    whether to stop early (patience validations without improvement)."""
    cfg = run.cfg
    flag = torch.zeros(2)
    if run.ctx.main:
        assert run.val_set is not None
        probs, _ = forward_canvases(run.net, torch.split(run.val_set.images, 256), run.device, embeddings=False)
        va = float((probs.argmax(1) == run.val_set.labels).float().mean())
        if va > run.best_acc:
            run.best_acc, run.best_step, run.bad_vals = va, done, 0
            save_model(run.net, _model_meta(run, done, {"val_accuracy": va, "val_n": len(run.val_set)}), run.out,
                       half=cfg.half_weights)  # fmt: skip
        else:
            run.bad_vals += 1
        log.info("step %d: val accuracy %.4f (best %.4f at %s)", done, va, run.best_acc, run.best_step)
        _history(run, {"step": done, "val_acc": round(va, 5)})
        flag[0] = float(cfg.patience > 0 and run.bad_vals >= cfg.patience)
    return bool(broadcast_tensor(flag, run.ctx, run.device)[0])


def _checkpoint(run: _Run, done: int) -> None:
    """Every rank's sampler position, gathered; rank 0 saves the checkpoint; all wait for it."""
    sampler_states = gather_dicts({str(run.ctx.rank): run.sampler.get_state()}, run.ctx)
    if run.ctx.main:
        save_checkpoint(
            run.out / CHECKPOINT_DIR, run.net, run.opt,
            {"step": done, "best_acc": run.best_acc, "best_step": run.best_step, "bad_vals": run.bad_vals,
             "loop_seconds": round(run.spent_before + time.perf_counter() - run.t0, 3),
             "config": run.cfg.to_dict(), "preprocess": run.spec.to_dict(), "sampler": sampler_states,
             "init_from": run.init_info},
            run.gen,
        )  # fmt: skip
    barrier(run.ctx)


def _model_meta(run: _Run, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """model.json of the model at `step`: architecture, preprocessing, how it was trained, on what data."""
    cfg = run.cfg
    stain = (run.init_info or {}).get("stain")  # a fine-tuned model reads the stain its starting point read
    return {
        **({"stain": stain} if stain else {}),
        "backbone": cfg.backbone,
        "embed_dim": cfg.embed_dim,
        "preprocess": run.spec.to_dict(),
        "training": {
            "config": cfg.to_dict(),
            "loss": run.loss_cfg.to_dict(),
            "schedule": cfg.resolved_schedule(),
            "ce_epochs": cfg.resolved_ce_epochs(),
            "step": step,
            "images_per_step": 2 * NUM_CLASSES * run.ctx.world,
            "world_size": run.ctx.world,
            "device": str(run.device),
            "precision": "bf16" if run.bf16 else "fp32",  # of the forward pass (autocast); weights are fp32
            "torch": torch.__version__,
            **({"init_from": run.init_info} if run.init_info else {}),
        },
        "data": {"train": run.fingerprint, "val": run.val_fingerprint},
        "metrics": metrics,
    }


# ------------------------------------------------------------------------------------------- finish


def _finish(run: _Run, steps_done: int, stopped_early: bool, ran_out: bool, seconds: float) -> TrainResult:
    """The last model when nothing validated, the size prior calibrated, run statistics in model.json."""
    cfg, main = run.cfg, run.ctx.main
    ran = max(steps_done - run.start, 0)
    ips = ran * 2 * NUM_CLASSES * run.ctx.world / seconds if seconds > 0 else 0.0
    if main and not run.have_val:
        save_model(run.net, _model_meta(run, steps_done, {}), run.out, half=cfg.half_weights)
    prior_info = None
    if main and cfg.size_prior and run.have_val:
        prior_info = calibrate_size_prior(run.out, run.train_recs, run.val_recs, device=str(run.device))
    if main:
        _record_run_stats(run.out, seconds, ips, steps_done)
    return TrainResult(
        model_dir=run.out,
        steps_done=steps_done,
        best_val_accuracy=run.best_acc if run.best_acc >= 0 else None,
        best_step=run.best_step,
        stopped_early=stopped_early,
        seconds=seconds,
        images_per_second=ips,
        final_temperature=float(run.net.temperature().detach()),
        history_path=run.hist_path,
        size_prior=prior_info,
        out_of_time=ran_out,
    )


def _record_run_stats(out: Path, seconds: float, ips: float, steps_done: int) -> None:
    """Add wall time and throughput of the whole run to the saved model.json (it was written mid-run)."""
    if not (out / META).is_file():
        return

    def change(meta: dict[str, Any]) -> None:
        meta.setdefault("training", {})["run"] = {
            "steps_done": steps_done,
            "seconds": round(seconds, 1),
            "train_images_per_second": round(ips, 1),
        }

    update_meta(out, change)

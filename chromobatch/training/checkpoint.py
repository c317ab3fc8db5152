"""Where a training run starts from: its own checkpoint (`chromobatch train --resume`: weights, optimiser
moments, RNG states and the sampler's position, so a resumed run continues the same step sequence) or a
warm-start model folder (`--init-from`: weights only, the optimiser and schedule start fresh).

Why apart from the loop: the checkpoint format (safetensors for tensors, JSON for the rest; no pickle
anywhere, so a checkpoint from elsewhere cannot run code) and the checks that a run may continue from a
checkpoint or a model are their own concern; the loop only says when to save and what its counters are.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from chromobatch.errors import ConfigError, ModelError
from chromobatch.files import atomic_write
from chromobatch.ml.factory import ChromosomeNet
from chromobatch.ml.folders import LoadedModel, load_model
from chromobatch.training.config import TrainConfig
from chromobatch.training.records import PairSampler

CHECKPOINT_DIR = "checkpoint"
#: settings a resumed run must share with its checkpoint (anything else may change, say --steps)
RESUME_KEYS = ("backbone", "input_size", "embed_dim", "preprocess", "orient", "variant", "no_scl")

Checkpoint = tuple[dict[str, torch.Tensor], dict[str, Any]]


def save_checkpoint(
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


def load_checkpoint(folder: Path, config: dict[str, Any]) -> Checkpoint:
    """The checkpoint in `folder`, refused (ConfigError) when `config` differs from its run in a RESUME_KEYS
    setting: the weights would not fit, or the run would silently become another experiment."""
    if not (folder / "state.json").is_file():
        raise ModelError(f"{folder}: no checkpoint to resume from", hint="Run without --resume first.")
    try:
        tensors = load_file(str(folder / "checkpoint.safetensors"))
        meta = json.loads((folder / "state.json").read_text())
    except Exception as exc:  # noqa: BLE001 - any failure here means an unusable checkpoint
        raise ModelError(f"{folder}: cannot resume from checkpoint: {exc}") from exc
    old = meta["config"]
    for key in RESUME_KEYS:
        before = old.get(key, "none" if key == "orient" else None)  # checkpoints older than --orient
        if before != config[key]:
            raise ConfigError(f"--resume: {key} was {before!r} in {folder}, now {config[key]!r}")
    return tensors, meta


def restore_checkpoint(ckpt: Checkpoint, net: ChromosomeNet, opt: torch.optim.Optimizer, sampler: PairSampler,
                       gen: torch.Generator, device: torch.device, rank: int, world: int) -> None:
    """Put weights, optimiser, sampler and RNG states back. The augmentation RNG only in a single-process
    run: its state is rank 0's, and every rank of a DDP run must keep drawing its own augmentations."""
    tensors, meta = ckpt
    net.load_state_dict({k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")})
    _restore_optimizer(opt, tensors, meta)
    sampler.set_state(meta["sampler"][str(rank)] if str(rank) in meta["sampler"] else meta["sampler"]["0"])
    torch.set_rng_state(tensors["rng/torch"])
    if world == 1:
        gen.set_state(tensors["rng/augment"])
    if "rng/cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng/cuda"], device)


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("opt/"):
            _, pid, k = key.split("/", 2)
            state.setdefault(int(pid), {})[k] = v
    for pid, extra in meta["optimizer"]["scalars"].items():
        state.setdefault(int(pid), {}).update(extra)
    opt.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})


# ------------------------------------------------------------------------------------------ warm start


def load_init(cfg: TrainConfig) -> LoadedModel:
    """The warm-start model; its architecture must be the one this run builds (else a clear ConfigError)."""
    assert cfg.init_from
    init = load_model(cfg.init_from)
    meta = init.meta
    # the input size may differ: a convolutional backbone's weights do not depend on it (one that does fails
    # when the weights are loaded, with the tensor named)
    want = {"backbone": cfg.backbone, "embed_dim": cfg.embed_dim, "preprocess": cfg.preprocess, "orient": cfg.orient}
    have = {"backbone": meta["backbone"], "embed_dim": int(meta["embed_dim"]), "preprocess": init.spec.mode,
            "orient": init.spec.orient}
    diff = [f"{k} {have[k]!r} (this run: {want[k]!r})" for k in want if have[k] != want[k]]
    if diff:
        raise ConfigError(f"--init-from {cfg.init_from}: the model has " + ", ".join(diff),
                          hint="Pass the same --backbone/--embed-dim/--preprocess/--orient as that model.")
    return init


def init_summary(init: LoadedModel) -> dict[str, Any]:
    """What a warm-started model.json records about its starting point (its own training history included)."""
    tr = init.meta.get("training", {})
    prior = tr.get("init_from")
    steps = int(tr.get("step", 0)) + (int(prior.get("total_steps", 0)) if isinstance(prior, dict) else 0)
    return {"folder": str(init.folder), "name": init.meta.get("name"), "stain": init.meta.get("stain"),
            "sha256": init.sha256,
            "steps": tr.get("step"), "total_steps": steps, "metrics": init.meta.get("metrics", {})}

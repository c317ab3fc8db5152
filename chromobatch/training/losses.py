"""Loss functions of the paper (sections 3.2-3.3, Algorithm 1); pure tensor code, no model or data here.

B1[k] and B2[k] are both of class k (k = 0..N-1 in CLASSES order), so the target of row k of every
similarity matrix is k: the diagonal. L_con pushes each embedding towards the other images of its class and
away from the other 23 classes; L_cls is the ordinary classification loss on both batches.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from chromobatch.ml.factory import MAX_TEMPERATURE


def _full(x: torch.Tensor) -> torch.Tensor:
    """Losses run in fp32 even under bf16 autocast (fp64 stays fp64 for the reference tests)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0, reduction: str = "mean"
) -> torch.Tensor:
    """Focal loss (Lin et al.): -(1 - p_y)^gamma log p_y, mean over rows (reduction="none": per row).

    gamma = 0 is cross-entropy."""
    logp = F.log_softmax(_full(logits), dim=-1).gather(-1, targets.view(-1, 1)).squeeze(-1)
    per_row = -logp if gamma == 0 else -((1.0 - logp.exp()).clamp(min=0.0) ** gamma) * logp
    if reduction == "none":
        return per_row
    if reduction != "mean":
        raise ValueError(f"reduction must be mean or none, not {reduction!r}")
    return per_row.mean()


def temperature_from(logit_scale: torch.Tensor) -> torch.Tensor:
    """t = exp(logit_scale) clamped to <= 100 (same rule as ChromosomeNet.temperature)."""
    return _full(logit_scale).exp().clamp(max=MAX_TEMPERATURE)


def similarity_matrices(
    e1: torch.Tensor, e2: torch.Tensor, logit_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """S11, S12, S22 of Algorithm 1 (lines 3-7): cosine similarities times t."""
    n1 = F.normalize(_full(e1), dim=-1)
    n2 = F.normalize(_full(e2), dim=-1)
    t = temperature_from(logit_scale).to(n1.dtype)
    return n1 @ n1.T * t, n1 @ n2.T * t, n2 @ n2.T * t


def scl_loss(
    e1: torch.Tensor,
    e2: torch.Tensor,
    logit_scale: torch.Tensor,
    gamma: float = 2.0,
    *,
    matrix_weight: float = 1.0,
    focal_scale: float = 1.0,
    targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_con (Eq. 3, Algorithm 1 line 8): sum over S11, S12, S22 of focal(rows) + focal(columns).

    matrix_weight=0.5 and focal_scale=10 give the paper's public-code variant (0.5 * (rows + columns),
    focal terms x10). `targets` defaults to 0..N-1 (row k of B1 and B2 is class k).
    """
    if e1.shape != e2.shape:
        raise ValueError(f"e1 and e2 must have the same shape, got {tuple(e1.shape)} and {tuple(e2.shape)}")
    if targets is None:
        targets = torch.arange(e1.shape[0], device=e1.device)
    n = e1.shape[0]
    s11, s12, s22 = similarity_matrices(e1, e2, logit_scale)
    # The six focal terms as one batch (rows, then columns as rows of the transpose): on a GPU the step is
    # bound by kernel launches, and six separate small losses made an SCL step 35% slower than a plain one.
    # Each term is a mean over n rows, so their sum is the sum over all 6n rows divided by n.
    logits = torch.stack([s11, s11.T, s12, s12.T, s22, s22.T]).reshape(6 * n, n)
    per_row = focal_loss(logits, targets.repeat(6), gamma, reduction="none")
    return focal_scale * matrix_weight * per_row.sum() / n


@dataclass(frozen=True)
class LossConfig:
    """Weights of Eq. 4 plus the switches of the paper's public code (variant "code")."""

    lambda_con: float = 1.0
    lambda_cls: float = 1.0
    gamma: float = 2.0
    matrix_weight: float = 1.0
    focal_scale: float = 1.0

    @classmethod
    def for_variant(cls, variant: str, lambda_con: float | None = None, lambda_cls: float | None = None) -> LossConfig:
        """'paper' = the text (λ1 = λ2 = 1); 'code' = public code (0.5 per matrix side sum, x10, λ2 = 2)."""
        if variant == "paper":
            base = cls()
        elif variant == "code":
            base = cls(lambda_cls=2.0, matrix_weight=0.5, focal_scale=10.0)
        else:
            raise ValueError(f"unknown variant {variant!r} (paper or code)")
        return cls(
            lambda_con=base.lambda_con if lambda_con is None else lambda_con,
            lambda_cls=base.lambda_cls if lambda_cls is None else lambda_cls,
            gamma=base.gamma,
            matrix_weight=base.matrix_weight,
            focal_scale=base.focal_scale,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def total_loss(
    e1: torch.Tensor,
    e2: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    logit_scale: torch.Tensor,
    cfg: LossConfig,
    *,
    gamma: float | None = None,
    targets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 4: λ1 L_con + λ2 L_cls with L_cls = focal(P1) + focal(P2) (Eq. 5). Returns (loss, detached parts).

    `gamma` overrides cfg.gamma (the code variant trains its first epochs with plain cross-entropy, gamma=0).
    With λ1 = 0 (--no-scl) L_con is not computed at all, so the baseline costs no extra time.
    """
    g = cfg.gamma if gamma is None else gamma
    if targets is None:
        targets = torch.arange(p1.shape[0], device=p1.device)
    l_cls = cfg.focal_scale * (focal_loss(p1, targets, g) + focal_loss(p2, targets, g))
    loss = cfg.lambda_cls * l_cls
    parts = {"cls": l_cls.detach()}
    if cfg.lambda_con != 0:
        l_con = scl_loss(
            e1, e2, logit_scale, g, matrix_weight=cfg.matrix_weight, focal_scale=cfg.focal_scale, targets=targets
        )
        loss = loss + cfg.lambda_con * l_con
        parts["con"] = l_con.detach()
    parts["loss"] = loss.detach()
    return loss, parts

"""The SCL loss against a naive float64 loop implementation of the paper's formula (Eq. 3-5, Algorithm 1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chromobatch.ml.factory import MAX_TEMPERATURE, create_model
from chromobatch.training.losses import LossConfig, focal_loss, scl_loss, total_loss


def naive_focal(logits: np.ndarray, targets: np.ndarray, gamma: float) -> float:
    """Mean over rows of -(1 - p_y)^gamma * log p_y, written out with loops."""
    total = 0.0
    for i in range(logits.shape[0]):
        row = logits[i]
        m = max(row)
        denom = sum(math.exp(v - m) for v in row)
        p = math.exp(row[targets[i]] - m) / denom
        total += -((1 - p) ** gamma) * math.log(p)
    return total / logits.shape[0]


def naive_scl(e1: np.ndarray, e2: np.ndarray, t: float, gamma: float) -> float:
    """Algorithm 1: l2-normalise, S11/S12/S22 times t, focal loss along rows and columns of each."""
    n = e1.shape[0]

    def l2(e: np.ndarray) -> np.ndarray:
        out = np.empty_like(e)
        for i in range(e.shape[0]):
            out[i] = e[i] / math.sqrt(sum(v * v for v in e[i]))
        return out

    a, b = l2(e1), l2(e2)

    def sim(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        s = np.empty((n, n))
        for i in range(n):
            for j in range(n):
                s[i, j] = sum(x[i, d] * y[j, d] for d in range(x.shape[1])) * t
        return s

    targets = np.arange(n)
    loss = 0.0
    for s in (sim(a, a), sim(a, b), sim(b, b)):
        loss += naive_focal(s, targets, gamma) + naive_focal(s.T.copy(), targets, gamma)
    return loss


@pytest.mark.parametrize("gamma", [0.0, 2.0])
@pytest.mark.parametrize("log_t", [math.log(1 / 0.07), 1.0])
def test_scl_loss_matches_naive_float64(gamma: float, log_t: float) -> None:
    rng = np.random.default_rng(0)
    e1 = rng.normal(size=(24, 16))
    e2 = e1 + 0.5 * rng.normal(size=(24, 16))
    got = scl_loss(torch.from_numpy(e1), torch.from_numpy(e2), torch.tensor(log_t, dtype=torch.float64), gamma)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(naive_scl(e1, e2, math.exp(log_t), gamma), rel=1e-10)


def test_focal_loss_gamma0_is_cross_entropy_and_gamma_reduces_easy_examples() -> None:
    torch.manual_seed(0)
    logits = torch.randn(24, 24, dtype=torch.float64)
    y = torch.arange(24)
    assert float(focal_loss(logits, y, 0.0)) == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-12)
    assert float(focal_loss(logits, y, 2.0)) < float(focal_loss(logits, y, 0.0))
    assert float(focal_loss(logits, y, 2.0)) == pytest.approx(naive_focal(logits.numpy(), y.numpy(), 2.0), rel=1e-10)


def test_code_variant_is_half_per_matrix_times_ten() -> None:
    torch.manual_seed(1)
    e1, e2 = torch.randn(24, 8, dtype=torch.float64), torch.randn(24, 8, dtype=torch.float64)
    s = torch.tensor(2.0, dtype=torch.float64)
    paper = scl_loss(e1, e2, s, 2.0)
    code = scl_loss(e1, e2, s, 2.0, matrix_weight=0.5, focal_scale=10.0)
    assert float(code) == pytest.approx(5.0 * float(paper), rel=1e-12)
    cfg = LossConfig.for_variant("code")
    assert (cfg.lambda_con, cfg.lambda_cls, cfg.matrix_weight, cfg.focal_scale) == (1.0, 2.0, 0.5, 10.0)


def test_total_loss_weights_and_no_scl() -> None:
    torch.manual_seed(2)
    e1, e2 = torch.randn(24, 8), torch.randn(24, 8)
    p1, p2 = torch.randn(24, 24), torch.randn(24, 24)
    s = torch.tensor(math.log(1 / 0.07))
    y = torch.arange(24)
    loss, parts = total_loss(e1, e2, p1, p2, s, LossConfig(lambda_con=0.5, lambda_cls=2.0))
    cls = focal_loss(p1, y) + focal_loss(p2, y)
    assert float(parts["cls"]) == pytest.approx(float(cls), rel=1e-6)
    assert float(parts["con"]) == pytest.approx(float(scl_loss(e1, e2, s)), rel=1e-6)
    assert float(loss) == pytest.approx(0.5 * float(parts["con"]) + 2.0 * float(cls), rel=1e-6)
    base, parts0 = total_loss(e1, e2, p1, p2, s, LossConfig(lambda_con=0.0))
    assert "con" not in parts0
    assert float(base) == pytest.approx(float(cls), rel=1e-6)


def test_gradients_reach_logit_scale_and_temperature_is_clamped() -> None:
    net = create_model("test_resnet", embed_dim=16, input_size=32)
    torch.manual_seed(0)
    x = torch.rand(48, 1, 32, 32)
    emb, logits = net(x)
    e1, e2 = emb.chunk(2)
    p1, p2 = logits.chunk(2)
    loss, _ = total_loss(e1, e2, p1, p2, net.logit_scale, LossConfig())
    loss.backward()
    assert net.logit_scale.grad is not None and float(net.logit_scale.grad.abs()) > 0
    assert float(net.temperature().detach()) == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        net.logit_scale.fill_(10.0)  # exp(10) >> 100
    assert float(net.temperature().detach()) == MAX_TEMPERATURE
    net.clamp_logit_scale()
    assert float(net.logit_scale.detach()) == pytest.approx(math.log(MAX_TEMPERATURE))
    # An optimiser step pushing t upwards from just below the cap: the parameter is clamped back after it.
    with torch.no_grad():
        net.logit_scale.fill_(math.log(MAX_TEMPERATURE) - 0.01)
    opt = torch.optim.SGD([net.logit_scale], lr=1.0)
    opt.zero_grad()
    (-net.temperature()).backward()
    opt.step()
    assert float(net.logit_scale.detach()) > math.log(MAX_TEMPERATURE)
    net.clamp_logit_scale()
    assert float(net.temperature().detach()) <= MAX_TEMPERATURE

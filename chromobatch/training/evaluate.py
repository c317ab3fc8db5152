"""Evaluate a model folder on labelled data: the paper's metrics (accuracy, macro recall, macro one-vs-rest
AUC) plus a per-class table, and, when asked, the paper's figures: confusion matrix, t-SNE of the embeddings
and class-activation heatmaps, tied together in one HTML report.
"""

from __future__ import annotations

import html
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from chromobatch import CLASSES, NUM_CLASSES
from chromobatch.errors import DataError
from chromobatch.ml.factory import ChromosomeNet
from chromobatch.ml.folders import LoadedModel, load_model
from chromobatch.training.calibrate import record_relative_inks
from chromobatch.training.records import Record, cell_median_lengths, load_records

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- metrics


def _binary_auc(pos: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC by the rank statistic (ties counted half); pos is boolean."""
    from scipy.stats import rankdata

    n_pos = int(pos.sum())
    n_neg = pos.size - n_pos
    ranks = rankdata(score)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def compute_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """Accuracy, macro recall/precision/F1 over the classes present, macro one-vs-rest AUC, per-class table."""
    y_true = np.asarray(y_true, dtype=np.int64)
    pred = probs.argmax(1)
    n = int(y_true.size)
    if n == 0:
        raise DataError("no images to evaluate")
    conf = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    np.add.at(conf, (y_true, pred), 1)
    per_class = []
    recalls: list[float] = []
    precisions: list[float] = []
    f1s: list[float] = []
    aucs: list[float] = []
    for k, name in enumerate(CLASSES):
        support = int(conf[k].sum())
        predicted = int(conf[:, k].sum())
        tp = int(conf[k, k])
        row: dict[str, Any] = {"class": name, "n": support, "correct": tp}
        rec = tp / support if support else None
        prec = tp / predicted if predicted else (0.0 if support else None)
        f1 = 2 * rec * prec / (rec + prec) if rec and prec else (0.0 if support else None)
        pos = y_true == k
        auc = _binary_auc(pos, probs[:, k]) if 0 < support < n else None
        row.update(recall=rec, precision=prec, f1=f1, auc=auc)
        if support:  # then rec, prec and f1 are numbers
            recalls.append(tp / support)
            precisions.append(prec or 0.0)
            f1s.append(f1 or 0.0)
        if auc is not None:
            aucs.append(auc)
        top = [(CLASSES[j], int(conf[k, j])) for j in np.argsort(-conf[k]) if j != k and conf[k, j] > 0][:3]
        row["confused_with"] = top
        per_class.append(row)
    pairs = [
        {"true": CLASSES[i], "pred": CLASSES[j], "count": int(conf[i, j])}
        for i, j in zip(*np.nonzero(conf), strict=True)
        if i != j
    ]
    pairs.sort(key=lambda r: -r["count"])
    top5 = float(np.mean([y in row for y, row in zip(y_true, np.argsort(-probs, 1)[:, :5], strict=True)]))
    return {
        "n": n,
        "accuracy": float((pred == y_true).mean()),
        "top5_accuracy": top5,
        "recall_macro": float(np.mean(recalls)),
        "precision_macro": float(np.mean(precisions)),
        "f1_macro": float(np.mean(f1s)),
        "auc_macro": float(np.mean(aucs)) if aucs else None,
        "classes_present": int(sum(1 for r in per_class if r["n"])),
        "per_class": per_class,
        "top_confusions": pairs[:15],
        "confusion_matrix": conf.tolist(),
    }


# --------------------------------------------------------------------------------------------- heatmaps


def class_activation_maps(net: ChromosomeNet, x: torch.Tensor) -> tuple[np.ndarray, str]:
    """Heatmaps (B, S, S) in [0, 1] for the predicted class: Grad-CAM on the last feature map of CNN-like
    backbones, input-gradient saliency for token backbones (ViT). Returns (maps, method)."""
    net.eval()
    with torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        feats = net.forward_features(x)
        width = int(getattr(net.backbone, "num_features", 0))
        spatial = feats.ndim == 4 and width in (feats.shape[1], feats.shape[-1])
        _, logits = net.forward_head(feats)
        score = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
        if spatial:
            (grad,) = torch.autograd.grad(score, feats)
            if feats.shape[1] != width:  # channels-last layout (Swin)
                feats, grad = feats.permute(0, 3, 1, 2), grad.permute(0, 3, 1, 2)
            weights = grad.mean(dim=(2, 3), keepdim=True)
            cam = F.relu((weights * feats).sum(1, keepdim=True))
            cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
            method = "Grad-CAM (last feature map)"
        else:
            (grad,) = torch.autograd.grad(score, x)
            cam = F.avg_pool2d(grad.abs(), 5, stride=1, padding=2)[:, 0]
            method = "input-gradient saliency"
    cam = cam.detach()
    flat = cam.flatten(1)
    lo, hi = flat.min(1)[0].view(-1, 1, 1), flat.max(1)[0].view(-1, 1, 1)
    return ((cam - lo) / (hi - lo).clamp(min=1e-8)).cpu().numpy(), method


# --------------------------------------------------------------------------------------------- figures


def _figure(w: float, h: float) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no global state, any backend

    return Figure(figsize=(w, h), dpi=110)


def plot_confusion(conf: np.ndarray, path: Path, title: str) -> None:
    fig = _figure(9, 8)
    ax = fig.add_subplot(111)
    rows = conf.sum(1, keepdims=True)
    norm = np.divide(conf, rows, out=np.zeros(conf.shape, dtype=float), where=rows > 0)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i, j in zip(*np.nonzero(conf), strict=True):
        ax.text(j, i, str(conf[i, j]), ha="center", va="center", fontsize=5.5,
                color="white" if norm[i, j] > 0.5 else "black")  # fmt: skip
    ax.set_xticks(range(NUM_CLASSES), CLASSES, fontsize=7)
    ax.set_yticks(range(NUM_CLASSES), CLASSES, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def _colours() -> list[Any]:
    from matplotlib import colormaps

    tab = list(getattr(colormaps["tab20"], "colors")) + list(getattr(colormaps["Dark2"], "colors"))  # noqa: B009
    return list(tab[:NUM_CLASSES])


def plot_tsne(emb: np.ndarray, labels: np.ndarray, path: Path, title: str, seed: int = 0) -> None:
    """2-D t-SNE of the embeddings, coloured by true class, class names at the class medians."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(min=1e-8)  # the loss compares cosines
    if x.shape[1] > 50 and x.shape[0] > 50:
        x = PCA(n_components=50, random_state=seed).fit_transform(x)
    perplexity = float(min(30, max(2, (x.shape[0] - 1) // 3)))
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
    xy = xy.fit_transform(x)
    fig = _figure(8, 8)
    ax = fig.add_subplot(111)
    cols = _colours()
    for k in range(NUM_CLASSES):
        m = labels == k
        if m.any():
            ax.scatter(xy[m, 0], xy[m, 1], s=5, color=cols[k], alpha=0.7)
            cx, cy = np.median(xy[m], axis=0)
            ax.text(cx, cy, CLASSES[k], fontsize=9, weight="bold", ha="center", va="center")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def plot_cams(images: np.ndarray, cams: np.ndarray, true: Sequence[int], pred: Sequence[int], path: Path,
              method: str) -> None:  # fmt: skip
    n = len(images)
    fig = _figure(1.6 * n, 3.6)
    for i in range(n):
        a = fig.add_subplot(2, n, i + 1)
        a.imshow(images[i], cmap="gray_r", vmin=0, vmax=1)
        a.set_title(f"{CLASSES[true[i]]}->{CLASSES[pred[i]]}", fontsize=8,
                    color="black" if true[i] == pred[i] else "red")  # fmt: skip
        a.axis("off")
        b = fig.add_subplot(2, n, n + i + 1)
        b.imshow(images[i], cmap="gray_r", vmin=0, vmax=1)
        b.imshow(cams[i], cmap="jet", alpha=0.45, vmin=0, vmax=1)
        b.axis("off")
    fig.suptitle(f"{method}; title = true->predicted", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def write_html(metrics: dict[str, Any], path: Path, figures: dict[str, str]) -> None:
    esc = html.escape

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.2f}%"

    head = "".join(
        f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>"
        for k, v in (
            ("model", metrics["model"]["folder"]),
            ("backbone", metrics["model"]["backbone"]),
            ("weights sha256", metrics["model"]["sha256"]),
            ("data", f"{metrics['data']} (split {metrics['split']})"),
            ("images", metrics["n"]),
            ("accuracy", pct(metrics["accuracy"])),
            ("macro recall", pct(metrics["recall_macro"])),
            ("macro AUC (one-vs-rest)", pct(metrics["auc_macro"])),
            ("top-5 accuracy", pct(metrics["top5_accuracy"])),
        )
    )
    rows = "".join(
        f"<tr><td>{esc(r['class'])}</td><td>{r['n']}</td><td>{pct(r['recall'])}</td><td>{pct(r['precision'])}</td>"
        f"<td>{pct(r['auc'])}</td><td>{esc(', '.join(f'{c} ({n})' for c, n in r['confused_with']))}</td></tr>"
        for r in metrics["per_class"]
    )
    figs = "".join(
        f"<h2>{esc(title)}</h2><img src='{esc(src)}' style='max-width:100%'>" for title, src in figures.items()
    )
    path.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>chromobatch evaluation</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}</style></head><body>"
        "<h1>chromobatch evaluation</h1>"
        "<p><b>Research use only.</b> Automated classifications need review by a qualified cytogeneticist.</p>"
        f"<table>{head}</table><h2>Per class</h2><table><tr><th>class</th><th>n</th><th>recall</th>"
        f"<th>precision</th><th>AUC</th><th>most confused with</th></tr>{rows}</table>{figs}</body></html>",
        encoding="utf-8",
    )


# ------------------------------------------------------------------------------------------- evaluate


def evaluate(
    model_folder: str | Path,
    data: str | Path | Sequence[Record],
    out_dir: str | Path | None = None,
    *,
    split: str | None = "test",
    device: str = "cpu",
    batch_size: int = 128,
    tsne_max: int = 1200,
    n_cam: int = 8,
    seed: int = 0,
    size_prior: bool = True,
) -> dict[str, Any]:
    """Metrics of a model folder on a manifest / class-folder tree / Records (only `split` rows when the data
    has a split column; split=None or 'all' uses everything). With out_dir: confusion.png, tsne.png,
    cam.png, metrics.json and report.html there. size_prior=False measures the image model alone."""
    t0 = time.perf_counter()
    lm: LoadedModel = load_model(model_folder, device=device)
    splits = None if split in (None, "all") else [split]
    if isinstance(data, (str, Path)):
        records = load_records(data, splits=splits)
        data_name = str(data)
    else:
        records = [r for r in data if splits is None or not r.split or r.split in splits]
        data_name = f"{len(records)} in-memory records"
    if not records:
        raise DataError(f"{data_name}: no images in split {split!r}")
    meds = cell_median_lengths(records) if lm.spec.mode == "cell" else None
    prior = lm.size_prior if size_prior else None
    rel = record_relative_inks(records, prior.min_cell) if prior is not None else None
    probs, emb = lm.predict([r.crop for r in records], meds, batch_size=batch_size, rel_inks=rel)
    y = np.array([r.label for r in records])
    metrics = compute_metrics(y, probs)
    metrics.update(
        model={"folder": str(model_folder), "backbone": lm.meta["backbone"], "sha256": lm.sha256,
               "preprocess": lm.spec.to_dict(),
               "size_prior": None if prior is None or rel is None else {
                   "weight": prior.weight, "applied_to": int(np.isfinite(rel).sum())}},
        data=data_name,
        split=split or "all",
        seconds=round(time.perf_counter() - t0, 2),
    )  # fmt: skip
    log.info("evaluated %d images: accuracy %.4f", metrics["n"], metrics["accuracy"])
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        title = f"{lm.meta['backbone']} on {data_name} ({split or 'all'}): accuracy {metrics['accuracy']:.4f}"
        figures: dict[str, str] = {}
        plot_confusion(np.asarray(metrics["confusion_matrix"]), out / "confusion.png", title)
        figures["Confusion matrix"] = "confusion.png"
        rng = np.random.default_rng(seed)
        sub = rng.choice(len(y), min(tsne_max, len(y)), replace=False)
        if len(sub) >= 10:
            plot_tsne(emb[sub], y[sub], out / "tsne.png", f"t-SNE of embeddings ({len(sub)} images)", seed)
            figures["t-SNE of the embeddings"] = "tsne.png"
        if n_cam > 0:
            pred = probs.argmax(1)
            wrong = np.flatnonzero(pred != y)
            right = np.flatnonzero(pred == y)
            n_wrong = min(len(wrong), n_cam // 2)
            pick = list(rng.choice(wrong, n_wrong, replace=False)) if n_wrong else []
            pick += list(rng.choice(right, min(len(right), n_cam - n_wrong), replace=False))
            pick = [int(i) for i in pick]
            x = lm.batch_tensor([records[i].crop for i in pick], [meds[i] if meds else None for i in pick])
            cams, method = class_activation_maps(lm.net, x.to(lm.device))
            plot_cams(x[:, 0].numpy(), cams, y[pick].tolist(), pred[pick].tolist(), out / "cam.png", method)
            figures[f"Class activation heatmaps ({method})"] = "cam.png"
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        write_html(metrics, out / "report.html", figures)
        metrics["report"] = str(out / "report.html")
    return metrics

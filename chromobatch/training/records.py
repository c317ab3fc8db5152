"""Training/evaluation data: loading labelled crops, caching them preprocessed, the paired sampler, augmentation.

Sources: a folder of class sub-folders (DIR/<label>/*.png), a manifest CSV path,label[,patient,cell,split],
or in-memory records (`records_from_arrays`, for the database path). Every image is decoded once with
`imaging.load_chromosome` (greyscale, dark-on-light, cropped, native scale) and kept in memory.

The sampler implements the paper's pairwise batches: every step gives B1 and B2 with class k at row k, and
B2[k] a different image of class k than B1[k] (its homolog from the same cell when the data knows cells).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from chromobatch import CLASSES, NUM_CLASSES, normalise_label
from chromobatch.csvio import HeaderError, read_table
from chromobatch.errors import DataError
from chromobatch.intake.imaging import ImageRejected, load_chromosome, normalise
from chromobatch.ml.preprocess import PreprocessSpec, chromosome_length, render

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg")
SPLITS = ("train", "val", "test")


@dataclass
class Record:
    """One labelled chromosome: a normalised crop (uint8, dark-on-light, native scale) and where it is from."""

    crop: np.ndarray
    label: int  # index into CLASSES
    patient: str = ""
    cell: str = ""
    split: str = ""
    source: str = ""  # file path or database id, for messages and the data fingerprint

    @property
    def cell_key(self) -> str:
        """Cells are unique within a patient; '' when the cell is unknown."""
        return f"{self.patient}/{self.cell}" if self.cell else ""


# ----------------------------------------------------------------------------------------------- loading


def _decode(path: Path, polarity: str) -> np.ndarray:
    crop, _ = load_chromosome(path, polarity)
    return crop


def _manifest_rows(manifest: Path) -> list[dict[str, str]]:
    try:
        text = manifest.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{manifest}: cannot read manifest: {exc}") from exc
    try:
        table = read_table(text, [("path", "label")])
    except HeaderError as exc:
        raise DataError(f"{manifest}: {exc}") from None
    if table.problems:
        raise DataError(f"{manifest}: {table.problems[0]}")
    return [row for _, row in table.rows]


def _folder_rows(folder: Path) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        try:
            label = normalise_label(sub.name)
        except ValueError:
            log.warning("ignoring folder %s: not a chromosome class name", sub)
            continue
        for f in sorted(sub.iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                rows.append({"path": str(f.relative_to(folder)), "label": label})
    if not rows:
        raise DataError(f"{folder}: no images in class sub-folders (expected {folder}/<1..22|X|Y>/*.png)")
    return rows


def load_records(
    data: str | Path,
    *,
    splits: Collection[str] | None = None,
    polarity: str = "auto",
) -> list[Record]:
    """Decode a class-folder tree or a manifest CSV into Records (each image decoded once).

    `splits` keeps only those rows of a manifest with a split column (nothing else is decoded); data
    without a split column is returned whole with split ''. Unreadable images are skipped with a warning
    naming the file; an unknown label or no usable image at all is a DataError.
    """
    path = Path(data)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        root, rows = path, _folder_rows(path)
    else:
        root, rows = path.parent, _manifest_rows(path)
    has_split = any(r.get("split") for r in rows)
    if splits is not None and has_split:
        wanted = set(splits)
        rows = [r for r in rows if r.get("split", "") in wanted]
    records: list[Record] = []
    skipped: list[str] = []
    for n, row in enumerate(rows, start=2):
        try:
            label = CLASSES.index(normalise_label(row["label"]))
        except ValueError as exc:
            raise DataError(f"{path}: row {n}: {exc}") from exc
        file = root / row["path"]
        try:
            crop = _decode(file, polarity)
        except (OSError, ImageRejected) as exc:
            skipped.append(f"{file}: {exc}")
            continue
        records.append(
            Record(
                crop=crop,
                label=label,
                patient=row.get("patient", ""),
                cell=row.get("cell", ""),
                split=row.get("split", ""),
                source=str(row["path"]),
            )
        )
    for msg in skipped[:10]:
        log.warning("skipped image %s", msg)
    if len(skipped) > 10:
        log.warning("... and %d more unusable images", len(skipped) - 10)
    if not records:
        raise DataError(f"{path}: no usable image" + (f" in split(s) {sorted(splits)}" if splits else ""))
    log.info("loaded %d chromosome images from %s (%d skipped)", len(records), path, len(skipped))
    return records


def records_from_arrays(
    crops: Sequence[np.ndarray],
    labels: Sequence[str | int],
    *,
    patients: Sequence[str] | None = None,
    cells: Sequence[str] | None = None,
    splits: Sequence[str] | None = None,
    sources: Sequence[str] | None = None,
    normalised: bool = True,
) -> list[Record]:
    """In-memory crops (e.g. from the database) -> Records. Labels are class names ('1'..'22','X','Y').

    Pass normalised=False for raw greyscale arrays; they then go through imaging.normalise like files do.
    """
    n = len(crops)
    for name, seq in (("labels", labels), ("patients", patients), ("cells", cells), ("splits", splits)):
        if seq is not None and len(seq) != n:
            raise DataError(f"records_from_arrays: {name} has {len(seq)} entries for {n} crops")
    out: list[Record] = []
    for i, crop in enumerate(crops):
        src = sources[i] if sources is not None else f"record {i}"
        try:
            label = CLASSES.index(normalise_label(labels[i]))
        except ValueError as exc:
            raise DataError(f"{src}: {exc}") from exc
        arr = np.asarray(crop)
        if not normalised:
            try:
                arr, _ = normalise(arr)
            except ImageRejected as exc:
                log.warning("skipped %s: %s", src, exc)
                continue
        if arr.ndim != 2 or arr.dtype != np.uint8 or min(arr.shape) < 1:
            raise DataError(f"{src}: expected a 2-D uint8 crop, got {arr.dtype} {arr.shape}")
        out.append(
            Record(
                crop=arr,
                label=label,
                patient=str(patients[i]) if patients is not None else "",
                cell=str(cells[i]) if cells is not None else "",
                split=str(splits[i]) if splits is not None else "",
                source=src,
            )
        )
    return out


def split_records(
    records: Sequence[Record], *, val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[Record], list[Record]]:
    """(train, val). A split column is honoured; otherwise whole cells (or patients) go to val by hash.

    Grouping by cell keeps a cell's homologs on one side, so validation measures new cells, not new crops.
    """
    if any(r.split for r in records):
        train = [r for r in records if r.split in ("train", "")]
        val = [r for r in records if r.split == "val"]
        return train, val
    rng = np.random.default_rng(seed)
    groups = sorted({r.cell_key or r.patient or r.source for r in records})
    order = rng.permutation(len(groups))
    n_val = max(1, int(round(val_fraction * len(groups)))) if len(groups) > 1 else 0
    val_groups = {groups[i] for i in order[:n_val]}
    train = [r for r in records if (r.cell_key or r.patient or r.source) not in val_groups]
    val = [r for r in records if (r.cell_key or r.patient or r.source) in val_groups]
    return train, val


def data_fingerprint(records: Iterable[Record]) -> dict[str, Any]:
    """A cheap identity of a training set for model.json: sha256 over (source, label, split) and counts."""
    h = hashlib.sha256()
    counts: Counter[str] = Counter()
    splits: Counter[str] = Counter()
    n = 0
    for r in sorted(records, key=lambda r: (r.source, r.label, r.split)):
        h.update(f"{r.source}\t{r.label}\t{r.split}\t{r.crop.shape}\n".encode())
        counts[CLASSES[r.label]] += 1
        splits[r.split or "-"] += 1
        n += 1
    return {
        "sha256": h.hexdigest(),
        "n": n,
        "per_class": {c: counts.get(c, 0) for c in CLASSES},
        "per_split": dict(splits),
    }


def cell_median_lengths(records: Sequence[Record]) -> list[float | None]:
    """Per record, the median chromosome length of its cell (None when the cell is unknown)."""
    by_cell: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if r.cell_key:
            by_cell[r.cell_key].append(chromosome_length(r.crop))
    med = {k: float(np.median(v)) for k, v in by_cell.items()}
    return [med.get(r.cell_key) if r.cell_key else None for r in records]


# ------------------------------------------------------------------------------------------ preparation


@dataclass
class PreparedSet:
    """Records preprocessed once: uint8 canvases (N, S, S) + labels + cell keys."""

    images: torch.Tensor
    labels: torch.Tensor
    cells: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def prepare(records: Sequence[Record], spec: PreprocessSpec) -> PreparedSet:
    """Run `preprocess.render` on every record (cell mode uses each record's cell median length)."""
    meds = cell_median_lengths(records) if spec.mode == "cell" else [None] * len(records)
    images = np.empty((len(records), spec.input_size, spec.input_size), dtype=np.uint8)
    for i, (r, m) in enumerate(zip(records, meds, strict=True)):
        images[i] = render(r.crop, spec, m)
    return PreparedSet(
        images=torch.from_numpy(images),
        labels=torch.tensor([r.label for r in records], dtype=torch.long),
        cells=[r.cell_key for r in records],
    )


# --------------------------------------------------------------------------------------------- sampler


class PairSampler:
    """Yields (idx1, idx2): NUM_CLASSES indices each, row k of class k, idx2[k] != idx1[k] where possible."""

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        cells: Sequence[str] | None = None,
        *,
        seed: int = 0,
        num_classes: int = NUM_CLASSES,
        prefer_homolog: bool = True,
    ) -> None:
        lab = np.asarray(labels, dtype=np.int64)
        self.num_classes = num_classes
        self.by_class = [np.flatnonzero(lab == k) for k in range(num_classes)]
        missing = [CLASSES[k] if k < len(CLASSES) else str(k) for k, ix in enumerate(self.by_class) if ix.size == 0]
        if missing:
            raise DataError(f"training data has no image of class(es) {', '.join(missing)}: every batch needs all")
        singles = [CLASSES[k] for k, ix in enumerate(self.by_class) if ix.size == 1 and k < len(CLASSES)]
        if singles:
            log.warning("class(es) %s have one training image: B2 repeats it (augmented differently)", singles)
        self.cells = list(cells) if cells is not None else [""] * len(lab)
        self.by_cell_class: dict[tuple[str, int], np.ndarray] = {}
        if prefer_homolog:
            groups: dict[tuple[str, int], list[int]] = defaultdict(list)
            for i, (c, k) in enumerate(zip(self.cells, lab, strict=True)):
                if c:
                    groups[(c, int(k))].append(i)
            self.by_cell_class = {key: np.asarray(v) for key, v in groups.items() if len(v) > 1}
        self.rng = np.random.default_rng(seed)

    def _other(self, pool: np.ndarray, a: int) -> int:
        """A uniformly random element of pool other than a (pool contains a and has >= 2 elements)."""
        pos = int(np.flatnonzero(pool == a)[0])
        r = int(self.rng.integers(len(pool) - 1))
        return int(pool[r + 1 if r >= pos else r])

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        i1 = np.empty(self.num_classes, dtype=np.int64)
        i2 = np.empty(self.num_classes, dtype=np.int64)
        for k, pool in enumerate(self.by_class):
            a = int(pool[self.rng.integers(len(pool))])
            homologs = self.by_cell_class.get((self.cells[a], k))
            if homologs is not None:
                b = self._other(homologs, a)
            elif len(pool) > 1:
                b = self._other(pool, a)
            else:
                b = a
            i1[k], i2[k] = a, b
        return i1, i2

    def get_state(self) -> dict[str, Any]:
        return dict(self.rng.bit_generator.state)

    def set_state(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state


# ---------------------------------------------------------------------------------------- augmentation


@dataclass(frozen=True)
class AugmentConfig:
    """The paper's perturbations (rotation, flips, contrast) plus scale jitter, as batched tensor ops."""

    # Karyogram crops (g612) are near upright: +-15 degrees trains far faster than any orientation (measured,
    # docs/results.md); use 180 for crops in metaphase orientation (bioimlab).
    rotate_deg: float = 15.0
    hflip: float = 0.5
    vflip: float = 0.5
    scale_jitter: float = 0.15  # zoom factor drawn log-uniformly in [1/(1+j), 1+j]
    translate: float = 0.04  # fraction of the canvas
    gamma_range: tuple[float, float] = (0.7, 1.4)
    gain_range: tuple[float, float] = (0.75, 1.15)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


def augment(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Randomly perturb a float batch (B, 1, S, S) in ink convention (background 0), each sample on its own.

    One affine grid_sample does rotation + flips + scale + shift; contrast is a per-sample gamma and gain.
    Runs wherever x lives (GPU when training there); the generator must be on x's device.
    """
    b = x.shape[0]
    dev = x.device

    def u(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(b, device=dev, generator=generator) * (hi - lo) + lo

    angle = u(-cfg.rotate_deg, cfg.rotate_deg) * (math.pi / 180.0)
    j = math.log1p(cfg.scale_jitter)
    zoom = torch.exp(u(-j, j))
    fx = torch.where(u(0, 1) < cfg.hflip, -1.0, 1.0)
    fy = torch.where(u(0, 1) < cfg.vflip, -1.0, 1.0)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0] = cos * fx
    theta[:, 0, 1] = -sin * fy
    theta[:, 1, 0] = sin * fx
    theta[:, 1, 1] = cos * fy
    theta[:, 0, 2] = u(-cfg.translate, cfg.translate) * 2
    theta[:, 1, 2] = u(-cfg.translate, cfg.translate) * 2
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    gamma = torch.exp(u(math.log(cfg.gamma_range[0]), math.log(cfg.gamma_range[1]))).view(b, 1, 1, 1)
    gain = u(*cfg.gain_range).view(b, 1, 1, 1)
    return (out.clamp(min=0.0) ** gamma * gain).clamp_(0.0, 1.0).to(x.dtype)

"""The case pipeline: ingest + predict + karyotype-aware assignment + summary, in one transaction per case.

`process_case` is what `chromobatch process` and the watcher's workers call. A kill at any moment leaves
either the whole case (chromosomes, predictions, summary, the job marked done) or none of it; running it
again on the same content with the same model is a no-op unless `force`.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from chromobatch import CLASSES
from chromobatch.config import Settings
from chromobatch.errors import InputError, JobError
from chromobatch.intake.imaging import decode_png
from chromobatch.intake.ingest import raise_if_empty, store_in_session
from chromobatch.intake.scan import Mapper, ScannedCase, cell_of_rejected, scan_case
from chromobatch.karyotype.assign import assign_cell
from chromobatch.karyotype.iscn import cell_karyotype, summarise
from chromobatch.ml.predict import Predictor
from chromobatch.ml.preprocess import chromosome_length
from chromobatch.ml.sizeprior import ink, relative_inks
from chromobatch.ml.sizeprior import inks as crop_inks  # the pool's chunk function
from chromobatch.segment.base import Segmenter
from chromobatch.segment.cut import cut_case
from chromobatch.service.reports import render_and_record
from chromobatch.store.db import Case, Cell, Chromosome, Database, Job, ModelVersion, Prediction, RejectedFile, utcnow
from chromobatch.store.states import CaseStatus, JobState

__all__ = ["ProcessResult", "process_case"]

log = logging.getLogger(__name__)


@dataclass
class ProcessResult:
    case_id: str
    status: str  # done | skipped
    n_chromosomes: int = 0
    n_cells: int = 0
    karyotype: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    report_path: Path | None = None
    rejected: dict[str, str] = field(default_factory=dict)


def _cell_references(s: Session, scanned: ScannedCase, predictor: Predictor) -> tuple[dict[str, float],
                                                                                    dict[str, float]]:
    """Over everything each cell holds (stored earlier and in the folder): per cell, the median chromosome
    length (cell-mode preprocessing); per chromosome sha256, its log ink relative to its cell (the model's
    size prior, `sizeprior.relative_inks`). Each is {} when the model does not need it."""
    want_length = predictor.model.spec.mode == "cell"
    prior = predictor.model.size_prior
    if not (want_length or prior is not None):
        return {}, {}
    lengths: dict[str, dict[str, float]] = defaultdict(dict)
    inks: dict[str, dict[str, float]] = defaultdict(dict)
    in_folder = {a.sha256 for a in scanned.accepted}
    measured = predictor.renderer.map(crop_inks, [a.crop for a in scanned.accepted]) if prior is not None else []
    for k, a in enumerate(scanned.accepted):
        lengths[a.cell][a.sha256] = chromosome_length(a.crop)
        if prior is not None:
            inks[a.cell][a.sha256] = measured[k]
    rows = (s.query(Cell.name, Chromosome.id, Chromosome.sha256, Chromosome.width, Chromosome.height)
            .join(Chromosome, Chromosome.cell_id == Cell.id).join(Case, Case.id == Cell.case_pk)
            .filter(Case.case_id == scanned.case_id))
    stored_elsewhere: dict[int, tuple[str, str]] = {}
    for cell, chrom_id, sha, w, h in rows:
        if sha not in in_folder:
            lengths[cell][sha] = float(max(w, h))
            stored_elsewhere[chrom_id] = (cell, sha)
    if prior is not None and stored_elsewhere:  # stored earlier, not in this folder: measure the stored crops
        for chrom_id, png in s.query(Chromosome.id, Chromosome.crop_png).filter(
                Chromosome.id.in_(list(stored_elsewhere))):
            cell, sha = stored_elsewhere[chrom_id]
            inks[cell][sha] = ink(decode_png(png))
    median_lengths = {cell: float(np.median(list(v.values()))) for cell, v in lengths.items()} if want_length else {}
    rel_by_sha: dict[str, float] = {}
    if prior is not None:
        for cell, by_sha in inks.items():
            rel_by_sha.update(zip(by_sha, relative_inks(list(by_sha.values()), [cell] * len(by_sha),
                                                        prior.min_cell), strict=True))
    return median_lengths, rel_by_sha


@dataclass
class _Stored:
    """A crop of an earlier delivery that this model has not predicted yet (or `force`)."""

    sha256: str
    cell: str
    crop_png: bytes
    length: int  # max(width, height): the cell-mode median the write transaction would use


def _stored_to_predict(s: Session, scanned: ScannedCase, predictor: Predictor, force: bool
                       ) -> tuple[list[_Stored], dict[str, list[int]]]:
    """Crops stored by earlier deliveries that need this model's prediction, and every stored crop's length by
    cell; read here so that the forward pass runs before the write transaction, not inside it."""
    in_folder = {a.sha256 for a in scanned.accepted}
    q = (select(Chromosome.id, Chromosome.sha256, Cell.name, Chromosome.width, Chromosome.height)
         .join(Cell, Cell.id == Chromosome.cell_id).join(Case, Case.id == Chromosome.case_pk)
         .where(Case.case_id == scanned.case_id))
    lengths: dict[str, list[int]] = defaultdict(list)
    wanted: dict[int, tuple[str, str, int]] = {}
    done: set[int] = set() if force else {cid for (cid,) in s.execute(
        select(Prediction.chromosome_id).join(Chromosome, Chromosome.id == Prediction.chromosome_id)
        .join(Case, Case.id == Chromosome.case_pk)
        .where(Case.case_id == scanned.case_id, Prediction.model_version_id == predictor.version_id))}
    for chrom_id, sha, cell, w, h in s.execute(q):
        if sha in in_folder:
            continue
        lengths[cell].append(max(w, h))
        if chrom_id not in done:
            wanted[chrom_id] = (sha, cell, max(w, h))
    if not wanted:
        return [], lengths
    stored = [_Stored(wanted[cid][0], wanted[cid][1], png, wanted[cid][2]) for cid, png in
              s.execute(select(Chromosome.id, Chromosome.crop_png).where(Chromosome.id.in_(list(wanted))))]
    return stored, lengths


def _predict_stored(earlier: tuple[list[_Stored], dict[str, list[int]]], scanned: ScannedCase,
                    predictor: Predictor, rel_inks: dict[str, float]) -> dict[str, np.ndarray]:
    """Probabilities for the crops of earlier deliveries, with the same inputs the write transaction used to
    give them: the cell's median max(width, height) over everything it holds, and its relative ink."""
    stored, lengths = earlier
    if not stored:
        return {}
    for a in scanned.accepted:
        lengths[a.cell].append(max(a.crop.shape))
    use_cell = predictor.model.spec.mode == "cell"
    medians = [float(np.median(lengths[x.cell])) if use_cell else None for x in stored]
    probs = predictor.predict([decode_png(x.crop_png) for x in stored], medians,
                              [rel_inks.get(x.sha256, math.nan) for x in stored] if rel_inks else None)
    return {x.sha256: p for x, p in zip(stored, probs, strict=True)}


def _already_done(s: Session, scanned: ScannedCase, predictor: Predictor) -> Case | None:
    case = s.query(Case).filter_by(case_id=scanned.case_id).one_or_none()
    if case is None or case.status != CaseStatus.DONE or case.model_version_id != predictor.version_id:
        return None
    stored = {sha for (sha,) in s.query(Chromosome.sha256).filter(Chromosome.case_pk == case.id)}
    return case if {a.sha256 for a in scanned.accepted} <= stored else None


def _finish_job(s: Session, job_id: int | None, worker: str | None) -> None:
    """Mark the job done in the results' transaction, only if it is still ours (else roll everything back)."""
    if job_id is None:
        return
    job = s.get(Job, job_id, with_for_update=s.get_bind().dialect.name == "postgresql")
    if job is None or job.state != JobState.RUNNING or (worker is not None and job.worker != worker):
        raise JobError(f"job {job_id} was taken over by another worker; this worker's results are discarded")
    job.state, job.finished_at, job.error = JobState.DONE, utcnow(), None


def cut_metaphases(database: Database, scanned: ScannedCase, settings: Settings,
                   segmenter: Segmenter | None = None) -> None:
    """Whole metaphases of a scanned case into chromosome crops, before any transaction (a kill here stores
    nothing). A metaphase stored by an earlier run is not segmented again, so a re-run adds nothing."""
    mixed = scanned.mixed_kinds()
    if mixed is not None:
        raise InputError(f"case {scanned.case_id} mixes chromosome crops ({mixed[0]}) and whole metaphase images "
                         f"({mixed[1]})", hint="Deliver one kind per case folder, or write 'crops' or 'metaphase' "
                         "in the case folder's input.txt.")
    if not scanned.metaphases:
        return
    with database.session() as s:
        stored = {str(sha) for (sha,) in s.execute(
            select(Cell.source_sha256).join(Case, Case.id == Cell.case_pk)
            .where(Case.case_id == scanned.case_id, Cell.source_sha256.is_not(None)))}
    if any(m.sha256 not in stored for m in scanned.metaphases):  # load a segmenter only for work to do
        cut_case(scanned, segmenter or default_segmenter(settings.segmenter), stored=stored)


@functools.lru_cache(maxsize=4)
def default_segmenter(name: str) -> Segmenter:
    """The segmenter a setting names, loaded once per process (a watcher's worker keeps it)."""
    from chromobatch.segment.factory import DEFAULT_DIR, load_segmenter  # torch only when a metaphase comes

    if not name:
        name = "default" if (DEFAULT_DIR / "model.safetensors").is_file() else "classical"
    # One thread: the compact U-Net gains little from a second core and loses much when the cores are shared
    # (0.56-0.61 s per 768 x 576 image on one thread, up to 10x slower on two under load; models/segmenter).
    segmenter = load_segmenter(name, threads=1)
    log.info("segmenter for whole metaphases: %s %s", segmenter.name, segmenter.version)
    return segmenter


def scan_input(database: Database, case_dir: Path, settings: Settings, segmenter: Segmenter | None = None,
               mapper: Mapper | None = None) -> ScannedCase:
    """A case folder read and checked (scan, then whole metaphases cut into crops), before any transaction;
    what `process_case` takes as `scanned`. Callers that load a model check the input with it first.
    mapper: reads the files across processes (the predictor's pool, `RenderPool.map`)."""
    scanned = scan_case(Path(case_dir), polarity=settings.polarity, max_pixels=settings.max_image_pixels,
                        input_kind=settings.input, mapper=mapper)
    cut_metaphases(database, scanned, settings, segmenter)
    return scanned


def process_case(database: Database, case_dir: Path, *, predictor: Predictor, settings: Settings,
                 force: bool = False, job_id: int | None = None, job_worker: str | None = None,
                 reports_dir: Path | None = None, segmenter: Segmenter | None = None,
                 scanned: ScannedCase | None = None) -> ProcessResult:
    """Process one case folder; a bad case raises a ChromobatchError (its rejections are recorded first).

    job_id/job_worker: the watcher's claimed job, marked done in the same transaction as the results.
    segmenter: for whole metaphase images (default: the one `settings.segmenter` names).
    scanned: the folder already scanned and its metaphases cut (`service.batching`, which predicts several
    waiting cases in one pass); None: scanned here.
    """
    t0 = time.perf_counter()
    if scanned is None:
        scanned = scan_input(database, case_dir, settings, segmenter, mapper=predictor.renderer.map)
    predictor = predictor.for_polarity(scanned.meta.get("polarity"))  # the model of the case's stain
    for file, reason in sorted(scanned.rejected.items()):
        log.warning("case %s: file not used: %s: %s", scanned.case_id, file, reason)
    t_scan = time.perf_counter()
    with database.session() as s:
        done = None if force else _already_done(s, scanned, predictor)
        if done is not None:
            store_in_session(s, scanned, status=CaseStatus.DONE)  # a corrected labels.csv or new rejections still count
            _finish_job(s, job_id, job_worker)
            _log_label_problems(scanned)
            log.info("case %s: already processed with this model and content; skipped", scanned.case_id)
            return ProcessResult(case_id=scanned.case_id, status="skipped", karyotype=done.karyotype,
                                 rejected=dict(scanned.rejected))
        medians, rel_inks = _cell_references(s, scanned, predictor)
        earlier = _stored_to_predict(s, scanned, predictor, force)
    probs = predictor.predict([a.crop for a in scanned.accepted],
                              [medians.get(a.cell) for a in scanned.accepted] if medians else None,
                              [rel_inks[a.sha256] for a in scanned.accepted] if rel_inks else None)
    by_sha = {a.sha256: p for a, p in zip(scanned.accepted, probs, strict=True)}
    by_sha.update(_predict_stored(earlier, scanned, predictor, rel_inks))
    t_predict = time.perf_counter()
    with database.session() as s:
        ingest = store_in_session(s, scanned, status=CaseStatus.PROCESSING)
        if ingest.added + ingest.already_stored == 0:
            _fail_case(s, ingest.case_pk, "no valid chromosome image in the case")
        else:
            result = _predict_and_summarise(s, ingest.case_pk, predictor, settings, by_sha, force, rel_inks)
            _finish_job(s, job_id, job_worker)
    _log_label_problems(scanned)
    if ingest.added + ingest.already_stored == 0:
        raise_if_empty(ingest, scanned)
    t_commit = time.perf_counter()
    result.rejected = dict(scanned.rejected)
    if reports_dir is not None:
        result.report_path = render_and_record(database, result.case_id, Path(reports_dir))
    t_end = time.perf_counter()
    result.timings = {"scan": t_scan - t0, "predict": t_predict - t_scan, "store": t_commit - t_predict,
                      "report": t_end - t_commit, "total": t_end - t0}
    # The watcher logs its own line per case (with the job); a direct call logs here.
    log.log(logging.DEBUG if job_id is not None else logging.INFO,
            "case %s: %d chromosomes in %d cells, %s, %.2fs (scan %.2f, predict %.2f, store %.2f, report %.2f)",
             result.case_id, result.n_chromosomes, result.n_cells, result.karyotype, result.timings["total"],
             result.timings["scan"], result.timings["predict"], result.timings["store"], result.timings["report"])
    return result


def _log_label_problems(scanned: ScannedCase) -> None:
    """After storing: the import adds the labels.csv rows that name no stored chromosome."""
    for problem in scanned.label_problems:
        log.warning("case %s: %s", scanned.case_id, problem)


def _files_not_used(s: Session, case_pk: int, cell_names: set[str]) -> tuple[dict[str, list[str]], int]:
    """The case's rejected files (this delivery's and earlier ones') by cell, and how many belong to none."""
    by_cell: dict[str, list[str]] = defaultdict(list)
    unplaced = 0
    for (file,) in s.query(RejectedFile.source_file).filter(RejectedFile.case_pk == case_pk).order_by(
            RejectedFile.source_file):
        cell = cell_of_rejected(file, cell_names)
        if cell is None:
            unplaced += 1
        else:
            by_cell[cell].append(file)
    return by_cell, unplaced


def _fail_case(s: Session, case_pk: int, error: str) -> None:
    case = s.get(Case, case_pk)
    if case is not None:
        case.status, case.error = CaseStatus.FAILED, error


def _predict_and_summarise(s: Session, case_pk: int, predictor: Predictor, settings: Settings,
                           by_sha: dict[str, np.ndarray], force: bool, rel_inks: dict[str, float]) -> ProcessResult:
    """rel_inks: `_cell_references`'s log relative ink per chromosome sha256 ({} when the model has no size
    prior); it already covers the crops stored by earlier deliveries, so they are not measured again here."""
    case = s.get(Case, case_pk)
    assert case is not None
    version = s.get(ModelVersion, predictor.version_id)
    cells = s.query(Cell).filter(Cell.case_pk == case_pk).order_by(Cell.index).all()
    existing = {p.chromosome_id: p for p in s.query(Prediction).join(Chromosome)
                .filter(Chromosome.case_pk == case_pk, Prediction.model_version_id == predictor.version_id)}
    cell_results = []
    new_rows: list[dict[str, Any]] = []  # one multi-row INSERT for the case, as ingest does for its chromosomes
    n_total = 0
    not_used, unplaced = _files_not_used(s, case_pk, {c.name for c in cells if c.chromosomes})
    for cell in cells:
        chroms = list(cell.chromosomes)
        if not chroms:
            continue
        missing = [c for c in chroms if c.sha256 not in by_sha and (force or c.id not in existing)]
        if missing:  # stored by a delivery that committed while this one predicted: predict them here
            med = float(np.median([max(c.width, c.height) for c in chroms]))
            use_cell = predictor.model.spec.mode == "cell"
            probs_missing = predictor.predict([decode_png(c.crop_png) for c in missing],
                                              [med if use_cell else None] * len(missing),
                                              [rel_inks.get(c.sha256, math.nan) for c in missing] if rel_inks else None)
            for c, p in zip(missing, probs_missing, strict=True):
                by_sha[c.sha256] = p
        probs = np.stack([by_sha[c.sha256] if (c.sha256 in by_sha and (force or c.id not in existing))
                          else np.asarray(existing[c.id].probabilities, dtype=np.float32) for c in chroms])
        # An object kept whole because it holds several chromosomes (a cluster of a whole metaphase) is
        # predicted and stored for review, but takes no karyotype slot: its cell is marked instead.
        clustered = [int((c.flags or {}).get("cluster", 0)) for c in chroms]
        singles = [i for i, n in enumerate(clustered) if n <= 1]
        assignment = assign_cell(probs[singles], gain_penalty=settings.gain_penalty,
                                 loss_penalty=settings.loss_penalty)
        assigned: list[str | None] = [None] * len(chroms)
        changes = [False] * len(chroms)
        for i, slot, moved in zip(singles, assignment.labels, assignment.changed, strict=True):
            assigned[i], changes[i] = slot, moved
        kt = cell_karyotype(cell.name, assignment.labels)
        kt.files_not_used = len(not_used.get(cell.name, ()))
        kt.clustered = sum(n for n in clustered if n > 1)
        abnormal = set(kt.gains) | set(kt.losses)
        for c, p, label, changed in zip(chroms, probs, assigned, changes, strict=True):
            raw = CLASSES[int(np.argmax(p))]
            conf = float(np.max(p))
            flags = []
            if label is None:
                flags.append("cluster")
            elif conf < settings.low_confidence:
                flags.append("low_confidence")
            if label in abnormal or (label in ("X", "Y") and kt.sex not in ("XX", "XY")):
                flags.append("count_anomaly")
            if changed:
                flags.append("reassigned")
            values = {"label": raw, "assigned_label": label, "confidence": conf,
                      "probabilities": [round(float(x), 6) for x in p], "flags": flags}
            row = existing.get(c.id)
            if row is None:
                new_rows.append({"chromosome_id": c.id, "model_version_id": predictor.version_id, **values})
            else:  # the same model again (force, or a delivery that added to the case): updated in place
                for key, value in values.items():
                    setattr(row, key, value)
        cell_results.append(kt)
        n_total += len(chroms)
    if new_rows:
        s.execute(insert(Prediction), new_rows)
    summary: dict[str, Any] = summarise(cell_results, case_files_not_used=unplaced)
    counted = {c.name: c.count for c in cells if c.count is not None}
    for entry in summary["cells"]:
        entry["flags"] = ["count_anomaly"] if entry["count"] != 46 else []
        if entry["cell"] in counted:  # a whole metaphase: the chromosomes counted in it, clusters estimated
            entry["counted"] = counted[entry["cell"]]
            entry["flags"] = ["count_anomaly"] if entry["counted"] != 46 else []
        if entry.get("clustered"):
            entry["flags"].append("cluster")
        if entry["files_not_used"]:
            entry["flags"].append("incomplete_input")
            entry["rejected_files"] = not_used[entry["cell"]]
    summary["model"] = {"name": version.name if version else None, "version": version.version if version else None,
                        "sha256": predictor.sha256, "stain": predictor.stain.value}
    case.summary = summary
    case.karyotype = summary["karyotype"]
    case.status, case.error, case.processed_at = CaseStatus.DONE, None, utcnow()
    case.report_attempts, case.report_next_at, case.report_error = 0, None, None  # a new report is due
    case.model_version_id = predictor.version_id
    return ProcessResult(case_id=case.case_id, status="done", n_chromosomes=n_total, n_cells=len(cell_results),
                         karyotype=case.karyotype)

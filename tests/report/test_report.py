"""Karyogram reports: PDF content, layout (every chromosome exactly once, one scale), review, DICOM, CLI."""

from __future__ import annotations

import functools
import hashlib
import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import chromosome_array, write_png
from PIL import Image
from pypdf import PdfReader
from typer.testing import CliRunner

from chromobatch import CLASSES, __version__
from chromobatch.cli.main import app
from chromobatch.errors import CaseNotFound
from chromobatch.files import current_umask
from chromobatch.intake.imaging import encode_png, normalise
from chromobatch.intake.scan import cell_of_rejected
from chromobatch.ml.geometry import upright
from chromobatch.report.dicom import ENCAPSULATED_PDF_STORAGE
from chromobatch.report.layout import KARYOGRAM_SIZE, abnormal_classes
from chromobatch.report.pdf import REVIEW_STATEMENT
from chromobatch.report.render import render_case_report
from chromobatch.report.view import load_case_view
from chromobatch.store import db

TRISOMY21 = sorted([c for c in CLASSES[:22] for _ in range(2)] + ["21", "X", "Y"], key=CLASSES.index)
NORMAL_XX = sorted([c for c in CLASSES[:22] for _ in range(2)] + ["X", "X"], key=CLASSES.index)
DICOM_META = {"PatientID": "FAKE-0042", "PatientName": "DOE^JANE", "PatientBirthDate": "19800101",
              "PatientSex": "M", "AccessionNumber": "ACC-77", "StudyDate": "20261126",
              "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.77"}
MODEL_SHA = hashlib.sha256(b"model").hexdigest()


@functools.cache
def _cell_crops(labels: tuple[str, ...], seed: int) -> tuple[np.ndarray, ...]:
    """Synthetic crops from the ideogram (random angles, so rotation is exercised); cached across tests."""
    rng = np.random.default_rng(seed)
    try:
        from chromobatch.synth.render import render_chromosome
    except ImportError:  # fall back to plain banded rods of ISCN-like lengths, tilted
        rods = []
        for k, lab in enumerate(labels):
            length = int(110 * (1.0 - 0.8 * CLASSES.index(lab) / 23))
            img = Image.fromarray(chromosome_array(length, 12, canvas=length + 40, seed=seed * 100 + k))
            rods.append(np.asarray(img.rotate(float(rng.uniform(0, 180)), fillcolor=245)))
        return tuple(normalise(r)[0] for r in rods)
    return tuple(normalise(render_chromosome(lab, rng))[0] for lab in labels)


def _add_case(database: db.Database, case_id: str = "CASE123", *, cells: list[list[str]] | None = None,
              dicom: bool = True, predicted: bool = True, low: tuple[int, ...] = (3,)) -> dict[str, list[int]]:
    """A case with cells of the given true labels; predictions equal the truth. Returns cell -> chromosome ids."""
    cells = cells if cells is not None else [TRISOMY21, TRISOMY21]
    ids: dict[str, list[int]] = {}
    with database.session() as s:
        mv = s.query(db.ModelVersion).filter_by(name="supcon-r18").one_or_none()
        if mv is None:
            mv = db.ModelVersion(name="supcon-r18", version="2026.11.1", backbone="resnet18", file="m",
                                 sha256=MODEL_SHA, status="active")
            s.add(mv)
            s.flush()
        case = db.Case(case_id=case_id, source_path="/in/" + case_id, status="done" if predicted else "ingested",
                       input_format="dicom" if dicom else "images", meta={"dicom": dict(DICOM_META)} if dicom else {})
        s.add(case)
        s.flush()
        summary_cells = []
        for c, labels in enumerate(cells):
            cell = db.Cell(case_pk=case.id, name=f"cell{c + 1:02d}", index=c)
            s.add(cell)
            s.flush()
            ids[cell.name] = []
            for k, (lab, crop) in enumerate(zip(labels, _cell_crops(tuple(labels), c), strict=True)):
                png = encode_png(crop)
                chrom = db.Chromosome(case_pk=case.id, cell_id=cell.id, source_file=f"{cell.name}/c{k:02d}.dcm",
                                      sha256=hashlib.sha256(png + bytes([c, k])).hexdigest(), width=crop.shape[1],
                                      height=crop.shape[0], polarity="dark_on_light", crop_png=png)
                s.add(chrom)
                s.flush()
                ids[cell.name].append(chrom.id)
                if predicted:
                    conf = 0.3 if k in low else 0.97
                    probs = [0.001] * len(CLASSES)
                    probs[CLASSES.index(lab)] = conf
                    flags = (["low_confidence"] if k in low else []) + (["count_anomaly"] if lab == "21" else [])
                    s.add(db.Prediction(chromosome_id=chrom.id, model_version_id=mv.id, label=lab,
                                        assigned_label=lab, confidence=conf, probabilities=probs, flags=flags))
            summary_cells.append({"cell": cell.name, "count": len(labels), "karyotype": "47,XY,+21",
                                  "gains": ["21"], "losses": [], "sex": "XY", "flags": ["count_anomaly"]})
        if predicted:
            case.summary = {"cells": summary_cells, "modal_number": 47, "karyotype": "47,XY,+21",
                            "findings": [f"trisomy 21 in {len(cells)}/{len(cells)} cells"],
                            "model": {"name": mv.name, "version": mv.version, "sha256": mv.sha256}}
            case.karyotype = "47,XY,+21"
            case.model_version_id = mv.id
            case.processed_at = db.utcnow()
    return ids


def _text(pdf: Path) -> list[str]:
    return [page.extract_text() for page in PdfReader(pdf).pages]


@pytest.fixture
def database(tmp_path: Path) -> db.Database:
    database = db.connect(tmp_path / "x.sqlite")
    yield database
    database.dispose()


def test_pdf_has_summary_and_one_page_per_cell(database: db.Database, tmp_path: Path) -> None:
    _add_case(database)
    result = render_case_report(database, "CASE123", tmp_path / "out" / "CASE123.pdf")
    reader = PdfReader(result.pdf)
    assert result.pages == len(reader.pages) == 3  # summary + 2 cells
    pages = _text(result.pdf)
    first = pages[0]
    for expected in ("CASE123", "47,XY,+21", "2026.11.1", "supcon-r18", MODEL_SHA, f"chromobatch {__version__}",
                     "FAKE-0042", "DOE, JANE", "1980-01-01", "ACC-77", DICOM_META["StudyInstanceUID"],
                     "trisomy 21 in 2/2 cells", "unreviewed", "Modal number"):
        assert expected in first, expected
    for n, text in enumerate(pages, start=1):
        assert f"page {n} of 3" in text
        assert REVIEW_STATEMENT in text.replace("\n", " ")
    assert "Cell 1 of 2 (cell01)" in pages[1] and "abnormal count: 21 (x3)" in pages[1]
    # karyogram pages are landscape, the summary portrait
    boxes = [(float(p.mediabox.width), float(p.mediabox.height)) for p in reader.pages]
    assert boxes[0][0] < boxes[0][1] and all(w > h for w, h in boxes[1:])
    assert result.pngs == []


def test_every_chromosome_placed_exactly_once_at_one_scale(database: db.Database, tmp_path: Path) -> None:
    ids = _add_case(database, cells=[TRISOMY21, NORMAL_XX])
    result = render_case_report(database, "CASE123", tmp_path / "r.pdf")
    width, height = KARYOGRAM_SIZE
    for number, (name, chrom_ids) in enumerate(ids.items(), start=1):
        placements = result.placements[number]
        assert sorted(p.chromosome_id for p in placements) == sorted(chrom_ids), name
        assert len({p.scale for p in placements}) == 1  # one scale for the whole cell
        for p in placements:
            assert 0 <= p.x and p.x + p.width <= width and 0 <= p.y and p.y + p.height <= height
        for i, a in enumerate(placements):  # no two chromosomes overlap
            for b in placements[i + 1:]:
                assert (a.x + a.width <= b.x or b.x + b.width <= a.x or a.y + a.height <= b.y
                        or b.y + b.height <= a.y), (a, b)
        slots = Counter(p.slot for p in placements)
        height_of = {s: np.mean([p.height for p in placements if p.slot == s]) for s in ("1", "21")}
        assert height_of["1"] > 2 * height_of["21"]  # a 1 looks bigger than a 21: no stretching to fit
        if name == "cell01":
            assert slots["21"] == 3 and slots["Y"] == 1
            assert all("abnormal_count" in p.marks for p in placements if p.slot == "21")
            assert sum("low_confidence" in p.marks for p in placements) == 1
        else:
            assert slots["21"] == 2 and slots["X"] == 2 and "Y" not in slots
            assert not any("abnormal_count" in p.marks for p in placements)
        # rows: 1-5 above 6-12+X above 13-18 above 19-22+Y
        base = {p.slot: p.y + p.height for p in placements}
        assert base["1"] == base["5"] < base["6"] == base["X"] < base["13"] == base["18"] < base["19"] == base["22"]


def test_png_files(database: db.Database, tmp_path: Path) -> None:
    _add_case(database, dicom=False)
    result = render_case_report(database, "CASE123", tmp_path / "pdf" / "rep.pdf", png_dir=tmp_path / "png",
                                cells=1)
    assert result.pages == 2 and result.dicom is None
    assert result.pngs == [tmp_path / "png" / "rep_cell1.png"]
    with Image.open(result.pngs[0]) as img:
        assert img.size == KARYOGRAM_SIZE and img.mode == "RGB"
    assert "2 (karyograms of the first 1 below)" in _text(result.pdf)[0]


def test_upright_turns_long_axis_vertical() -> None:
    rod = chromosome_array(60, 12, canvas=100, seed=3)
    tilted = np.asarray(Image.fromarray(rod).rotate(60, fillcolor=245, resample=Image.Resampling.BICUBIC))
    out, angle = upright(normalise(tilted)[0])
    assert out.shape[0] > 3 * out.shape[1]
    assert abs((angle % 180) - 120) < 4  # turned back by 60 degrees (or 240: upside-down is allowed)
    straight, angle = upright(normalise(rod)[0])
    assert angle in (0.0, 180.0) and straight.shape[0] > 3 * straight.shape[1]


def test_abnormal_classes() -> None:
    normal = Counter({c: 2 for c in CLASSES[:22]}) + Counter({"X": 1, "Y": 1})
    assert abnormal_classes(normal) == set()
    assert abnormal_classes(normal + Counter({"21": 1})) == {"21"}
    assert abnormal_classes(normal - Counter({"Y": 1})) == {"X"}  # 45,X
    assert abnormal_classes(normal + Counter({"X": 1})) == {"X"}  # 47,XXY
    assert abnormal_classes(normal + Counter({"Y": 1})) == {"Y"}  # 47,XYY
    assert abnormal_classes(Counter()) == set()


def test_reviewed_labels_and_reviewer_are_shown(database: db.Database, tmp_path: Path) -> None:
    ids = _add_case(database)
    relabelled = ids["cell01"][TRISOMY21.index("21")]  # one of the three 21s
    with database.session() as s:
        first = db.Label(chromosome_id=relabelled, label="13", source="reviewed", reviewer="Dr. Ada Lovelace")
        s.add(first)
        s.flush()
        s.add(db.Label(chromosome_id=relabelled, label="22", source="reviewed", reviewer="Dr. Ada Lovelace",
                       supersedes_id=first.id))  # the newest row wins
    result = render_case_report(database, "CASE123", tmp_path / "r.pdf")
    pages = [t.replace("\n", " ") for t in _text(result.pdf)]
    assert "reviewed by Dr. Ada Lovelace" in pages[0]
    assert "Karyotype from reviewed labels" in pages[0]
    assert "cell01/c40.dcm: 21 to 22" in pages[1] and "Labels: reviewed by Dr. Ada Lovelace" in pages[1]
    placed = {p.chromosome_id: p for p in result.placements[1]}
    assert placed[relabelled].slot == "22" and "changed_by_review" in placed[relabelled].marks
    slots = Counter(p.slot for p in result.placements[1])
    assert slots["21"] == 2 and slots["22"] == 3


def test_unprocessed_case_says_not_processed(database: db.Database, tmp_path: Path) -> None:
    _add_case(database, "RAW1", cells=[NORMAL_XX], dicom=False, predicted=False)
    result = render_case_report(database, "RAW1", reports_dir=tmp_path / "reports")
    assert result.pdf == tmp_path / "reports" / "RAW1.pdf" and result.dicom is None and result.pages == 2
    text = _text(result.pdf)
    assert "not processed" in text[0] and "Patient ID" in text[0] and "not provided" in text[0]
    assert "46 unclassified" in text[1]
    assert {p.slot for p in result.placements[1]} == {"unclassified"} and len(result.placements[1]) == 46


def test_encapsulated_pdf_round_trips(database: db.Database, tmp_path: Path) -> None:
    import pydicom

    _add_case(database)
    result = render_case_report(database, "CASE123", tmp_path / "CASE123.pdf")
    assert result.dicom == tmp_path / "CASE123.dcm"
    ds = pydicom.dcmread(result.dicom)
    assert ds.SOPClassUID == ENCAPSULATED_PDF_STORAGE == ds.file_meta.MediaStorageSOPClassUID
    assert ds.PatientID == "FAKE-0042" and str(ds.PatientName) == "DOE^JANE" and ds.PatientSex == "M"
    assert ds.StudyInstanceUID == DICOM_META["StudyInstanceUID"] and ds.AccessionNumber == "ACC-77"
    assert ds.StudyDate == "20261126" and ds.PatientBirthDate == "19800101"
    assert ds.Modality == "DOC" and ds.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert ds.ConversionType == "SD" and ds.BurnedInAnnotation == "YES" and ds.DocumentTitle
    assert ds.SeriesInstanceUID not in (ds.StudyInstanceUID, ds.SOPInstanceUID)
    pdf = result.pdf.read_bytes()
    doc = bytes(ds.EncapsulatedDocument)
    assert len(doc) % 2 == 0 and doc[:len(pdf)] == pdf and doc[len(pdf):] in (b"", b"\0")
    assert ds.EncapsulatedDocumentLength == len(pdf)
    assert len(PdfReader(io.BytesIO(doc[:ds.EncapsulatedDocumentLength])).pages) == result.pages


def test_unknown_case(database: db.Database, tmp_path: Path) -> None:
    with pytest.raises(CaseNotFound):
        render_case_report(database, "NOPE", tmp_path / "x.pdf")


def test_cli_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "cli.sqlite"
    database = db.connect(path)
    _add_case(database)
    database.dispose()
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    env = {"CHROMOBATCH_REPORTS_DIR": str(tmp_path / "reports")}
    result = runner.invoke(app, ["report", "CASE123", "--db", str(path), "--png", "--cells", "1"], env=env)
    assert result.exit_code == 0, result.output
    reports = tmp_path / "reports"
    for name in ("CASE123.pdf", "CASE123_cell1.png", "CASE123.dcm"):
        assert (reports / name).is_file() and str(reports / name) in result.output
    assert "(2 pages)" in result.output
    out = tmp_path / "elsewhere" / "k.pdf"
    result = runner.invoke(app, ["report", "CASE123", "--db", str(path), "--out", str(out)], env=env)
    assert result.exit_code == 0, result.output
    assert out.is_file() and (out.parent / "k.dcm").is_file() and not list(out.parent.glob("*.png"))

    result = runner.invoke(app, ["report", "NOPE", "--db", str(path)], env=env)
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: case 'NOPE' not found"] and "chromobatch status" in result.stderr


def _flat(text: str) -> str:
    """Whitespace normalised: pypdf breaks wrapped lines; the words stay in order."""
    return " ".join(text.split())


def test_rendering_streams_one_karyogram_at_a_time(database: db.Database, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory does not grow with the number of cells: no crops in the view, each cell's image gone before
    the next one is drawn, the PDF written to a temporary file next to the target (no leftovers)."""
    import gc
    import weakref

    from chromobatch.report import render as report
    from chromobatch.report.layout import Karyogram
    from chromobatch.report.view import CellView

    ids = _add_case(database, cells=[TRISOMY21, NORMAL_XX, TRISOMY21], dicom=False)
    view = load_case_view(database, "CASE123")
    assert all(c.crop is None for cell in view.all_cells for c in cell.chromosomes)
    alive: list[weakref.ref] = []
    layout = report.layout_karyogram

    def tracked(cell: CellView, **kw: object) -> Karyogram:
        gc.collect()
        assert not [r for r in alive if r() is not None], "an earlier cell's image or crops are still held"
        assert all(c.crop is not None for c in cell.chromosomes)
        kg = layout(cell, **kw)
        alive.append(weakref.ref(kg.image))
        alive.extend(weakref.ref(c.crop) for c in cell.chromosomes)
        return kg

    monkeypatch.setattr(report, "layout_karyogram", tracked)
    out = tmp_path / "out"
    result = render_case_report(database, "CASE123", out / "r.pdf", png_dir=tmp_path / "png")
    assert result.pages == len(PdfReader(result.pdf).pages) == 4
    assert sorted(p.chromosome_id for p in result.placements[3]) == sorted(ids["cell03"])
    assert len(result.pngs) == 3 and all(p.is_file() for p in result.pngs)
    assert sorted(out.iterdir()) == [out / "r.pdf"]  # no temporary PDF or page images left behind
    assert result.pdf.stat().st_mode & 0o777 == 0o666 & ~current_umask()  # atomic_write's rule, not mkstemp's


def test_cell_of_rejected() -> None:
    cells = {"cell01", "cell02"}
    assert cell_of_rejected("cell01/c03.png", cells) == "cell01"
    assert cell_of_rejected("cell02/sub/c03.png", cells) == "cell02"
    assert cell_of_rejected("cell09/c03.png", cells) is None  # every file of that cell rejected: no cell
    assert cell_of_rejected("c03.png", cells) is None  # flat file, no flat cell
    assert cell_of_rejected("c03.png", {"root"}) == "root"
    assert cell_of_rejected("root/c03.png", ["root", "x"]) == "root"
    assert cell_of_rejected("1.2.3.dcm", {"1.2.826.0.1.3680043.8.498.5"}) is None  # DICOM: series unknown


def test_files_not_used_none(database: db.Database, tmp_path: Path) -> None:
    _add_case(database, dicom=False)
    result = render_case_report(database, "CASE123", tmp_path / "r.pdf")
    text = _flat(_text(result.pdf)[0])
    assert "Files not used none" in text and "incomplete input" not in text


def test_files_not_used_of_a_case_processed_before(database: db.Database, tmp_path: Path) -> None:
    """Rejected rows but no "rejected_files" in the summary (processed before the pipeline recorded them):
    the report derives each file's cell itself, escapes the text and lists every file over several pages."""
    _add_case(database, cells=[TRISOMY21, TRISOMY21], dicom=False)
    many = [f"cell02/extra{i:03d}.png" for i in range(150)]
    with database.session() as s:
        case = s.query(db.Case).filter_by(case_id="CASE123").one()
        rows = {"cell01/c46.png": "truncated or corrupt image: <broken & cut> stream",
                "stray/x.png": "not an image Pillow can read", "notes.txt": "not a chromosome image"}
        rows.update({f: "blank image: no chromosome found" for f in many})
        for file, reason in rows.items():
            s.add(db.RejectedFile(case_pk=case.id, source_file=file, reason=reason))
    result = render_case_report(database, "CASE123", tmp_path / "r.pdf")
    pages = [_flat(t) for t in _text(result.pdf)]
    summary_pages, cell_pages = pages[:-2], pages[-2:]
    assert result.pages == len(pages) and len(summary_pages) >= 3  # the table runs over pages
    summary = " ".join(summary_pages)
    assert "Files not used" in summary and "153 file(s) of the case could not be used" in summary
    assert "cell01/c46.png cell01 truncated or corrupt image: <broken & cut> stream" in summary
    assert "stray/x.png cell unknown not an image Pillow can read" in summary
    assert "notes.txt cell unknown not a chromosome image" in summary
    assert all(f"{f} cell02 blank image" in summary for f in many)
    assert "incomplete input: 1 file(s) not used (cell01/c46.png)" in summary  # Cells table, Notes column
    assert "incomplete input: 150 file(s) not used (cell02/extra000.png, " in summary
    assert "Cell 1 of 2 (cell01)" in cell_pages[0]
    assert "incomplete input: 1 file(s) not used (cell01/c46.png)" in cell_pages[0]  # caption
    assert "incomplete input: 150 file(s) not used (cell02/extra000.png" in cell_pages[1]
    assert "and 140 more (see Files not used)" in cell_pages[1]


def test_truncated_crop_is_reported_not_silently_a_monosomy(simple_case: Path, tmp_path: Path,
                                                            tiny_model_dir: Path) -> None:
    """A real case with one truncated PNG: ingest rejects it, the report lists it with its reason and marks
    its cell as incomplete input (summary table and karyogram caption)."""
    from chromobatch.config import load_settings
    from chromobatch.registry.register import load_predictor
    from chromobatch.service.pipeline import process_case

    bad = simple_case / "cell01" / "c04.png"
    write_png(bad, chromosome_array(44, 10, seed=7))
    data = bad.read_bytes()
    bad.write_bytes(data[:len(data) // 2])
    database = db.connect(tmp_path / "real.sqlite")
    try:
        settings = load_settings({"model": str(tiny_model_dir)})
        process_case(database, simple_case, predictor=load_predictor(database, settings), settings=settings)
        with database.session() as s:
            (reason,) = [r.reason for r in s.query(db.RejectedFile).filter_by(source_file="cell01/c04.png")]
            n_cells = s.query(db.Cell).count()
        result = render_case_report(database, "CASE001", tmp_path / "r.pdf")
    finally:
        database.dispose()
    assert n_cells == 2 and reason
    pages = [_flat(t) for t in _text(result.pdf)]
    assert result.pages == len(pages) >= 3  # the summary (1 or 2 pages: a random model's findings), 2 cells
    summary, cell_pages = " ".join(pages[:-2]), pages[-2:]
    assert "Files not used" in summary and "Files not used none" not in summary
    assert f"cell01/c04.png cell01 {_flat(reason)}" in summary
    assert "incomplete input: 1 file(s) not used (cell01/c04.png)" in summary
    assert "Cell 1 of 2 (cell01)" in cell_pages[0]
    assert "incomplete input: 1 file(s) not used (cell01/c04.png)" in cell_pages[0]
    assert "Cell 2 of 2 (cell02)" in cell_pages[1]
    assert "incomplete input: " not in cell_pages[1].split("Cell 2 of 2 (cell02)", 1)[1]

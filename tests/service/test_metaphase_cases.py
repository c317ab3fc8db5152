"""Whole metaphase images in (issue 15): counted and classified cells from what a microscope delivers.

Real parts: synthetic G-band spreads (chromobatch.synth.metaphase) written as PNG files, real SQLite files,
the `chromobatch` CLI, and real `chromobatch watch` subprocesses (one killed with SIGKILL while it segments).
The shipped segmenter (models/segmenter) cuts the spreads, which have no touching or overlapping pairs and
no debris: these tests are about the flow (count, store, report, re-run, kill), the segmenter's accuracy on
crowded real spreads is measured in docs/results.md. The case-karyotype test uses the shipped classifier.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import Watcher, chromosome_array, write_png
from PIL import Image
from sqlalchemy import func, select
from typer.testing import CliRunner

from chromobatch.cli.main import app
from chromobatch.config import load_settings
from chromobatch.errors import InputError
from chromobatch.intake.scan import scan_case
from chromobatch.registry.register import load_predictor
from chromobatch.segment.cut import cut_metaphase
from chromobatch.segment.factory import load_segmenter
from chromobatch.service.pipeline import process_case
from chromobatch.store import db
from chromobatch.synth import metaphase as synth

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "models" / "default"
SEGMENTER = "default"


def spread(seed: int, karyotype: str = "46,XY", stain: str = "G") -> synth.Metaphase:
    """A spread to count exactly: a nucleus, no touching or overlapping pairs, no debris."""
    return synth.render_metaphase(np.random.default_rng(seed), karyotype=karyotype, stain=stain,
                                  overlap_rate=0.0, touch_rate=0.0, nuclei=1, debris=0, min_gap=3)


def metaphase_case(root: Path, name: str, cells: int = 3, *, seed: int = 0, karyotype: str = "46,XY",
                   folders: bool = False, ready: bool = False) -> tuple[Path, dict[str, int]]:
    """CASE/cellNN.png (or CASE/cellNN/metaphase.png); returns the case folder and the true count per cell."""
    case = root / name
    case.mkdir(parents=True)
    truth = {}
    for i in range(cells):
        m = spread(seed * 100 + i, karyotype)
        cell = f"cell{i + 1:02d}"
        path = case / cell / "metaphase.png" if folders else case / f"{cell}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(m.image).save(path)
        truth[cell] = m.count
    if ready:
        (case / "READY").touch()
    return case, truth


def counts(database: db.Database, case_id: str) -> dict[str, tuple[int | None, int]]:
    """Per cell: (the count stored on the cell, the chromosome rows it holds)."""
    with database.session() as s:
        rows = s.execute(select(db.Cell.name, db.Cell.count, func.count(db.Chromosome.id))
                         .join(db.Case, db.Case.id == db.Cell.case_pk)
                         .join(db.Chromosome, db.Chromosome.cell_id == db.Cell.id)
                         .where(db.Case.case_id == case_id).group_by(db.Cell.id)).all()
    return {name: (count, n) for name, count, n in rows}


def test_instances_become_upright_crops_with_their_own_identity() -> None:
    m = spread(7)
    grey = m.image  # G-band: already dark on light
    from chromobatch.intake.scan import Metaphase

    accepted, source = cut_metaphase(Metaphase("cell01.png", "cell01", "ab" * 32, grey, "dark_on_light"),
                                     load_segmenter(SEGMENTER))
    assert source.count == m.count == len(accepted) == 46
    assert len({a.sha256 for a in accepted}) == 46  # one file, 46 identities
    assert [a.instance for a in accepted] == list(range(1, 47))
    for a in accepted:
        x0, y0, x1, y1 = a.box or []
        assert 0 <= x0 < x1 <= grey.shape[1] and 0 <= y0 < y1 <= grey.shape[0]
        assert a.polygon and all(x0 - 1 <= x <= x1 and y0 - 1 <= y <= y1 for x, y in a.polygon)
        assert a.crop.shape[0] >= a.crop.shape[1] * 0.9  # turned upright: taller than wide (or about round)
        assert a.crop.min() < 200 and a.crop.max() == 255  # the chromosome, and neighbours masked white
    # every true chromosome is matched by one instance (IoU > 0.5 between boxes' masks)
    matched = 0
    for k in range(1, m.count + 1):
        truth = m.full_mask(k)
        for a in accepted:
            x0, y0, x1, y1 = a.box or []
            inter = truth[y0:y1, x0:x1].sum()
            if inter > 0.5 * truth.sum():
                matched += 1
                break
    assert matched == 46


def test_metaphase_case_is_counted_and_karyotyped_by_process(tmp_path: Path, sqlite_path: Path) -> None:
    """`chromobatch process` on whole metaphases only: 46 per cell, and the case karyotype of the spreads."""
    case, truth = metaphase_case(tmp_path / "in", "META1", cells=3, seed=1, karyotype="46,XY")
    env = {"CHROMOBATCH_SEGMENTER": SEGMENTER, "CHROMOBATCH_DEVICE": "cpu"}
    result = CliRunner().invoke(app, ["process", str(case), "--db", str(sqlite_path), "--model", str(SHIPPED),
                                      "--reports", str(tmp_path / "reports")], env=env)
    assert result.exit_code == 0, result.output
    database = db.connect(sqlite_path)
    got = counts(database, "META1")
    assert got == {cell: (n, n) for cell, n in truth.items()}
    with database.session() as s:
        case_row = s.query(db.Case).filter_by(case_id="META1").one()
        assert case_row.input_format == "metaphase"
        assert case_row.karyotype == "46,XY", case_row.summary
        assert [c["counted"] for c in case_row.summary["cells"]] == [46, 46, 46]
        cell = s.query(db.Cell).filter_by(case_pk=case_row.id, name="cell01").one()
        assert cell.source_file == "cell01.png" and cell.image_png and cell.segmentation
        chrom = s.query(db.Chromosome).filter_by(cell_id=cell.id, instance=1).one()
        assert chrom.source_file == "cell01.png#1" and chrom.box and len(chrom.polygon) >= 3
    # the report shows each metaphase with its outlines after the cell's karyogram
    from pypdf import PdfReader

    text = "\n".join(p.extract_text() for p in PdfReader(tmp_path / "reports" / "META1.pdf").pages)
    assert text.count("the metaphase") >= 3 and "46 chromosomes counted" in text
    # a re-run adds nothing
    again = CliRunner().invoke(app, ["process", str(case), "--db", str(sqlite_path), "--model", str(SHIPPED),
                                     "--reports", str(tmp_path / "reports")], env=env)
    assert again.exit_code == 0 and "skipped" in again.output, again.output
    assert counts(database, "META1") == got
    with database.session() as s:
        assert s.query(db.Chromosome).count() == 138 and s.query(db.Cell).count() == 3
    database.dispose()


def test_images_that_are_not_metaphases_are_rejected_and_the_rest_goes_on(tmp_path: Path, sqlite_path: Path,
                                                                          tiny_model_dir: Path) -> None:
    case, truth = metaphase_case(tmp_path, "META2", cells=2, seed=2, folders=True)
    rng = np.random.default_rng(5)
    bad = {"cell03/metaphase.png": synth.render_blank_field(rng),
           "cell04/metaphase.png": synth.render_karyogram_sheet(rng),
           "cell05/metaphase.png": synth.render_nucleus_only(rng)}
    for rel, img in bad.items():
        (case / rel).parent.mkdir()
        Image.fromarray(img).save(case / rel)
    settings = load_settings({"model": str(tiny_model_dir), "device": "cpu", "segmenter": SEGMENTER,
                              "input": "metaphase"})
    database = db.connect(sqlite_path)
    result = process_case(database, case, predictor=load_predictor(database, settings), settings=settings)
    assert result.n_cells == 2 and result.n_chromosomes == sum(truth.values())
    assert set(result.rejected) == set(bad)
    assert "blank field" in result.rejected["cell03/metaphase.png"]
    assert "karyogram sheet" in result.rejected["cell04/metaphase.png"]
    assert "nucleus" in result.rejected["cell05/metaphase.png"]
    with database.session() as s:
        stored = {r.source_file: r.reason for r in s.query(db.RejectedFile)}
    assert stored == result.rejected
    out = CliRunner().invoke(app, ["review", "META2", "--db", str(sqlite_path)])
    assert out.exit_code == 0 and "cell04/metaphase.png" in out.output and "karyogram sheet" in out.output
    for cell, n in truth.items():  # the count per cell, and chromosomes numbered by instance (#2 before #10)
        assert f"({cell}): {n} chromosomes counted in {cell}/metaphase.png" in out.output
        assert f"({cell}) #10  {cell}/metaphase.png#10 " in out.output
    database.dispose()


def test_auto_detection_tells_crops_from_metaphases_and_a_mixed_folder_is_an_error(tmp_path: Path,
                                                                                  sqlite_path: Path,
                                                                                  tiny_model_dir: Path) -> None:
    case, _ = metaphase_case(tmp_path, "MIX1", cells=1, seed=3)
    write_png(case / "k1.png", chromosome_array(40, 10, seed=1))
    scanned = scan_case(case)
    assert [m.file for m in scanned.metaphases] == ["cell01.png"] and [a.file for a in scanned.accepted] == ["k1.png"]
    settings = load_settings({"model": str(tiny_model_dir), "device": "cpu", "segmenter": SEGMENTER})
    database = db.connect(sqlite_path)
    with pytest.raises(InputError) as err:
        process_case(database, case, predictor=load_predictor(database, settings), settings=settings)
    assert "k1.png" in str(err.value) and "cell01.png" in str(err.value)
    # the case's input.txt forces one kind: as crops, the metaphase is one (big) crop, nothing is cut
    (case / "input.txt").write_text("crops\n")
    scanned = scan_case(case)
    assert not scanned.metaphases and len(scanned.accepted) == 2
    (case / "input.txt").write_text("sideways\n")
    with pytest.raises(InputError, match="input.txt"):
        scan_case(case)
    database.dispose()


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_watcher_killed_while_segmenting_processes_each_metaphase_case_once(
        sqlite_path: Path, layout: SimpleNamespace, watcher_env: dict[str, str], watchers: list[Watcher]) -> None:
    truth: dict[str, dict[str, int]] = {}
    for i in range(4):
        case, t = metaphase_case(layout.incoming, f"MK{i}", cells=2, seed=10 + i, ready=True)
        truth[case.name] = t
    env = dict(watcher_env, CHROMOBATCH_SEGMENTER=SEGMENTER)
    first = Watcher(layout.root, "first", [str(layout.incoming), "--db", str(sqlite_path)], env)
    watchers.append(first)
    # SIGKILL right after the second case starts segmenting (the log line comes before the first instance)
    _wait(lambda: first.text().count(": segmenting ") >= 2, 120, "a second case to start segmenting")
    first.proc.kill()
    first.proc.wait()
    database = db.connect(sqlite_path)
    second = Watcher(layout.root, "second", [str(layout.incoming), "--db", str(sqlite_path), "--once"], env)
    watchers.append(second)
    assert second.proc.wait(timeout=180) == 0, second.text()[-3000:]
    with database.session() as s:
        for name, t in truth.items():
            cells = s.query(db.Cell).join(db.Case).filter(db.Case.case_id == name).all()
            assert sorted(c.name for c in cells) == sorted(t), name
            for c in cells:
                # every object the segmenter reported when the case was cut is stored exactly once (the run
                # that was killed stored nothing); how well it counts these spreads is the process test's
                assert len(c.chromosomes) == c.segmentation["instances"], (name, c.name)
                assert abs(len(c.chromosomes) - t[c.name]) <= 3, (name, c.name, len(c.chromosomes), t[c.name])
    with database.session() as s:
        assert s.query(db.Case).count() == 4
        assert s.query(db.Chromosome).count() == sum(c.segmentation["instances"] for c in s.query(db.Cell))
        per_job = s.execute(select(db.Job.case_pk, func.count()).where(db.Job.state == "done")
                            .group_by(db.Job.case_pk)).all()
        assert sorted(n for _, n in per_job) == [1, 1, 1, 1]
        # each chromosome predicted once by the one model
        assert s.query(db.Prediction).count() == s.query(db.Chromosome).count()
    assert {p.name for p in layout.processed.iterdir()} == set(truth)
    assert "Traceback" not in second.text()
    database.dispose()


@pytest.mark.parametrize("image", ["png16", "tif", "jpg"])
def test_metaphases_as_16_bit_tiff_and_jpeg_files_are_read(tmp_path: Path, image: str) -> None:
    from chromobatch.synth.cases import generate_case

    case = generate_case(tmp_path, f"IMG-{image}", cells=2, fmt="png", karyotype="46,XX", seed=4,
                         metaphase="flat", metaphase_image=image)
    scanned = scan_case(case)
    assert not scanned.rejected and not scanned.accepted
    assert sorted(m.cell for m in scanned.metaphases) == ["cell01", "cell02"]
    assert all(m.grey.dtype == np.uint8 and m.polarity == "dark_on_light" for m in scanned.metaphases)


def test_a_dicom_instance_holding_a_metaphase_is_one_cell(tmp_path: Path) -> None:
    from chromobatch.synth.cases import generate_case

    case = generate_case(tmp_path, "DCM-META", cells=2, fmt="dicom", karyotype="46,XY", seed=6, metaphase="flat")
    scanned = scan_case(case)
    assert not scanned.rejected, scanned.rejected
    assert len(scanned.metaphases) == 2 and len({m.cell for m in scanned.metaphases}) == 2
    assert scanned.input_format == "metaphase" and scanned.meta  # patient/study tags kept for the case

"""The render pool: a case's canvases rendered across processes, the same bytes as in-process."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import chromosome_array, write_dicom, write_png

from chromobatch.config import load_settings
from chromobatch.errors import ConfigError
from chromobatch.intake.imaging import decode_png
from chromobatch.intake.scan import MIN_FOR_MAPPER
from chromobatch.ml import sizeprior
from chromobatch.ml.preprocess import PreprocessSpec
from chromobatch.ml.renderpool import MIN_FOR_POOL, RenderPool, auto_processes, render_chunk

SPEC = PreprocessSpec(mode="fit", input_size=48, orient="upright")


def _crops(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    out = []
    for i in range(n):
        arr = chromosome_array(length=int(rng.integers(20, 70)), width=int(rng.integers(6, 12)), canvas=90)
        out.append(np.ascontiguousarray(np.rot90(arr, k=i % 4)))
    return out


@pytest.fixture
def pool() -> Iterator[RenderPool]:
    p = RenderPool(2)
    p.start()
    yield p
    p.close()


def test_the_pool_renders_the_same_canvases_as_the_process_itself(pool: RenderPool) -> None:
    crops = _crops(MIN_FOR_POOL + 13)
    medians: list[float | None] = [None] * len(crops)
    assert pool.running
    got = pool.render(crops, medians, SPEC)
    want = render_chunk(crops, medians, SPEC)
    assert got.shape == (len(crops), 48, 48) and got.dtype == np.uint8
    assert np.array_equal(got, want)
    cell_spec = PreprocessSpec(mode="cell", input_size=48)
    medians = [40.0 + i % 3 for i in range(len(crops))]
    assert np.array_equal(pool.render(crops, medians, cell_spec), render_chunk(crops, medians, cell_spec))


def _messy_case(root: Path) -> Path:
    """A case of more than MIN_FOR_MAPPER files with every kind of trouble whose verdict depends on order or on
    other files: duplicates (one of a rejected file), DICOM crops from a second patient, two metaphases for one
    cell, plus unreadable, empty, unsupported and blank files."""
    from chromobatch.synth import metaphase as synth

    case = root / "MESSY1"
    for i in range(MIN_FOR_MAPPER + 4):
        write_png(case / f"cell{i % 3 + 1:02d}" / f"c{i:03d}.png", chromosome_array(30 + i % 25, 9, seed=i))
    (case / "cell01" / "c999.png").write_bytes((case / "cell02" / "c001.png").read_bytes())  # a duplicate
    (case / "cell02" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (case / "cell02" / "broken-again.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # same bytes, rejected
    (case / "cell03" / "empty.png").write_bytes(b"")
    (case / "cell03" / "notes.docx").write_bytes(b"PK\x03\x04 a word file")
    write_png(case / "cell03" / "blank.png", np.full((40, 20), 240, np.uint8))
    for k, patient in enumerate(["FAKE-0001", "FAKE-0001", "FAKE-0002"]):
        write_dicom(case / "dicom" / f"i{k}.dcm", chromosome_array(35, 9, seed=100 + k), series_uid="1.2.3.4",
                    instance=k + 1, patient_id=patient)
    spread = synth.render_metaphase(np.random.default_rng(1), karyotype="46,XX", overlap_rate=0.0, touch_rate=0.0,
                                    nuclei=0, debris=0, min_gap=3)
    write_png(case / "cell04" / "metaphase.png", spread.image)
    write_png(case / "cell04" / "metaphase-2.png", np.ascontiguousarray(spread.image[:, ::-1]))
    return case


def test_a_case_read_across_the_pool_is_the_case_read_in_process(pool: RenderPool, tmp_path: Path) -> None:
    """`scan_case` reads the files of a large case in the pool's workers; every verdict, accepted crop and
    rejection reason is the same as reading them in-process."""
    from chromobatch.intake import scan

    case = _messy_case(tmp_path)
    calls = []

    def mapper(fn, items):  # type: ignore[no-untyped-def]  # the pool's map, counted
        calls.append(len(items))
        return pool.map(fn, items)

    here = scan.scan_case(case)
    there = scan.scan_case(case, mapper=mapper)
    assert calls and calls[0] >= scan.MIN_FOR_MAPPER  # it did go through the pool
    assert there.rejected == here.rejected and len(here.rejected) == 8, here.rejected
    assert "duplicate of cell01/c999.png" in here.rejected["cell02/c001.png"]  # the first in file order stays
    assert "FAKE-0002" not in str(here.rejected) and "dicom/i2.dcm" in here.rejected  # another patient: refused
    assert "already has a metaphase" in here.rejected["cell04/metaphase.png"]
    assert [(a.file, a.cell, a.sha256, a.polarity, a.cell_order, a.png) for a in there.accepted] == \
        [(a.file, a.cell, a.sha256, a.polarity, a.cell_order, a.png) for a in here.accepted]
    assert all(a.png is not None and np.array_equal(decode_png(a.png), a.crop) for a in there.accepted)
    assert all(np.array_equal(a.crop, b.crop) for a, b in zip(there.accepted, here.accepted, strict=True))
    assert [(m.file, m.cell, m.sha256) for m in there.metaphases] == [(m.file, m.cell, m.sha256)
                                                                     for m in here.metaphases]
    assert np.array_equal(there.metaphases[0].grey, here.metaphases[0].grey)
    assert (there.input_format, there.meta) == (here.input_format, here.meta)


def test_the_size_priors_ink_measured_across_the_pool_is_the_same(pool: RenderPool) -> None:
    crops = _crops(MIN_FOR_POOL + 5)
    assert pool.map(sizeprior.inks, crops) == sizeprior.inks(crops)
    assert pool.map(sizeprior.inks, crops[:3]) == sizeprior.inks(crops[:3])  # few: in-process


def test_a_killed_worker_is_logged_and_the_case_still_renders(pool: RenderPool,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    crops = _crops(MIN_FOR_POOL)
    medians: list[float | None] = [None] * len(crops)
    executor = pool._pool
    assert executor is not None
    victim = next(iter(executor._processes))  # a worker's pid
    os.kill(victim, signal.SIGKILL)
    with caplog.at_level(logging.WARNING, logger="chromobatch.ml.renderpool"):
        got = pool.render(crops, medians, SPEC)
    assert np.array_equal(got, render_chunk(crops, medians, SPEC))
    assert "render pool broke" in caplog.text
    assert pool.running and pool._pool is not executor  # a new pool for the next case
    assert np.array_equal(pool.render(crops, medians, SPEC), got)


def test_a_pool_of_one_or_not_started_renders_in_process() -> None:
    crops = _crops(MIN_FOR_POOL)
    one = RenderPool(1)
    one.start()
    assert not one.running
    assert np.array_equal(one.render(crops, [None] * len(crops), SPEC), render_chunk(crops, [None] * len(crops), SPEC))


def test_workers_import_no_torch() -> None:
    """Each worker process imports the render and scan modules; without torch it costs tens of MB, not
    hundreds."""
    code = "import sys, chromobatch.ml.renderpool, chromobatch.intake.scan; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "False"


def test_the_setting_shares_the_cores_among_workers() -> None:
    cores = os.cpu_count() or 1
    assert auto_processes(0) == max(1, min(cores, 4))
    assert auto_processes(0, workers=cores) == 1
    assert auto_processes(3) == 3
    assert load_settings({"render_processes": 1}).render_processes == 1
    with pytest.raises(ConfigError, match="render_processes"):
        load_settings({"render_processes": -1})


def test_workers_end_when_their_parent_is_killed(tmp_path: Path) -> None:
    """A watcher killed with -9 leaves no render worker behind."""
    code = ("import os, sys, time\n"
            "from chromobatch.ml.renderpool import RenderPool\n"
            "p = RenderPool(2)\n"
            "p.start()\n"
            "print(' '.join(str(pid) for pid in p._pool._processes), flush=True)\n"
            "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])
    assert parent.stdout is not None
    workers = [int(x) for x in parent.stdout.readline().split()]
    assert len(workers) == 2 and all(_alive(w) for w in workers)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(w) for w in workers)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def test_a_script_without_a_main_guard_renders_in_process(tmp_path: Path) -> None:
    """Spawned workers import the main script again; without `if __name__ == "__main__":` they cannot start.
    That is logged and the script goes on rendering in its own process instead of failing."""
    script = tmp_path / "no_guard.py"
    script.write_text("import logging\n"
                      "logging.basicConfig(level=logging.WARNING)\n"
                      "from chromobatch.ml.renderpool import RenderPool\n"
                      "p = RenderPool(2)\n"
                      "p.start()\n"
                      "print('running:', p.running)\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "render pool not started" in out.stderr
    assert out.stdout.strip().splitlines()[-1] == "running: False"


def test_a_watchers_predictor_classifies_the_same_with_its_pool(tiny_model_dir: Path, sqlite_path: Path) -> None:
    """`warm_up` (what a watcher's worker calls) starts the pool; a case large enough to use it gets the
    same probabilities as rendered in-process, also through `prime` (several cases in one pass)."""
    from chromobatch.registry.register import load_predictor
    from chromobatch.store.db import connect

    with connect(sqlite_path) as database:
        predictor = load_predictor(database, load_settings({"model": str(tiny_model_dir), "runtime": "torch",
                                                            "render_processes": 2}))
    crops = _crops(MIN_FOR_POOL + 6)
    in_process = predictor.predict(crops)
    assert not predictor.renderer.running
    predictor.warm_up()
    try:
        assert predictor.renderer.running
        np.testing.assert_array_equal(predictor.predict(crops), in_process)
        predictor.prime(crops)
        np.testing.assert_array_equal(predictor.predict(crops), in_process)
    finally:
        predictor.renderer.close()

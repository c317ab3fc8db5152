"""Synthetic whole metaphases: exact instance masks, counts, touch/overlap rates, determinism, negatives, files."""

from __future__ import annotations

import csv
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from chromobatch.errors import ConfigError
from chromobatch.synth.karyotypes import karyotype_labels
from chromobatch.synth.metaphase import (
    Metaphase,
    mask_polygon,
    render_blank_field,
    render_karyogram_sheet,
    render_metaphase,
    render_nucleus_only,
    write_segmentation_set,
)
from chromobatch.synth.render import seeded_rng


def _background(m: Metaphase, far: int = 5) -> np.ndarray:
    """Pixels at least ``far`` px from every chromosome, nucleus and speck."""
    anything = (m.labels > 0) | m.nuclei | m.debris
    return ~ndimage.binary_dilation(anything, np.ones((2 * far + 1,) * 2, dtype=bool))


@pytest.fixture(scope="module", params=["G", "Q"])
def spread(request: pytest.FixtureRequest) -> Metaphase:
    return render_metaphase(seeded_rng(11, ord(request.param)), stain=request.param, karyotype="47,XY,+21")


def test_label_map_and_instance_masks_agree(spread: Metaphase) -> None:
    m = spread
    assert m.image.dtype == np.uint8 and m.labels.dtype == np.int32
    assert m.image.shape == m.labels.shape == (576, 768)
    full = m.full_masks()
    assert full.shape == (m.count, 576, 768)
    coverage = full.sum(axis=0)
    # every labelled pixel lies on its own chromosome's mask; every mask pixel is labelled
    for k in range(1, m.count + 1):
        assert full[k - 1][m.labels == k].all()
        assert m.full_mask(k).sum() == m.masks[k - 1].sum() > 0
    assert np.array_equal(m.labels > 0, coverage > 0)
    assert np.array_equal(m.overlap, coverage > 1)
    # each chromosome is one piece without holes (the outline an annotator would draw)
    for mk in m.masks:
        assert ndimage.label(mk, np.ones((3, 3), bool))[1] == 1
        assert np.array_equal(ndimage.binary_fill_holes(mk), mk)
    # nuclei and debris are never part of a chromosome mask
    assert not (m.nuclei & (m.labels > 0)).any()
    assert not (m.debris & (m.labels > 0)).any()
    # overlap pixels carry the chromosome drawn last (on top)
    ys, xs = np.nonzero(m.overlap)
    for y, x in zip(ys[:50], xs[:50], strict=True):
        assert m.labels[y, x] == np.nonzero(full[:, y, x])[0].max() + 1
    with pytest.raises(IndexError):
        m.full_mask(0)


def test_masks_sit_on_the_drawn_chromosomes(spread: Metaphase) -> None:
    """Independent of the renderer's bookkeeping: the pixels under a mask are stained, the far background is not."""
    m = spread
    bg = m.image[_background(m)].astype(float)
    level, spread_ = np.median(bg), np.percentile(bg, 99) - np.percentile(bg, 1)
    sign = -1.0 if m.stain == "G" else 1.0
    for k in range(1, m.count + 1):
        core = ndimage.binary_erosion(m.full_mask(k))
        if not core.any():
            core = m.full_mask(k)
        local = m.image[core].astype(float)
        # well beyond the background's own spread (illumination gradient and noise included)
        assert sign * (local.mean() - level) > max(20.0, 0.5 * spread_), (k, local.mean(), level)
    # a shifted mask would land on background: the stained share of a mask drops
    isolated = [k for k in range(1, m.count + 1) if not (m.touching[k - 1] or m.overlapping[k - 1])]
    threshold = level + sign * 0.5 * abs(np.median(m.image[m.labels > 0].astype(float)) - level)
    stained = (m.image < threshold) if m.stain == "G" else (m.image > threshold)
    free = _background(m, far=1)
    tried = 0
    for k in isolated:
        mk = m.full_mask(k)
        own = stained[mk].mean()
        assert own > 0.7, (k, own)
        for shift in ((0, 30), (30, 0), (0, -30), (-30, 0), (45, 45), (-45, -45), (60, -60), (-60, 60)):
            moved = np.roll(mk, shift, axis=(0, 1))
            if free[moved].all():  # the same shape moved onto bare background
                assert stained[moved].mean() < own - 0.4, (k, own, stained[moved].mean())
                tried += 1
                break
    assert tried >= 5


def test_counts_and_classes_match_the_karyotype(spread: Metaphase) -> None:
    assert spread.count == 47 == len(spread.boxes) == len(spread.masks)
    assert Counter(spread.classes) == Counter(karyotype_labels("47,XY,+21"))
    assert spread.labels.max() == 47
    # sizes follow the ideogram: chromosome 1s are larger than chromosome 21s and Ys
    area = {c: np.mean([mk.sum() for mk, cc in zip(spread.masks, spread.classes, strict=True) if cc == c])
            for c in ("1", "21", "Y")}
    assert area["1"] > 2.5 * area["21"]


def test_native_scale_like_bioimlab_metaphase() -> None:
    """Chromosome lengths (tip to tip) in the range of the bioimlab-metaphase polygons (median 46 px)."""
    lengths = []
    for seed in range(4):
        m = render_metaphase(seeded_rng(seed, 5), stain="Q")
        for mk in m.masks:
            ys, xs = np.nonzero(mk)
            pts = np.stack([xs, ys], axis=1)[:: max(1, len(xs) // 200)]
            lengths.append(np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1)).max())
    med, p98 = np.median(lengths), np.percentile(lengths, 98)
    assert 28 < med < 65 and 65 < p98 < 140, (med, p98)


def test_polarity_of_each_stain(spread: Metaphase) -> None:
    bg = np.median(spread.image[_background(spread)])
    assert (bg > 170) if spread.stain == "G" else (bg < 50)


def test_same_seed_same_pixels_and_masks() -> None:
    a = render_metaphase(seeded_rng(3), stain="G")
    b = render_metaphase(seeded_rng(3), stain="G")
    c = render_metaphase(seeded_rng(4), stain="G")
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    assert a.classes == b.classes and a.contacts == b.contacts
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize(("overlap_rate", "touch_rate"), [(0.0, 0.0), (0.08, 0.15), (0.3, 0.3)])
def test_touch_and_overlap_rates(overlap_rate: float, touch_rate: float) -> None:
    """The flags are measured on the final masks; their rates follow the parameters."""
    overlapping, touching = [], []
    for seed in range(4):
        m = render_metaphase(seeded_rng(seed, 99), stain="GQ"[seed % 2], overlap_rate=overlap_rate,
                             touch_rate=touch_rate)
        overlapping.append(np.mean(m.overlapping))
        touching.append(np.mean(m.touching))
        for a, b, kind in m.contacts:
            ma, mb = m.full_mask(a), m.full_mask(b)
            shared = (ma & mb).any()
            assert shared == (kind == "overlap")
            assert (ndimage.binary_dilation(ma, np.ones((3, 3), bool)) & mb).any()
        flagged = {k for a, b, _ in m.contacts for k in (a, b)}
        for k in range(1, m.count + 1):  # everything else keeps a gap of >= 2 px (min_gap)
            if k not in flagged:
                x0, y0, x1, y1 = m.boxes[k - 1]
                grown = ndimage.binary_dilation(np.pad(m.masks[k - 1], 2), np.ones((5, 5), bool))
                around = np.pad(m.labels, 2)[y0:y1 + 4, x0:x1 + 4]  # the box grown by 2 px
                assert not (grown & (around > 0) & (around != k)).any()
    if overlap_rate == touch_rate == 0:
        assert max(overlapping) == max(touching) == 0
    else:
        assert abs(np.mean(overlapping) - overlap_rate) < 0.05 + 0.25 * overlap_rate
        assert abs(np.mean(touching) - touch_rate) < 0.05 + 0.25 * touch_rate


def test_other_sizes_labels_and_errors() -> None:
    m = render_metaphase(seeded_rng(1), labels=["1", "2", "X"], size=(300, 200), stain="Q", nuclei=0, debris=0)
    assert m.image.shape == (200, 300) and sorted(m.classes) == ["1", "2", "X"] and m.karyotype is None
    assert not m.nuclei.any() and not m.debris.any()
    with pytest.raises(ConfigError):
        render_metaphase(seeded_rng(1), stain="R")
    with pytest.raises(ConfigError):
        render_metaphase(seeded_rng(1), size=(10, 10))
    with pytest.raises(ConfigError):
        render_metaphase(seeded_rng(1), overlap_rate=1.5)
    with pytest.raises(ConfigError):
        render_metaphase(seeded_rng(1), karyotype="46,XY", labels=["1"])
    with pytest.raises(ConfigError, match="at least one"):
        render_metaphase(seeded_rng(1), labels=[])
    with pytest.raises(ConfigError):
        render_metaphase(seeded_rng(1), labels=["25"])
    assert sorted(render_metaphase(seeded_rng(1), labels=["chr1", "23"], nuclei=0).classes) == ["1", "X"]
    with pytest.raises(ConfigError, match="do not fit"):
        render_metaphase(seeded_rng(1), size=(120, 100), scale=1.0)


def test_fast_enough() -> None:
    """Goal: well under 0.5 s per 768 x 576 spread; the bound here is loose (the test machine is shared)."""
    render_metaphase(seeded_rng(0))
    cpu = time.process_time()
    for seed in range(3):
        render_metaphase(seeded_rng(seed), stain="GQ"[seed % 2])
    per_spread = (time.process_time() - cpu) / 3
    assert per_spread < 0.5, per_spread


# ---------------------------------------------------------------------------------------------- negatives
def _objects(img: np.ndarray, stain: str, smooth: float = 0.0) -> tuple[np.ndarray, int]:
    """Connected objects clearly off the local background (uneven light taken out: the background is the
    brightest (G) or darkest (Q) level within ~250 px, smoothed)."""
    grey = ndimage.gaussian_filter(img.astype(float), smooth) if smooth else img.astype(float)
    small = ndimage.uniform_filter(img.astype(float), 8)[4::8, 4::8]
    rank = ndimage.maximum_filter if stain == "G" else ndimage.minimum_filter
    bg_small = ndimage.gaussian_filter(rank(small, 31, mode="nearest"), 2)
    bg = ndimage.zoom(bg_small, (img.shape[0] / bg_small.shape[0], img.shape[1] / bg_small.shape[1]), order=1)
    off = (grey < bg - 30) if stain == "G" else (grey > bg + 30)
    return ndimage.label(off, np.ones((3, 3), bool))


@pytest.mark.parametrize("stain", ["G", "Q"])
def test_blank_field_holds_nothing_large(stain: str) -> None:
    img = render_blank_field(seeded_rng(2), stain=stain)
    assert img.shape == (576, 768) and img.dtype == np.uint8
    lab, n = _objects(img, stain)
    sizes = np.bincount(lab.ravel())[1:]
    assert n < 30 and (sizes.max() if n else 0) < 60  # specks at most
    assert (np.median(img) > 170) if stain == "G" else (np.median(img) < 50)


@pytest.mark.parametrize("stain", ["G", "Q"])
def test_nucleus_only_is_one_to_three_round_blobs(stain: str) -> None:
    img = render_nucleus_only(seeded_rng(4), stain=stain, nuclei=2)
    lab, n = _objects(img, stain, smooth=3.0)  # the chromatin's grain would split a nucleus
    sizes = np.bincount(lab.ravel())[1:]
    big = np.nonzero(sizes > 1500)[0] + 1
    assert len(big) == 2
    for k in big:  # round: fills most of its bounding box (pi/4 for an ellipse), unlike a chromosome
        ys, xs = np.nonzero(lab == k)
        bh, bw = np.ptp(ys) + 1, np.ptp(xs) + 1
        assert sizes[k - 1] / (bh * bw) > 0.65 and 0.6 < bh / bw < 1.6
    with pytest.raises(ConfigError):
        render_nucleus_only(seeded_rng(4), nuclei=0)


@pytest.mark.parametrize("stain", ["G", "Q"])
def test_karyogram_sheet_has_many_objects_in_rows(stain: str) -> None:
    img = render_karyogram_sheet(seeded_rng(6), stain=stain, karyotype="46,XY")
    assert img.shape == (768, 1024)
    lab, n = _objects(img, stain)
    sizes = np.bincount(lab.ravel())[1:]
    objects = ndimage.find_objects(lab)
    # 46 chromosomes, 24 lines and 24 numbers (digits may split): many separate objects
    assert n >= 70, n
    # the lines under each pair: wide, flat objects, in 4 rows
    lines = [sl for sl in objects if (sl[1].stop - sl[1].start) > 5 * (sl[0].stop - sl[0].start) > 0]
    rows = sorted({round(sl[0].start / 20) for sl in lines})
    assert len(lines) >= 20 and 4 <= len(rows) <= 6, (len(lines), rows)
    # chromosomes stand upright: tall objects, bottoms aligned on the rows' lines
    tall = [sl for sl, size in zip(objects, sizes, strict=True)
            if (sl[0].stop - sl[0].start) > 1.5 * (sl[1].stop - sl[1].start) and size > 40]
    assert len(tall) >= 30
    bottoms = np.array([sl[0].stop for sl in tall])
    line_tops = np.array([sl[0].start for sl in lines])
    # each chromosome stands a few px above a line
    assert np.mean([((line_tops - b >= 0) & (line_tops - b < 8)).any() for b in bottoms]) > 0.6


# ---------------------------------------------------------------------------------------------- files
def test_segmentation_set_round_trip(tmp_path: Path) -> None:
    from PIL import Image

    manifest = write_segmentation_set(tmp_path / "seg", 3, "GQ", seeded_rng(8), val_fraction=0.34)
    rows = list(csv.DictReader(manifest.open()))
    assert [r["stain"] for r in rows] == ["G", "Q", "G"]
    assert sorted(r["split"] for r in rows) == ["train", "train", "val"]
    for r in rows:
        root = manifest.parent
        img = np.asarray(Image.open(root / r["image"]))
        labels = np.asarray(Image.open(root / r["labels"]))
        assert img.dtype == np.uint8 and img.shape == (576, 768)
        assert labels.dtype == np.uint16 and labels.max() == int(r["instances"])
        z = np.load(root / r["masks"])
        full = np.unpackbits(z["masks"], axis=-1, count=768).astype(bool)
        assert full.shape == (int(r["instances"]), 576, 768)
        for k in range(1, full.shape[0] + 1):
            assert full[k - 1][labels == k].all()
        assert np.array_equal(labels > 0, full.any(axis=0))
        assert int(z["overlapping"].sum()) == int(r["overlapping"])
        doc = json.loads((root / r["annotation"]).read_text())
        assert len(doc["shapes"]) == full.shape[0] and doc["imageWidth"] == 768
        assert Counter(s["class"] for s in doc["shapes"]) == Counter(z["classes"].tolist())
        # the polygons rasterise back to the exact masks (as segment.metrics reads labelme)
        from skimage.draw import polygon

        for k, shape in enumerate(doc["shapes"][:15]):
            pts = np.array(shape["points"])
            rr, cc = polygon(pts[:, 1], pts[:, 0], shape=(576, 768))
            back = np.zeros((576, 768), bool)
            back[rr, cc] = True
            assert (back & full[k]).sum() / (back | full[k]).sum() > 0.95
    with pytest.raises(Exception, match="already holds"):
        write_segmentation_set(tmp_path / "seg", 1, "G", seeded_rng(8))


def test_mask_polygon_of_a_square() -> None:
    mask = np.zeros((10, 10), bool)
    mask[2:6, 3:8] = True
    pts = np.array(mask_polygon(mask, (100, 50)))
    assert pts[:, 0].min() >= 102.5 and pts[:, 0].max() <= 107.5
    assert pts[:, 1].min() >= 51.5 and pts[:, 1].max() <= 55.5


# ---------------------------------------------------------------------------------------------- cases
@pytest.mark.parametrize(("layout", "fmt"), [("flat", "png"), ("folder", "png"), ("flat", "dicom")])
def test_metaphase_case_layouts_and_truth(tmp_path: Path, layout: str, fmt: str) -> None:
    from chromobatch.intake.imaging import decode_png
    from chromobatch.intake.sidecars import is_sidecar
    from chromobatch.synth.cases import generate_case

    kts = ["47,XX,+21", "46,XX"]
    case = generate_case(tmp_path, "MET1", cells=2, fmt=fmt, karyotype=kts, seed=5, style="Q", metaphase=layout)
    files = sorted(p.relative_to(case).as_posix() for p in case.rglob("*") if p.is_file())
    expected = {("flat", "png"): ["cell01.png", "cell02.png"],
                ("folder", "png"): ["cell01/metaphase.png", "cell02/metaphase.png"],
                ("flat", "dicom"): ["i0001.dcm", "i0002.dcm"]}[(layout, fmt)]
    assert files == [*expected, "truth.json"]  # no labels.csv: nothing but the images and an ignored sidecar
    assert is_sidecar("truth.json")
    truth = json.loads((case / "truth.json").read_text())
    assert truth["karyotype"] == "mos 47,XX,+21[1]/46,XX[1]" and truth["input"] == f"metaphase ({layout})"
    for cell, kt in zip(truth["cells"], kts, strict=True):
        assert cell["count"] == len(karyotype_labels(kt)) and cell["classes"] == karyotype_labels(kt)
        assert cell["file"] in expected
        if fmt == "png":
            img = decode_png((case / cell["file"]).read_bytes())
        else:
            import pydicom

            img = pydicom.dcmread(case / cell["file"]).pixel_array
        assert img.shape == (576, 768)
    again = generate_case(tmp_path / "again", "MET1", cells=2, fmt=fmt, karyotype=kts, seed=5, style="Q",
                          metaphase=layout)
    assert all((case / f).read_bytes() == (again / f).read_bytes() for f in files)


def test_metaphase_case_with_negatives(tmp_path: Path) -> None:
    from chromobatch.synth.cases import generate_case

    case = generate_case(tmp_path, "NEG1", cells=2, fmt="png", karyotype="46,XY", seed=2, metaphase="flat",
                         negatives=["blank", "karyogram", "nucleus"])
    truth = json.loads((case / "truth.json").read_text())
    assert [c["file"] for c in truth["cells"]] == ["cell01.png", "cell02.png"]
    assert [(n["file"], n["kind"], n["expect"]) for n in truth["negatives"]] == [
        ("cell03.png", "blank", "rejected"), ("cell04.png", "karyogram", "rejected"),
        ("cell05.png", "nucleus", "rejected")]
    assert sorted(p.name for p in case.iterdir()) == [f"cell0{i}.png" for i in range(1, 6)] + ["truth.json"]
    with pytest.raises(ConfigError, match="unknown negative"):
        generate_case(tmp_path, "NEG2", cells=1, fmt="png", karyotype="46,XY", seed=2, metaphase="flat",
                      negatives=["cat"])
    with pytest.raises(ConfigError, match="whole-metaphase"):
        generate_case(tmp_path, "NEG3", cells=1, fmt="png", karyotype="46,XY", seed=2, negatives=["blank"])


@pytest.mark.parametrize("kind", ["png16", "tif", "tif16", "jpg"])
def test_metaphase_image_kinds(tmp_path: Path, kind: str) -> None:
    """8/16-bit PNG and TIFF and JPEG, as scanners deliver them; intake's decoder gets the same picture back."""
    from PIL import Image

    from chromobatch.intake.imaging import decode_grey
    from chromobatch.synth.cases import generate_case

    case = generate_case(tmp_path, "K1", cells=1, fmt="png", karyotype="46,XX", seed=4, metaphase="flat",
                         metaphase_image=kind)
    ref = generate_case(tmp_path / "ref", "K1", cells=1, fmt="png", karyotype="46,XX", seed=4, metaphase="flat")
    name = json.loads((case / "truth.json").read_text())["cells"][0]["file"]
    assert name == "cell01." + ("jpg" if kind == "jpg" else kind[:3])
    with Image.open(case / name) as im:
        assert im.mode == ("I;16" if kind.endswith("16") else "L")
    original = decode_grey((ref / "cell01.png").read_bytes()).astype(int)
    back = decode_grey((case / name).read_bytes()).astype(int)
    # (intake stretches 16-bit images to their range, so compare the picture, not the grey levels)
    assert np.corrcoef(back.ravel(), original.ravel())[0, 1] > 0.99
    with pytest.raises(ConfigError, match="image kind"):
        generate_case(tmp_path, "K2", cells=1, fmt="png", karyotype="46,XX", seed=4, metaphase="flat",
                      metaphase_image="gif")


def test_metaphase_case_errors(tmp_path: Path) -> None:
    from chromobatch.synth.cases import generate_case

    with pytest.raises(ConfigError, match="flat or folder"):
        generate_case(tmp_path, "X1", cells=1, fmt="png", karyotype="46,XX", seed=1, metaphase="grid")
    with pytest.raises(ConfigError, match="DICOM"):
        generate_case(tmp_path, "X2", cells=1, fmt="dicom", karyotype="46,XX", seed=1, metaphase="folder")
    assert not any(tmp_path.iterdir())


def test_cli_synth_metaphase(tmp_path: Path) -> None:
    """The real command in a subprocess: `chromobatch synth OUT --cases 2 --cells 2 --metaphase`."""
    import subprocess
    import sys

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "chromobatch.cli", "synth", str(out), "--cases", "2", "--cells", "2", "--metaphase",
           "--metaphase-layout", "folder", "--seed", "3", "--negatives", "blank,nucleus"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "whole metaphases, folder" in done.stdout and "counts" in done.stdout
    for case in ("SYN0001", "SYN0002"):
        truth = json.loads((out / case / "truth.json").read_text())
        assert [c["file"] for c in truth["cells"]] == ["cell01/metaphase.png", "cell02/metaphase.png"]
        assert [n["file"] for n in truth["negatives"]] == ["cell03/metaphase.png", "cell04/metaphase.png"]
        assert f"counts {truth['cells'][0]['count']},{truth['cells'][1]['count']}" in done.stdout
    bad = subprocess.run([*cmd[:4], str(tmp_path / "x"), "--metaphase", "--metaphase-layout", "grid"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "flat or folder" in bad.stdout + bad.stderr


def test_condensation_makes_longer_thinner_chromosomes() -> None:
    def shape(cond: float) -> tuple[float, float]:
        m = render_metaphase(seeded_rng(2), labels=["1"] * 6, condensation=cond, scale=1.0, size=(900, 700),
                             overlap_rate=0, touch_rate=0, splay=0.0)
        from skimage.morphology import skeletonize

        lengths = [float(skeletonize(mk).sum()) for mk in m.masks]  # along the (bent) axis
        return float(np.mean(lengths)), float(np.mean([mk.sum() for mk in m.masks]) / np.mean(lengths))

    (l1, w1), (l2, w2) = shape(1.0), shape(2.0)
    assert l2 > 1.4 * l1 and w2 < w1
    with pytest.raises(ConfigError):
        render_metaphase(seeded_rng(2), condensation=5.0)


def test_splay_parts_the_chromatids() -> None:
    """Parted sister chromatids (an X) make a chromosome's outline less convex."""
    from skimage.morphology import convex_hull_image

    def solidity(splay: float) -> float:
        m = render_metaphase(seeded_rng(5), labels=["1", "2", "3", "4"], condensation=1.0, splay=splay,
                             size=(500, 400), overlap_rate=0, touch_rate=0, nuclei=0)
        assert m.info["splay"] == splay
        return float(np.mean([mk.sum() / convex_hull_image(mk).sum() for mk in m.masks]))

    assert solidity(1.5) < solidity(0.0) - 0.03
    with pytest.raises(ConfigError):
        render_metaphase(seeded_rng(5), splay=-1.0)


def test_docs_figure(tmp_path: Path) -> None:
    from PIL import Image

    from chromobatch.synth.montage import write_metaphase_figure

    real = tmp_path / "real.png"
    Image.fromarray(render_blank_field(seeded_rng(1), stain="Q", size=(200, 150))).save(real)
    path = write_metaphase_figure(tmp_path / "fig.png", stain="Q", real=real, labels=["1", "2", "3"],
                                  size=(200, 150), scale=0.8)
    with Image.open(path) as im:
        assert im.size[0] > 2.5 * im.size[1]  # three panels side by side
        assert np.asarray(im.convert("L")).std() > 10


def test_partial_frames_cut_chromosomes_at_the_edge() -> None:
    counts = []
    for seed in range(4):
        m = render_metaphase(seeded_rng(seed, 31), stain="Q", partial=True)
        counts.append((m.count, int(m.info["drawn"])))
        assert len(m.truncated) == m.count == len(m.masks)
        full = m.full_masks()
        for k in range(1, m.count + 1):
            assert full[k - 1][m.labels == k].all() and m.masks[k - 1].sum() >= 30
            on_edge = full[k - 1][0].any() or full[k - 1][-1].any() or full[k - 1][:, 0].any() \
                or full[k - 1][:, -1].any()
            if m.truncated[k - 1]:
                assert on_edge  # only the frame's edge cuts a chromosome
        assert np.array_equal(m.labels > 0, full.any(axis=0))
    assert all(c <= d for c, d in counts) and any(c < d for c, d in counts)
    assert any(any(render_metaphase(seeded_rng(s, 31), stain="Q", partial=True).truncated) for s in range(2))

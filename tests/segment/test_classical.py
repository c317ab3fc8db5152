"""The classical baseline on drawn metaphases: touching rods split, nucleus and specks left out, a cluster
that cannot be split flagged with its estimated size."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from seg_drawing import as_instance, disk, paint, rod

from chromobatch.segment.classical import ClassicalSegmenter
from chromobatch.segment.metrics import score_image

SHAPE = (240, 320)


def _singles() -> list[np.ndarray]:
    return [rod(SHAPE, (30, 30), (30, 90), 5), rod(SHAPE, (60, 40), (90, 90), 5),
            rod(SHAPE, (280, 150), (280, 210), 5), rod(SHAPE, (230, 200), (180, 215), 5)]


def test_splits_touching_rods_and_drops_nucleus_and_specks() -> None:
    rng = np.random.default_rng(0)
    # two rods whose rounded ends touch at a narrow contact
    a = rod(SHAPE, (110, 160), (160, 160), 5)
    b = rod(SHAPE, (170.5, 160), (215, 125), 5)
    assert (a & b).sum() <= 3 and ndi.label(a | b)[1] == 1  # one connected object
    nucleus = disk(SHAPE, (200, 60), 38)
    texture = (rng.random(SHAPE) < 0.3) & nucleus
    specks = [disk(SHAPE, (150 + 17 * i, 225), 1) for i in range(4)]
    chromosomes = [*_singles(), a, b]
    img = paint(chromosomes, SHAPE, rng,
                extra=[(nucleus, 110), (texture, 80)] + [(s, 60) for s in specks])

    found = ClassicalSegmenter().segment(img)

    s = score_image(found, [as_instance(m) for m in chromosomes])
    assert s.n_pred == 6, [(i.box, i.area, i.cluster) for i in found]
    assert s.tp == 6
    assert all(i.cluster == 1 for i in found)
    # nothing reported over the nucleus or the specks
    for inst in found:
        m = inst.full_mask(SHAPE)
        assert not (m & nucleus).any()
        assert not any((m & sp).any() for sp in specks)


def test_inseparable_cluster_is_flagged_with_its_size() -> None:
    rng = np.random.default_rng(1)
    # three rods crossing in their middles: a star no watershed on the distance map can cut apart
    star = [rod(SHAPE, (150 - 30, 120), (150 + 30, 120), 5), rod(SHAPE, (150, 90), (150, 150), 5),
            rod(SHAPE, (129, 99), (171, 141), 5)]
    img = paint([*_singles(), *star], SHAPE, rng)

    found = ClassicalSegmenter().segment(img)

    clusters = [i for i in found if i.cluster > 1]
    assert len(clusters) == 1, [(i.box, i.area, i.cluster) for i in found]
    assert 2 <= clusters[0].cluster <= 3
    assert "cluster_reason" in clusters[0].notes
    assert clusters[0].full_mask(SHAPE)[120, 150]
    assert len(found) == 5
    assert score_image(found, [as_instance(m) for m in _singles()]).tp == 4


def test_blank_image_gives_nothing() -> None:
    img = np.full(SHAPE, 230, dtype=np.uint8)
    assert ClassicalSegmenter().segment(img) == []

"""Instance metrics on cases whose answer is known by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from seg_drawing import as_instance, rod

from chromobatch.errors import DataError
from chromobatch.segment.base import Instance
from chromobatch.segment.metrics import SetScore, average_precision, read_labelme, score_image

SHAPE = (100, 200)


def _truth() -> list[Instance]:
    return [as_instance(rod(SHAPE, (20 + 35 * i, 20), (20 + 35 * i, 70), 5)) for i in range(5)]


def test_perfect_match() -> None:
    gt = _truth()
    s = SetScore([score_image(gt, gt)])
    assert (s.tp, s.precision, s.recall, s.f1, s.ap) == (5, 1.0, 1.0, 1.0, 1.0)
    assert (s.exact_count, s.count_within_1, s.mean_abs_count_error) == (1.0, 1.0, 0.0)


def test_one_missed() -> None:
    gt = _truth()
    s = SetScore([score_image(gt[:4], gt)])
    assert s.tp == 4 and s.precision == 1.0 and s.recall == 0.8
    assert s.f1 == pytest.approx(2 * 4 / (4 + 5))
    assert s.images[0].count_error == -1
    assert (s.exact_count, s.count_within_1, s.mean_abs_count_error) == (0.0, 1.0, 1.0)


def test_one_split_in_three() -> None:
    """A chromosome cut in three: no third overlaps it by IoU 0.5, so one miss and three false positives."""
    gt = _truth()
    x0, y0, x1, y1 = gt[2].box
    full = gt[2].full_mask(SHAPE)
    thirds = []
    for k in range(3):
        part = full.copy()
        part[: y0 + k * (y1 - y0) // 3] = False
        part[y0 + (k + 1) * (y1 - y0) // 3 :] = False
        thirds.append(as_instance(part))
    pred = gt[:2] + thirds + gt[3:]
    s = SetScore([score_image(pred, gt)])
    assert (s.tp, s.n_pred, s.n_gt) == (4, 7, 5)
    assert s.f1 == pytest.approx(8 / 12)
    assert s.images[0].count_error == 2
    assert s.count_within_1 == 0.0 and s.mean_abs_count_error == 2.0


def test_cluster_counts_as_its_size_and_ap_ranks_by_score() -> None:
    gt = _truth()
    merged = as_instance(gt[0].full_mask(SHAPE) | gt[1].full_mask(SHAPE) | gt[2].full_mask(SHAPE))
    merged.cluster, merged.score = 3, 0.2
    pred = [merged, *gt[3:]]
    s = SetScore([score_image(pred, gt)])
    assert s.images[0].count == 5 and s.exact_count == 1.0
    assert s.tp == 2 and s.flagged == 1
    # the unmatched cluster has the lowest score: precision stays 1 up to recall 0.4
    assert s.ap == pytest.approx(0.4)
    for g in gt[3:]:
        g.score = 0.9
    merged.score = 0.99  # ranked first, it costs precision at every recall (1/2, then 2/3, interpolated 2/3)
    assert SetScore([score_image(pred, gt)]).ap == pytest.approx(0.4 * 2 / 3)


def test_average_precision_edge_cases() -> None:
    assert average_precision([], 3) == 0.0
    assert math.isnan(average_precision([], 0))
    assert average_precision([(0.9, True), (0.1, False)], 1) == 1.0


def test_labelme_polygon_rasterised(tmp_path: Path) -> None:
    doc = {"shapes": [{"label": "chr", "shape_type": "polygon", "points": [[10, 10], [19, 10], [19, 29], [10, 29]]},
                      {"label": "chr", "shape_type": "polygon", "points": [[50, 50], [51, 50]]}],  # degenerate
           "imageHeight": 40, "imageWidth": 60}
    path = tmp_path / "a.json"
    path.write_text(json.dumps(doc))
    inst = read_labelme(path)
    assert len(inst) == 1
    assert inst[0].box[:2] == (10, 10) and inst[0].box[2] in (19, 20) and inst[0].box[3] in (29, 30)
    assert 150 <= inst[0].area <= 200
    bad = tmp_path / "b.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="b.json"):
        read_labelme(bad)


def test_overlapping_truth_each_matched_once() -> None:
    """Two crossing annotated chromosomes share pixels; each prediction may match only one of them."""
    a = as_instance(rod(SHAPE, (50, 20), (150, 80), 5))
    b = as_instance(rod(SHAPE, (50, 80), (150, 20), 5))
    s = score_image([a, a], [a, b])
    assert s.tp == 1 and s.n_pred == 2
    assert np.isclose(SetScore([s]).precision, 0.5)

"""The cluster rule: which objects are flagged "cluster, about N", how N is estimated, and how it is chosen."""

from __future__ import annotations

from typing import Any

import numpy as np

from chromobatch.segment.base import Instance
from chromobatch.segment.data import Annotated
from chromobatch.segment.objects import flag_clusters
from chromobatch.segment.train import tune_clusters


def _blob(area: int, at: int = 0) -> Instance:
    """An object of `area` pixels (a 10-pixel-high bar) at column `at`."""
    width = max(1, area // 10)
    return Instance(mask=np.ones((10, width), dtype=bool), box=(at, 0, at + width, 10))


def test_cluster_size_is_area_over_divisor_times_mean_single() -> None:
    objs = [_blob(100) for _ in range(10)] + [_blob(400), _blob(800), _blob(240)]
    flag_clusters(objs, 2.5)
    # 240 px is 2.4x the median: not flagged at 2.5, so a single: the mean single is 1240 / 11 = 112.7 px
    assert [o.cluster for o in objs[10:]] == [4, 7, 1]
    objs = [_blob(100) for _ in range(10)] + [_blob(400), _blob(800), _blob(240)]
    flag_clusters(objs, 2.2, divisor=2.0)
    assert [o.cluster for o in objs[10:]] == [2, 4, 2]  # never under 2 once flagged
    assert all(o.cluster == 1 for o in objs[:10])
    assert "cluster_reason" in objs[12].notes and objs[12].score <= 0.5


class _Stub:
    """What `tune_clusters` needs of a segmenter: post-processing settings, prepare, finish. `finish` flags the
    prepared objects with the current rule, as `LearnedSegmenter.finish` does after its watershed."""

    def __init__(self) -> None:
        self.post: dict[str, Any] = {"cluster_factor": 3.0, "cluster_divisor": 1.0, "min_area": 50}

    def prepare(self, grey: np.ndarray) -> list[int]:
        return [100] * 10 + [280, 320, 320, 520]

    def finish(self, areas: list[int]) -> list[Instance]:
        objs = [_blob(a, at=60 * i) for i, a in enumerate(areas)]
        flag_clusters(objs, self.post["cluster_factor"], divisor=self.post["cluster_divisor"])
        return objs


def test_the_rule_with_the_smallest_count_error_is_chosen() -> None:
    # ten single chromosomes, one long single one (2.8x the median, unbranched) and three objects that hold
    # two each (3.2x, 3.2x, 5.2x): only the size halved counts 17 (by 1 or 1.5: 21 or 18), and the long one
    # stays single because it does not branch
    truth = [_blob(100, at=60 * i) for i in range(17)]
    items = [Annotated(name=f"m{i}", grey=np.zeros((10, 10), np.uint8), instances=truth) for i in range(3)]
    seg = _Stub()
    chosen = tune_clusters(seg, items)  # type: ignore[arg-type]  # the stub has what it uses
    assert (chosen["cluster_factor"], chosen["cluster_divisor"]) == (3.0, 2.0)  # 2.5 counts the same: fewer flags
    assert chosen["cluster_branched_below"] == 3.0
    assert chosen["min_area"] == 50 and seg.post == chosen
    assert [o.cluster for o in seg.finish(seg.prepare(items[0].grey))][10:] == [1, 2, 2, 2]


def _cross(arm: int, width: int = 6) -> Instance:
    """Two bars crossing in an X-like plus: what two chromosomes lying across each other look like."""
    size = 2 * arm + width
    mask = np.zeros((size, size), dtype=bool)
    mask[arm:arm + width, :] = True
    mask[:, arm:arm + width] = True
    return Instance(mask=mask, box=(0, 0, size, size))


def test_between_the_factor_and_branched_below_only_a_forked_object_is_a_cluster() -> None:
    bar = _blob(280)
    cross = _cross(20)  # 2 x 46 x 6 - 36 = 516 px: make the singles 200 px so it is 2.6x the median
    objs = [_blob(200) for _ in range(10)] + [_blob(560), cross]
    flag_clusters(objs, 2.5, divisor=1.0, branched_below=3.0)
    assert objs[10].cluster == 1  # 2.8x the median but one unbranched band: a long chromosome
    assert objs[11].cluster == 2 and "cluster_reason" in objs[11].notes
    flag_clusters(objs2 := [_blob(100) for _ in range(10)] + [bar], 2.5)  # without the rule: flagged
    assert objs2[10].cluster >= 2

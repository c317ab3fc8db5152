"""Splitting merged objects at a higher core threshold (`learned._split_merged`) and choosing when to
(`train.tune_splits`), on probability maps drawn by hand so the right answer is known."""

from __future__ import annotations

import numpy as np
from seg_drawing import as_instance, rod

from chromobatch.segment.data import Annotated
from chromobatch.segment.learned import LearnedSegmenter, Prepared
from chromobatch.segment.train import tune_splits
from chromobatch.segment.unet import UNet

SHAPE = (160, 260)
#: the shipped model's thresholds and cluster rule, the split step off
POST = {"fg_threshold": 0.5, "core_threshold": 0.3, "min_seed": 6, "min_area": 20, "merge_small": 0.0,
        "cluster_factor": 2.5, "cluster_divisor": 2.0, "cluster_branched_below": 3.0, "split_factor": 0.0}


def _singles() -> list[np.ndarray]:
    """Ten separate upright chromosomes of 5 x 40 px (about 230 px each): the image's median object."""
    return [rod(SHAPE, (20 + 22 * k, 10), (20 + 22 * k, 45), 3) for k in range(10)]


def _draw(masks: list[np.ndarray], cores: list[tuple[np.ndarray, float]]) -> np.ndarray:
    """(2, H, W) maps: foreground 0.9 on every mask, core probability as given (the last one drawn wins)."""
    probs = np.zeros((2, *SHAPE), dtype=np.float32)
    for m in masks:
        probs[0][m] = 0.9
    for m, p in cores:
        probs[1][m] = p
    return probs


def _core(mask: np.ndarray) -> np.ndarray:
    """A chromosome's core: its mask shrunk by a pixel all round (what the network is trained to mark)."""
    from scipy import ndimage as ndi

    return ndi.binary_erosion(mask)


def touching_pair() -> tuple[np.ndarray, list[np.ndarray]]:
    """A T: chromosome B's end touches chromosome A's middle. At the junction B's core is only 0.45 (the
    network unsure where one ends), so at the core threshold 0.3 both form one core, at 0.5 two."""
    a = rod(SHAPE, (70, 100), (115, 100), 3)
    b = rod(SHAPE, (92, 104), (92, 140), 3)
    weak = rod(SHAPE, (92, 100), (92, 112), 3)
    singles = _singles()
    probs = _draw(singles + [a, b], [(_core(m), 0.9) for m in singles] + [(_core(a), 0.9), (_core(b), 0.9),
                                                                         (_core(b) & weak, 0.45)])
    return probs, singles + [a, b]


def long_single() -> tuple[np.ndarray, list[np.ndarray]]:
    """One long, straight chromosome (2.4x the median) whose core thins at its centromere: not a merge."""
    a = rod(SHAPE, (60, 110), (145, 110), 3)
    weak = rod(SHAPE, (98, 110), (106, 110), 3)
    singles = _singles()
    probs = _draw(singles + [a], [(_core(m), 0.9) for m in singles] + [(_core(a), 0.9), (_core(a) & weak, 0.45)])
    return probs, singles + [a]


def _seg(**post: float) -> LearnedSegmenter:
    return LearnedSegmenter(UNet((4, 8)), {"postprocess": {**POST, **post}})


def test_a_touching_pair_is_split_where_its_core_parts() -> None:
    probs, truth = touching_pair()
    whole = _seg().instances_from(probs)
    assert len(whole) == 11 and sum(i.cluster for i in whole) == 11  # merged: 2.3x the median, counted as one
    split = _seg(split_factor=1.8, split_min_piece=0.4).instances_from(probs)
    assert len(split) == 12 and all(i.cluster == 1 for i in split)
    a, b = truth[-2:]
    for mask in (a, b):  # each chromosome of the pair comes out as an instance of its own, nearly exactly
        best = max(split, key=lambda i: (i.full_mask(SHAPE) & mask).sum())
        full = best.full_mask(SHAPE)
        assert (full & mask).sum() / (full | mask).sum() > 0.8


def test_a_long_chromosome_thin_at_its_centromere_is_not_cut() -> None:
    probs, _ = long_single()
    found = _seg(split_factor=1.8, split_min_piece=0.4).instances_from(probs)
    assert len(found) == 11 and all(i.cluster == 1 for i in found)  # unbranched: not a merge


def test_pieces_under_the_smallest_share_or_too_many_keep_the_object_whole() -> None:
    probs, _ = touching_pair()
    assert len(_seg(split_factor=1.8, split_min_piece=1.5).instances_from(probs)) == 11
    assert len(_seg(split_factor=3.0, split_min_piece=0.4).instances_from(probs)) == 11  # under the factor


def test_a_nucleus_the_nucleus_map_missed_is_not_cut_into_chromosomes() -> None:
    """A round, solid object of about 5x the median with a patchy core: cut, its halves would pass as
    chromosomes; whole, it is a cluster that the nucleus test leaves out."""
    from seg_drawing import disk

    nucleus = disk(SHAPE, (130, 110), 20)
    singles = _singles()
    probs = _draw(singles + [nucleus], [(_core(m), 0.9) for m in singles] + [(nucleus, 0.35),
                  (disk(SHAPE, (120, 110), 6), 0.9), (disk(SHAPE, (140, 110), 6), 0.9)])
    for post in ({}, {"split_factor": 1.8, "split_min_piece": 0.4}):
        found = _seg(**post).instances_from(probs)
        assert len(found) == 10 and all(i.cluster == 1 for i in found), post


def _items(probs: np.ndarray, truth: list[np.ndarray], n: int = 2) -> tuple[list[Annotated], list[Prepared]]:
    items = [Annotated(name=f"m{k}", grey=np.zeros(SHAPE, np.uint8), instances=[as_instance(m) for m in truth])
             for k in range(n)]
    return items, [Prepared(probs=probs, nuclei=np.zeros(SHAPE, bool), scale=1.0, shape=SHAPE)] * n


def test_splitting_is_chosen_where_it_makes_the_count_right_and_not_otherwise() -> None:
    seg = _seg()
    chosen = tune_splits(seg, *_items(*touching_pair()))
    # 12 counted for 12 annotated; 1.8 and 2.2 cut the pair (2.3x) alike, and the larger factor wins a tie
    assert (chosen["split_factor"], chosen["split_min_piece"]) == (2.2, 0.55) and seg.post == chosen
    probs, truth = touching_pair()
    merged = truth[:-2] + [truth[-2] | truth[-1]]  # annotated as one object: cutting it would count 12 for 11
    assert tune_splits(_seg(), *_items(probs, merged))["split_factor"] == 0.0

"""The learned segmenter's model folder (save, load, refuse bad files) and its instances' coordinates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from seg_drawing import as_instance, paint, rod

from chromobatch.errors import ModelError
from chromobatch.segment.factory import load_segmenter
from chromobatch.segment.learned import LearnedSegmenter, load_segmenter_folder, save_segmenter
from chromobatch.segment.metrics import score_image
from chromobatch.segment.unet import UNet

SHAPE = (120, 200)


def _image(shape: tuple[int, int] = SHAPE, scale: float = 1.0) -> tuple[np.ndarray, list[np.ndarray]]:
    s = scale
    rods = [rod(shape, (30 * s, 20 * s), (30 * s, 90 * s), 5 * s),
            rod(shape, (80 * s, 30 * s), (140 * s, 60 * s), 5 * s),
            rod(shape, (170 * s, 20 * s), (150 * s, 100 * s), 5 * s)]
    return paint(rods, shape, np.random.default_rng(0)), rods


def test_round_trip_keeps_the_network(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = UNet((4, 8))
    folder = save_segmenter(net, {"stroke_width": 10.0, "postprocess": {"min_area": 10}}, tmp_path / "seg")
    meta = json.loads((folder / "model.json").read_text())
    assert meta["format"] == "chromobatch-segmenter" and meta["channels"] == [4, 8]
    seg = load_segmenter(folder, threads=1)  # one thread: on a loaded machine two are far slower
    assert isinstance(seg, LearnedSegmenter) and seg.name == "unet-4-8" and len(seg.version) == 12
    assert seg.post["min_area"] == 10 and seg.post["fg_threshold"] == 0.5
    img, _ = _image()
    before = LearnedSegmenter(net, meta, threads=1).probabilities(img)
    after = seg.probabilities(img)
    assert after.shape == (2, *SHAPE)
    np.testing.assert_allclose(before, after, atol=1e-6)
    for inst in seg.segment(img):  # a random network finds whatever it finds, but in the image's frame
        x0, y0, x1, y1 = inst.box
        assert 0 <= x0 < x1 <= SHAPE[1] and 0 <= y0 < y1 <= SHAPE[0]
        assert inst.mask.shape == (y1 - y0, x1 - x0) and inst.mask.any()


def test_bad_folders_are_named(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found|no such"):
        load_segmenter(tmp_path / "nothing")
    folder = save_segmenter(UNet((4, 8)), {}, tmp_path / "seg")
    (folder / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="model.safetensors"):
        load_segmenter_folder(folder)
    save_segmenter(UNet((4, 8)), {}, folder)
    meta = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps({**meta, "channels": [4, 16]}))
    with pytest.raises(ModelError, match="do not fit"):
        load_segmenter_folder(folder)
    (folder / "model.json").write_text(json.dumps({**meta, "format": "chromobatch-model"}))
    with pytest.raises(ModelError, match="model.json"):
        load_segmenter_folder(folder)


class DarkIsChromosome(UNet):
    """A stand-in network whose answer is known: foreground and core wherever the image is dark."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logit = -(x - 0.4) * 20  # normalised grey (g/255 - 0.5) / 0.25: chromosomes ~ -0.9, background ~ 1.7
        return torch.cat([logit, logit], dim=1)


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_instances_in_image_coordinates(scale: float) -> None:
    """Rods at 2.5x the training width are resized down for the network and mapped back onto the original."""
    shape = (int(SHAPE[0] * scale), int(SHAPE[1] * scale))
    img, rods = _image(shape, scale)
    seg = LearnedSegmenter(DarkIsChromosome((4, 8)), {"stroke_width": 10.0, "postprocess": {"min_area": 10}},
                           threads=1)
    found = seg.segment(img)
    assert seg.last_timing["factor"] == pytest.approx(1 / scale, rel=0.2) if scale != 1.0 else 1.0
    s = score_image(found, [as_instance(r) for r in rods], threshold=0.75)
    assert (s.tp, s.n_pred) == (3, 3), [(i.box, i.area) for i in found]
    assert all(i.cluster == 1 for i in found)


def test_cores_split_touching_chromosomes() -> None:
    """Post-processing alone: two cores in one foreground blob give two instances, cut between them."""
    probs = np.zeros((2, 60, 100), dtype=np.float32)
    probs[0, 20:30, 10:90] = 0.9  # one foreground bar
    probs[1, 22:28, 12:45] = 0.9  # two cores along it
    probs[1, 22:28, 55:88] = 0.9
    seg = LearnedSegmenter(UNet((4, 8)), {"postprocess": {"min_area": 10}})
    found = sorted(seg.instances_from(probs), key=lambda i: i.box[0])
    assert len(found) == 2
    assert found[0].box[0] == 10 and found[1].box[2] == 90
    assert 45 <= found[0].box[2] <= 56 and found[0].box[2] == found[1].box[0]
    assert found[0].area + found[1].area == 800
    assert all(0.0 < i.score <= 1.0 for i in found)


def test_small_fragments_merge_into_their_neighbour() -> None:
    """A core broken off near a chromosome's end gives a small region; with merge_small it rejoins."""
    probs = np.zeros((2, 80, 100), dtype=np.float32)
    for y in (10, 35, 60):  # three bars of 10 x 80 px, each with one long core
        probs[0, y : y + 10, 10:90] = 0.9
        probs[1, y + 2 : y + 8, 12:80] = 0.9
    probs[1, 12:18, 84:88] = 0.9  # a stray core at the first bar's end
    plain = LearnedSegmenter(UNet((4, 8)), {"postprocess": {"min_area": 10, "min_seed": 3}})
    assert len(plain.instances_from(probs)) == 4
    merged = LearnedSegmenter(UNet((4, 8)), {"postprocess": {"min_area": 10, "min_seed": 3, "merge_small": 0.35}})
    found = merged.instances_from(probs)
    assert len(found) == 3 and sorted(i.area for i in found) == [800, 800, 800]


def test_nucleus_taken_for_foreground_is_left_out() -> None:
    """Should the network mark an interphase nucleus as foreground, it is dropped, not counted as a cluster."""
    from seg_drawing import disk

    shape = (200, 300)
    img, rods = _image(shape)
    nucleus = disk(shape, (240, 150), 35)
    img[nucleus] = 90
    seg = LearnedSegmenter(DarkIsChromosome((4, 8)), {"stroke_width": 10.0, "postprocess": {"min_area": 10}},
                           threads=1)
    found = seg.segment(img)
    assert len(found) == 3 and all(i.cluster == 1 for i in found)
    assert not any((i.full_mask(shape) & nucleus).any() for i in found)


def test_grown_unet_starts_where_the_small_one_was() -> None:
    """A level added below a trained U-Net (`grow_unet`) keeps every trained tensor and starts as a
    pass-through: the grown network's maps match the small one's; a plain copy without the pass-through
    start (new decoder block at random) does not. Widths that do not extend the old ones are refused."""
    from chromobatch.errors import DataError
    from chromobatch.segment.train import grow_unet

    torch.manual_seed(3)
    small = UNet((4, 8, 16)).eval()
    for m in small.modules():  # trained-looking BatchNorm statistics, not the init's 0 / 1
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(3, 1, 64, 64)
    big, copied = grow_unet(small, (4, 8, 16, 32), sample=x)
    assert copied == len(small.state_dict()) and len(big.state_dict()) > copied
    assert big.channels == [4, 8, 16, 32] and big.stride == 8
    plain, _ = grow_unet(small, (4, 8, 16, 32))
    with torch.no_grad():
        ref = torch.sigmoid(small(x))
        grown = torch.sigmoid(big.eval()(x))
        random_block = torch.sigmoid(plain.eval()(x))
    assert float((grown - ref).abs().mean()) < 0.02
    assert float((random_block - ref).abs().mean()) > 5 * float((grown - ref).abs().mean())
    with pytest.raises(DataError, match="cannot grow"):
        grow_unet(small, (8, 16, 32, 64))

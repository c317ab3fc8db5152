"""How the predictor cuts a case's crops into batches for the forward pass."""

from __future__ import annotations

import math

from chromobatch.ml.predict import even_batch


def test_a_case_is_cut_into_batches_of_about_one_size() -> None:
    assert even_batch(139, 64) == 47  # 47 + 47 + 45, not 64 + 64 + 11
    assert even_batch(128, 64) == 64
    assert even_batch(46, 64) == 46
    assert even_batch(65, 64) == 33
    assert even_batch(1, 64) == 1


def test_as_few_batches_as_the_setting_allows_none_larger() -> None:
    for batch in (1, 7, 46, 64, 256):
        for n in range(1, 700, 3):
            size = even_batch(n, batch)
            assert size <= batch
            assert math.ceil(n / size) == math.ceil(n / batch)
            sizes = [min(size, n - i) for i in range(0, n, size)]
            assert max(sizes) - min(sizes) <= len(sizes)  # no small remainder batch

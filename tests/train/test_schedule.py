import math

import pytest

from llmlab.train import lr_at


@pytest.mark.parametrize("step, expected", [
    (0, 1 / 3), (1, 2 / 3),                          # linear warmup: (t + 1) / (W + 1)
    (2, 1.0),                                        # the peak, where the cosine starts
    (6, 0.1 + 0.5 * 0.9),                            # half-way down: (lr + min_lr) / 2
    (9, 0.1 + 0.5 * (1 + math.cos(math.pi * 7 / 8)) * 0.9),
    (10, 0.1), (50, 0.1),                            # the floor, past the end too
])
def test_warmup_then_cosine_at_known_steps(step, expected):
    assert lr_at(step, lr=1.0, max_steps=10, warmup_steps=2, min_lr_ratio=0.1) == pytest.approx(expected, abs=1e-12)


def test_no_warmup_starts_at_the_peak_and_decays_monotonically():
    rates = [lr_at(t, 3e-4, 20, 0, 0.0) for t in range(20)]
    assert rates[0] == 3e-4
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert lr_at(20, 3e-4, 20, 0, 0.0) == 0.0

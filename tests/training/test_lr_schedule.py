"""The learning-rate schedule against values worked out by hand (warm-up, then constant / linear / cosine decay)."""
from types import SimpleNamespace

import pytest

from megatron_hdpissa.training.lr_schedule import lr_at


def schedule(style, warmup_iters=2, warmup_fraction=None):
    return SimpleNamespace(lr=1.0, min_lr=0.1, lr_warmup_iters=warmup_iters, lr_warmup_fraction=warmup_fraction,
                           lr_decay_style=style)


@pytest.mark.parametrize("style, expected", [
    # iterations 0..6 of 6: warm-up 1/2, 2/2; then 4 decay iterations, frac = (it - 2) / 4
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.5, 1.0, 1.0, 0.775, 0.55, 0.325, 0.1]),  # 0.1 + (1 - frac) * 0.9
    ("cosine", [0.5, 1.0, 1.0, 0.1 + 0.45 * (1 + 0.5 ** 0.5), 0.55, 0.1 + 0.45 * (1 - 0.5 ** 0.5), 0.1]),
])
def test_warmup_then_decay_to_min_lr(style, expected):
    assert [lr_at(it, schedule(style), 6) for it in range(7)] == pytest.approx(expected, abs=1e-12)


def test_warmup_fraction_overrides_iterations_and_no_warmup_starts_at_lr():
    assert [lr_at(it, schedule("linear", 0, 0.5), 6) for it in range(4)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    assert lr_at(0, schedule("cosine", 0), 6) == 1.0
    assert lr_at(9, schedule("linear"), 6) == pytest.approx(0.1)  # past the end: stays at --min-lr

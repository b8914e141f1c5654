"""The fp16 loss scale around megatron-core's DynamicGradScaler: loss scaling, unscaling, the back-off on
an overflow, and a save / restore round trip (one spawned rank: the CPU shims patch megatron-core)."""
from __future__ import annotations

import pytest
import torch

from tests.helpers.distributed import run_distributed

SCALE, BACKOFF, GROWTH = 8.0, 0.5, 2.0


def _scaler_worker():
    from megatron.core.optimizer.grad_scaler import DynamicGradScaler

    from megatron_hdpissa.models.compat import ensure_cpu_compat
    from megatron_hdpissa.optimizer.grad_scaler import (
        load_scaler_state, record_overflow, scale_loss, scaler_state, unscale_,
    )

    ensure_cpu_compat()

    def make():
        return DynamicGradScaler(initial_scale=SCALE, min_scale=1.0, growth_factor=GROWTH, backoff_factor=BACKOFF,
                                 growth_interval=2, hysteresis=1)

    scaler = make()
    loss = torch.tensor(1.5)
    grads = [torch.tensor([2.0, -4.0]), torch.tensor([[8.0]])]
    unscale_(grads, scaler)
    out = {"scaled": float(scale_loss(loss, scaler)), "unscaled": [g.tolist() for g in grads],
           "plain": scale_loss(loss, None) is loss}
    unscale_(grads, None)  # no scaler: untouched
    out["untouched"] = [g.tolist() for g in grads]
    record_overflow(scaler, True)
    out["after_overflow"] = float(scaler.scale)
    record_overflow(scaler, False)  # one clean step of the growth interval of 2
    record_overflow(None, True)  # no scaler: nothing to do
    saved = scaler_state(scaler)
    restored = make()
    load_scaler_state(restored, saved)
    out["restored"] = float(restored.scale)
    record_overflow(scaler, False)  # the second clean step grows the scale, in both copies alike
    record_overflow(restored, False)
    out["grown"] = (float(scaler.scale), float(restored.scale))
    out["saved_scale_device"] = str(saved["scale"].device)
    return out


@pytest.fixture(scope="module")
def scaler_results():
    return run_distributed(_scaler_worker, 1)[0]


def test_scale_and_unscale(scaler_results):
    assert scaler_results["scaled"] == 1.5 * SCALE
    assert scaler_results["plain"]
    assert scaler_results["unscaled"] == [[2.0 / SCALE, -4.0 / SCALE], [[8.0 / SCALE]]]
    assert scaler_results["untouched"] == scaler_results["unscaled"]


def test_overflow_backs_off_and_state_round_trips(scaler_results):
    assert scaler_results["after_overflow"] == SCALE * BACKOFF
    assert scaler_results["restored"] == SCALE * BACKOFF
    # the growth tracker travelled too: the restored copy grows after the same clean step
    assert scaler_results["grown"] == (SCALE * BACKOFF * GROWTH,) * 2
    assert scaler_results["saved_scale_device"] == "cpu"

"""One AdamW rule for every method: HD-PiSSA's optimizer and the baselines' DataParallelAdamW decay the
same kinds of parameter (factors and matrices, not 1-D norm weights) and skip a step on a non-finite
gradient norm; checked against AdamW's formula written out here (multi-process launch, one rank)."""
from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import toy
from tests.helpers.distributed import run_distributed

R, LR, WD, BETAS, EPS, CLIP = 2, 1e-2, 0.1, (0.9, 0.999), 1e-8, 1.0


def _first_adamw_step(p0: torch.Tensor, g: torch.Tensor, weight_decay: float) -> torch.Tensor:
    """Decoupled AdamW's first step (Loshchilov & Hutter): the bias-corrected moments are g and g^2,
    so p1 = p0 (1 - lr wd) - lr g / (|g| + eps)."""
    p0, g = p0.double(), g.double()
    return p0 * (1 - LR * weight_decay) - LR * g / (g.abs() + EPS)


def _with_norm_weight(model):
    """A trainable 1-D parameter, as a norm weight someone unfreezes."""
    model.norm_weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, toy.H))
    return model


def _set_grads(params, seed: int):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def _decay_worker():
    """One step of each method with the same weight decay: the 1-D weight and one 2-D+ factor,
    before, gradient and after; then a step with an inf gradient under clipping."""
    from megatron_hdpissa import DataParallelAdamW, HDPiSSAConfig, HDPiSSAOptimizer, apply_hd_pissa, apply_lowrank
    from megatron_hdpissa.peft.lowrank.config import LowRankConfig

    out = {}
    for method in ("hd-pissa", "lora"):
        model = toy.MegatronToy(toy.logical_weights(), 1)
        if method == "hd-pissa":  # update_factors: the factors themselves take the AdamW step
            apply_hd_pissa(model, HDPiSSAConfig(rank=R, update_factors=True), progress=False)
            factor = model.linear_fc1.hd_pissa.a["up"]
            make = lambda m: HDPiSSAOptimizer(m, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD,  # noqa: E731
                                              clip_grad=CLIP)
        else:
            apply_lowrank(model, LowRankConfig(method="lora", rank=R), progress=False)
            factor = next(p for n, p in model.named_parameters() if p.requires_grad and "linear_fc1" in n
                          and p.ndim == 2)
            make = lambda m: DataParallelAdamW([p for p in m.parameters() if p.requires_grad],  # noqa: E731
                                               lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, clip_grad=CLIP)
        model = _with_norm_weight(model)
        opt = make(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        _set_grads(trainable, seed=3)
        for p in trainable:  # small gradients: clipping (norm <= CLIP) leaves them as they are
            p.grad.mul_(1e-3)
        before = {"norm": model.norm_weight.detach().clone(), "factor": factor.detach().clone()}
        grads = {"norm": model.norm_weight.grad.clone(), "factor": factor.grad.clone()}
        opt.step()
        after = {"norm": model.norm_weight.detach().clone(), "factor": factor.detach().clone()}
        res = {"before": before, "grads": grads, "after": after, "norm": opt.last_grad_norm,
               "skipped": opt.last_step_skipped}
        opt.zero_grad()
        _set_grads(trainable, seed=4)
        factor.grad.view(-1)[0] = float("inf")
        held = [p.detach().clone() for p in trainable]
        opt.step()
        res["inf"] = {"skipped": opt.last_step_skipped, "skipped_steps": opt.skipped_steps,
                      "norm": opt.last_grad_norm, "unchanged": all(torch.equal(a, b) for a, b in zip(held, trainable))}
        out[method] = res
    return out


@pytest.fixture(scope="module")
def decay_results():
    return run_distributed(_decay_worker, 1)[0]


@pytest.mark.parametrize("method", ["hd-pissa", "lora"])
def test_same_weight_decay_rule_for_every_method(decay_results, method):
    res = decay_results[method]
    assert not res["skipped"] and res["norm"] < CLIP
    for kind, decay in (("norm", 0.0), ("factor", WD)):  # 1-D: no decay; factors and matrices: decay
        assert (res["before"][kind].ndim == 1) == (kind == "norm")
        expected = _first_adamw_step(res["before"][kind], res["grads"][kind], decay)
        wrong = _first_adamw_step(res["before"][kind], res["grads"][kind], WD - decay)
        assert (expected - wrong).abs().max() > 1e-5  # the two rules are told apart at this tolerance
        torch.testing.assert_close(res["after"][kind].double(), expected, rtol=0, atol=1e-6,
                                   msg=lambda m: f"{method} {kind}: {m}")


def test_methods_agree_on_the_rule(decay_results):
    """The relative change of the 1-D weight and of a factor beyond the Adam step is the same
    decay factor for both methods."""
    def decay_factor(res, kind):
        p0, g = res["before"][kind].double(), res["grads"][kind].double()
        adam_only = p0 - LR * g / (g.abs() + EPS)
        return float(((adam_only - res["after"][kind].double()) / (LR * p0)).median())

    for kind, expected in (("norm", 0.0), ("factor", WD)):
        got = [decay_factor(decay_results[m], kind) for m in ("hd-pissa", "lora")]
        assert got == pytest.approx([expected, expected], abs=1e-3), (kind, got)


@pytest.mark.parametrize("method", ["hd-pissa", "lora"])
def test_non_finite_gradient_norm_skips_the_step(decay_results, method):
    res = decay_results[method]["inf"]
    assert res["skipped"] and res["skipped_steps"] == 1 and res["unchanged"], res
    assert not math.isfinite(res["norm"])


def test_rule_and_param_groups():
    from megatron_hdpissa.optimizer.adamw import adamw_deltas, decays, init_state, param_groups_by_decay

    matrix, factor3d, norm, bias = (torch.nn.Parameter(torch.randn(*s)) for s in ((4, 3), (2, 4, 3), (4,), (3,)))
    assert [decays(p) for p in (matrix, factor3d, norm, bias)] == [True, True, False, False]
    groups = param_groups_by_decay([matrix, norm, factor3d, bias], 0.3)
    assert [([id(p) for p in g["params"]], g["weight_decay"]) for g in groups] == [
        ([id(matrix), id(factor3d)], 0.3), ([id(norm), id(bias)], 0.0)]
    assert len(param_groups_by_decay([matrix], 0.3)) == 1  # no empty group
    given = param_groups_by_decay([{"params": [norm, matrix], "lr": 0.5, "weight_decay": 0.2}], 0.3)
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in given] == [(0.5, 0.2, 1), (0.5, 0.0, 1)]
    # adamw_deltas applies the same rule: a 1-D parameter's first step has no decay term
    params = [matrix, norm]
    grads = [torch.randn_like(p) for p in params]
    deltas = adamw_deltas(params, grads, [init_state({}, p) for p in params], LR, *BETAS, EPS, WD)
    for p, g, d, wd in zip(params, grads, deltas, (WD, 0.0)):
        torch.testing.assert_close(p.detach().double() - d.double(), _first_adamw_step(p.detach(), g, wd),
                                   rtol=0, atol=1e-6)

"""Finite or nothing: an update that could put a non-finite value into W, a master, a Kahan term or
a moment is skipped on every rank with all of them untouched (the next step equals the run that
never saw the poisoned step, bit for bit), for HD-PiSSA in each master mode and aggregation path,
and for DataParallelAdamW; and the bounds the guard relies on hold."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import toy
from tests.helpers.distributed import run_distributed

R, MICRO, LR = 2, 2, 1e-3


def _state(opt, model):
    """Everything a step may change: weights and factors, masters, Kahan terms, moments, counts."""
    out = {f"p.{n}": p.detach().clone() for n, p in model.named_parameters()}
    out.update({f"w.{i}": e.weight.detach().clone() for i, e in enumerate(opt.entries)})
    out.update({f"master.{i}": m.data.clone() for i, m in enumerate(opt.masters)})
    out.update({f"comp.{i}": c.clone() for i, c in enumerate(opt.compensation)})
    for i, (p, st) in enumerate(opt.state.items()):
        out.update({f"m.{i}": st["exp_avg"].clone(), f"v.{i}": st["exp_avg_sq"].clone(),
                    f"step.{i}": torch.tensor(float(st["step"]))})
    return out


def _hd_run(master, aggregation, dtype, poison):
    """Steps 0 and 2 of the toy; with `poison`, a poisoned step in between: "lr" (1e30 on every
    rank: finite deltas whose merged product overflows), "nan_rank1" (a NaN gradient on DP rank 1
    only, no clipping so no norm looks at it)."""
    from megatron.core import parallel_state as ps

    from megatron_hdpissa import HDPiSSAConfig, HDPiSSAOptimizer, apply_hd_pissa

    model = toy.MegatronToy(toy.logical_weights(), 1, dtype=dtype)
    apply_hd_pissa(model, HDPiSSAConfig(rank=R, alpha=4.0, master_weights=master, aggregation=aggregation,
                                        consistency_check_interval=1), progress=False)
    opt = HDPiSSAOptimizer(model, lr=LR, clip_grad=0.0)
    dp = ps.get_data_parallel_rank()
    data = toy.make_data(3, ps.get_data_parallel_world_size(), MICRO)
    out = {}
    for step in ([0, 1, 2] if poison else [0, 2]):
        for x, target in data[step][dp]:
            (toy.loss_fn(model(x.to(dtype)).float(), target) / MICRO).backward()
        if step == 1:
            opt.finish_param_gather()
            before = _state(opt, model)
            if poison == "lr":
                opt.param_groups[0]["lr"] = 1e30
            elif dp == 1:
                opt.entries[0].a.grad.view(-1)[0] = float("nan")
        opt.step()
        opt.zero_grad()
        if step == 1:
            opt.finish_param_gather()
            after = _state(opt, model)
            out["skipped"] = (opt.last_step_skipped, opt.last_skip_reason)
            out["untouched"] = sorted(k for k in before if torch.equal(before[k], after[k]))
            out["keys"] = sorted(before)
            opt.param_groups[0]["lr"] = LR
    opt.finish_param_gather()
    out["final"] = {k: v.float() for k, v in model.logical_weights().items()}
    return out


CASES = [("fp32-base", "factors", "float32", "lr"), ("fp32-base", "dense", "float32", "nan_rank1"),
         ("sharded-fp32", "factors", "bfloat16", "nan_rank1"), ("sharded-fp32", "dense", "bfloat16", "lr"),
         ("compensated-bf16", "factors", "bfloat16", "lr")]


def _hd_worker():
    return {case: (_hd_run(*case[:2], getattr(torch, case[2]), case[3]),
                   _hd_run(*case[:2], getattr(torch, case[2]), None)) for case in CASES}


@pytest.fixture(scope="module")
def hd_results():
    return run_distributed(_hd_worker, 2)


@pytest.mark.parametrize("case", CASES, ids=["/".join(c) for c in CASES])
def test_hd_pissa_skips_a_nonfinite_update_on_every_rank(hd_results, case):
    for rank, results in enumerate(hd_results):
        poisoned, clean = results[case]
        assert poisoned["skipped"] == (True, "update"), (rank, poisoned["skipped"])
        assert poisoned["untouched"] == poisoned["keys"], (rank, set(poisoned["keys"]) - set(poisoned["untouched"]))
        assert any(k.startswith("m.") for k in poisoned["keys"])  # the moments were among what was compared
        # moments and step counts untouched: the next step is the clean run's step, bit for bit
        for name, w in clean["final"].items():
            assert torch.equal(poisoned["final"][name], w), (rank, name)
            assert torch.isfinite(w).all()


def _dp_run(poison):
    from megatron_hdpissa.distributed.groups import ParallelGroups
    from megatron_hdpissa.optimizer.data_parallel import DataParallelAdamW

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    opt = DataParallelAdamW(model.parameters(), groups=ParallelGroups.from_megatron(), clip_grad=0.0,
                            lr=LR, weight_decay=0.1)
    out = {}
    for step in ([0, 1, 2] if poison else [0, 2]):
        g = torch.Generator().manual_seed(10 * torch.distributed.get_rank() + step)  # step 2's batch in both runs
        model(torch.randn(4, 6, generator=g)).square().mean().backward()
        if step == 1:
            before = [p.detach().clone() for p in model.parameters()] + \
                     [t.clone() for st in opt.state.values() for t in (st["exp_avg"], st["exp_avg_sq"], st["step"])]
            for group in opt.param_groups:
                group["lr"] = float(poison)
        opt.step()
        opt.zero_grad()
        if step == 1:
            after = [p.detach().clone() for p in model.parameters()] + \
                    [t.clone() for st in opt.state.values() for t in (st["exp_avg"], st["exp_avg_sq"], st["step"])]
            out["skipped"] = (opt.last_step_skipped, opt.last_skip_reason)
            out["untouched"] = all(torch.equal(a, b) for a, b in zip(before, after)) and len(before) == len(after)
            for group in opt.param_groups:
                group["lr"] = LR
    out["final"] = [p.detach().clone() for p in model.parameters()]
    return out


def _dp_worker():
    return {poison: _dp_run(poison) for poison in ("1e37", "nan", None)}


def test_data_parallel_adamw_skips_a_nonfinite_update():
    for rank, results in enumerate(run_distributed(_dp_worker, 2)):
        clean = results[None]["final"]
        for poison in ("1e37", "nan"):
            got = results[poison]
            assert got["skipped"] == (True, "update") and got["untouched"], (rank, poison, got["skipped"])
            for a, b in zip(got["final"], clean):
                assert torch.equal(a, b), (rank, poison)


def test_factor_bound_covers_the_merged_update():
    """Independent of the guard: the merged update of random factors, formed densely in float64,
    never exceeds the bound, and the bound is within a modest factor of it."""
    from megatron_hdpissa.optimizer.finite_guard import factor_bound

    g = torch.Generator().manual_seed(3)
    for k, m, n, r, scale in ((1, 7, 5, 2, 1.0), (3, 16, 9, 4, 1e-3), (2, 4, 30, 3, 1e20)):
        a, b = torch.randn(k, r, n, generator=g, dtype=torch.float64), torch.randn(k, m, r, generator=g, dtype=torch.float64)
        da, db = scale * torch.randn_like(a), scale * torch.randn_like(b)
        update = sum((b[i] - db[i]) @ (a[i] - da[i]) - b[i] @ a[i] for i in range(k))
        bound = float(factor_bound([(None, da, db)], lambda _: (a, b)))
        assert update.abs().max() <= bound < 50 * update.abs().max() * (m * n) ** 0.5, (k, m, n, r, scale)


def test_adam_ratio_bound_holds_for_adversarial_gradients():
    """torch.optim.AdamW with lr 1 and no decay moves a parameter by exactly the ratio: it never
    exceeds `adam_ratio_bound` at any step, for gradients that swing by 12 orders of magnitude."""
    from megatron_hdpissa.optimizer.finite_guard import adam_ratio_bound

    for betas in ((0.9, 0.999), (0.5, 0.6), (0.0, 0.99)):
        p = torch.zeros(4, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.AdamW([p], lr=1.0, betas=betas, eps=0.0, weight_decay=0.0)
        for step in range(1, 60):
            p.grad = torch.tensor([1e6 if step % 7 == 1 else 1e-6, 1.0, -1.0 if step % 2 else 1.0,
                                   1e-6 if step < 30 else 1e6], dtype=torch.float64)
            before = p.detach().clone()
            opt.step()
            moved = float((p.detach() - before).abs().max())
            assert moved <= adam_ratio_bound(*betas, step) * (1 + 1e-12), (betas, step, moved)

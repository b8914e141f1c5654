"""checkpoint/trainer_state.py and the legacy format (checkpoint/trainer_legacy.py) through `TrainerState`:
a save / load round trip restores adapters, AdamW moments, data positions, RNG and the iteration
into a fresh state (base weights excluded from the rank file), the method comes from the model's
recorded PEFT method, a reseed is `seed + 100003 x iteration + rank`, and resume errors name the
method's rank flag (both formats)."""
from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from megatron_hdpissa.checkpoint import trainer_dist, trainer_legacy
from megatron_hdpissa.checkpoint.trainer_state import (RESEED_ITERATION_STRIDE, TrainerState, is_training_checkpoint,
                                                       read_meta, reseed)
from megatron_hdpissa.distributed.groups import ParallelGroups
from megatron_hdpissa.peft.common import record_method


class _Data:
    """A batch iterator's position, as SFTBatchIterator exposes it."""

    def __init__(self, position: int = 0):
        self.position = position

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def _state(seed: int, method: str = "lora") -> TrainerState:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3))
    model[0].add_module("lora", nn.Linear(4, 3, bias=False))  # an adapter child: keys "0.lora.*"
    model[0].weight.requires_grad_(False)
    record_method(model, method, None, None)
    optimizer = torch.optim.AdamW([model[0].lora.weight, model[0].bias], lr=0.1)
    groups = ParallelGroups(None, None, 0, 1, 0, 1)
    return TrainerState(model, optimizer, groups, [_Data(), _Data()], iteration=0, meta={"peft": method}, seed=seed)


def _step(state: TrainerState) -> None:
    loss = state.model(torch.randn(2, 4)).square().sum() + state.model[0].lora(torch.randn(2, 4)).sum()
    loss.backward()
    state.optimizer.step()
    state.optimizer.zero_grad()


def test_legacy_round_trip_restores_the_state(tmp_path):
    saved = _state(seed=1)
    _step(saved)
    saved.iteration, saved.data[0].position, saved.data[1].position = 7, 11, 13
    trainer_legacy.save(saved, tmp_path)
    after_save = (torch.rand(3), random.random())  # what the RNG gives next after the save
    assert is_training_checkpoint(tmp_path) and read_meta(tmp_path) == {"peft": "lora"}

    fresh = _state(seed=2)
    assert not torch.equal(fresh.model[0].lora.weight, saved.model[0].lora.weight)
    restored = trainer_legacy.load(fresh, tmp_path)
    assert restored.iteration == 7 and [d.position for d in fresh.data] == [11, 13]
    assert torch.equal(fresh.model[0].lora.weight, saved.model[0].lora.weight)
    # base weights come from the model files, not the rank file: the fresh base stays
    assert not torch.equal(fresh.model[0].weight, saved.model[0].weight)
    for p_fresh, p_saved in zip(fresh.optimizer.param_groups[0]["params"], saved.optimizer.param_groups[0]["params"]):
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(fresh.optimizer.state[p_fresh][moment], saved.optimizer.state[p_saved][moment])
    assert torch.equal(torch.rand(3), after_save[0]) and random.random() == after_save[1]
    model_file = tmp_path / "iter_0000007" / "mp_rank_00" / "model_optim_rng.pt"
    assert torch.equal(torch.load(model_file, weights_only=True)["model"]["0.weight"], saved.model[0].weight)


def test_the_method_comes_from_the_model():
    assert not _state(seed=0, method="lora").is_hd_pissa
    assert _state(seed=0, method="hd-pissa").is_hd_pissa


def test_reseed_is_seed_plus_stride_times_iteration_plus_rank():
    assert RESEED_ITERATION_STRIDE == 100003
    for seed, iteration, rank in ((1234, 0, 0), (1234, 5, 3), (7, 2, 1)):
        reseed(seed, iteration, rank)
        got = (torch.rand(2), random.random())
        value = seed + 100003 * iteration + rank
        torch.manual_seed(value)
        random.seed(value)
        assert torch.equal(got[0], torch.rand(2)) and got[1] == random.random()


def test_resume_errors_name_the_methods_rank_flag(tmp_path):
    for module in (trainer_legacy, trainer_dist):
        for peft, flag in (("lora", "--lora-rank"), ("hd-pissa", "--hd-pissa-rank")):
            meta = {"peft": peft, "rank": 4, "dp_size": 1, "tp_size": 1, "virtual_ranks": 1}
            with pytest.raises(ValueError, match=f"saved with {flag} =? ?4, this run has 8"):
                module.check_compatible(meta, {**meta, "rank": 8}, tmp_path)


def test_resume_with_other_trainable_modules_is_refused(tmp_path):
    """A resume that would freeze a trained router (or train a new module from no moments) fails
    naming both sets and the flags; the same set in another order, or an old meta without a
    config, passes."""
    for module in (trainer_legacy, trainer_dist):
        meta = {"peft": "hd-pissa", "rank": 4, "dp_size": 1, "tp_size": 1, "virtual_ranks": 1,
                "config": {"trainable_modules": ["final_layernorm", "mlp.router"]}}
        frozen = {**meta, "config": {"trainable_modules": ["final_layernorm"]}}
        with pytest.raises(ValueError, match=r"trainable modules \['final_layernorm', 'mlp.router'\], this run "
                                             r"has \['final_layernorm'\] .*--moe-router-trainable"):
            module.check_compatible(meta, frozen, tmp_path)
        with pytest.raises(ValueError, match=r"trainable modules none, this run has \['mlp.router'\]"):
            module.check_compatible({**meta, "config": {"trainable_modules": []}},
                                    {**meta, "config": {"trainable_modules": ["mlp.router"]}}, tmp_path)
        module.check_compatible(meta, {**meta, "config": {"trainable_modules": ["mlp.router", "final_layernorm"]}},
                                tmp_path)
        module.check_compatible({k: v for k, v in meta.items() if k != "config"}, frozen, tmp_path)

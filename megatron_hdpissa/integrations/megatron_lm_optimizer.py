"""`HDPiSSAOptimizer` behind the interface Megatron-LM's training loop and checkpointing call."""
from __future__ import annotations

import torch
from torch import nn

from megatron_hdpissa.distributed.groups import ParallelGroups
from megatron_hdpissa.integrations.megatron_lm_model import mark_restored

SHARDED_KEY = "optimizer.hd_pissa_state"


class MegatronHDPiSSAOptimizer:
    """`HDPiSSAOptimizer` with the interface Megatron-LM's training loop and checkpointing call."""

    is_stub_optimizer = False

    def __init__(self, model: nn.Module, lr: float, betas, eps: float, weight_decay: float,
                 clip_grad: float = 0.0):
        from megatron_hdpissa.optimizer.hd_pissa import HDPiSSAOptimizer

        self.model = model
        self.groups: ParallelGroups = model.hd_pissa_groups
        self.optimizer = HDPiSSAOptimizer(model, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                          groups=self.groups, clip_grad=clip_grad)
        self.optimizer.track_grad_norm = True  # Megatron-LM logs the gradient norm
        for group in self.optimizer.param_groups:
            group["default_config"] = True  # Megatron logs the lr of such a group
        self._checked = False

    # -- what train_step calls --------------------------------------------------------------
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True):
        self.optimizer.zero_grad(set_to_none=True)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def get_loss_scale(self) -> torch.Tensor:
        return torch.ones(1, device=self._device())

    def reload_model_params(self, state_dict=None):
        """Nothing to refresh: the optimizer keeps no copies of the model's weights."""

    def _device(self):
        return next(iter(self.optimizer.entries)).weight.device

    def check_not_in_ddp(self):
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if hasattr(p, "main_grad"):
                    raise RuntimeError(
                        "an HD-PiSSA parameter has a megatron DDP main_grad: DDP was built after the "
                        "optimizer hook and would all-reduce the per-rank factor gradients; build DDP "
                        "first (Megatron-LM's order) so the parameters are still frozen then")
        self._checked = True

    @torch.no_grad()
    def step(self):
        """(update_successful, grad_norm, num_zeros_in_grad), as Megatron's optimizers return.
        grad_norm is the global one (every DP rank's factors, TP shards summed once), the norm
        --clip-grad clips; a non-finite gradient on any rank skips the step on all ranks."""
        if not self._checked:
            self.check_not_in_ddp()
        self.optimizer.step()
        if self.optimizer.last_step_skipped:
            self.optimizer.zero_grad(set_to_none=True)
            return False, self.optimizer.last_grad_norm, None
        return True, self.optimizer.last_grad_norm, None

    # -- checkpoints ------------------------------------------------------------------------
    def _factors(self):
        return [p for e in self.optimizer.entries for p in (e.a, e.b)]

    def _local_state(self, complete: bool) -> dict:
        g = self.groups
        return {
            "optimizer": self.optimizer.state_dict(),
            "factors": [p.detach().clone() for p in self._factors()],
            "names": [f"{e.name}:{e.part.name}" for e in self.optimizer.entries],
            "dp_rank": g.dp_rank, "dp_size": g.dp_size, "tp_rank": g.tp_rank, "tp_size": g.tp_size,
            "pp_rank": g.pp_rank, "pp_size": g.pp_size, "complete": complete,
        }

    def state_dict(self) -> dict:
        """This rank's HD-PiSSA state. Megatron's legacy format saves only data-parallel rank 0's,
        which holds every rank's state only when there is one data-parallel rank."""
        return {"hd_pissa": self._local_state(complete=self.groups.dp_size == 1)}

    def sharded_state_dict(self, model_sharded_state_dict=None, is_loading: bool = False, **kwargs) -> dict:
        """`torch_dist` checkpoints: one object per (pipeline, tensor, data-parallel) rank."""
        from megatron.core import parallel_state as ps
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        g = self.groups
        pp_size, pp_rank = 1, 0
        if ps.model_parallel_is_initialized():
            pp_size = ps.get_pipeline_model_parallel_world_size()
            pp_rank = ps.get_pipeline_model_parallel_rank()
        obj = ShardedObject(SHARDED_KEY, self._local_state(complete=True), (pp_size, g.tp_size, g.dp_size),
                            (pp_rank, g.tp_rank, g.dp_rank), replica_id=0)
        return {"hd_pissa": obj}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Restore this rank's factors and moments (then skip the post-load decomposition)."""
        st = state_dict.get("hd_pissa") if isinstance(state_dict, dict) else None
        if st is None:
            raise KeyError("the optimizer state has no 'hd_pissa' entry: it was not written by the HD-PiSSA "
                           "optimizer hook; load with --no-load-optim (or --finetune) to decompose afresh")
        g = self.groups
        if not st["complete"]:
            raise RuntimeError(
                f"this checkpoint holds the HD-PiSSA state of data-parallel rank 0 only (legacy --ckpt-format "
                f"torch with {st['dp_size']} data-parallel ranks); resume needs --ckpt-format torch_dist, or "
                "add --no-load-optim to continue from its weights with a fresh decomposition")
        saved = tuple(st.get(k, 0 if k == "pp_rank" else 1) for k in
                      ("dp_rank", "dp_size", "tp_rank", "tp_size", "pp_rank", "pp_size"))
        if saved != (g.dp_rank, g.dp_size, g.tp_rank, g.tp_size, g.pp_rank, g.pp_size):
            raise ValueError(f"HD-PiSSA optimizer state of DP {saved[0]}/{saved[1]}, TP {saved[2]}/{saved[3]}, "
                             f"PP {saved[4]}/{saved[5]} loaded on DP {g.dp_rank}/{g.dp_size}, TP "
                             f"{g.tp_rank}/{g.tp_size}, PP {g.pp_rank}/{g.pp_size}: resume with the same "
                             "parallel layout (--pipeline-model-parallel-size included)")
        names = [f"{e.name}:{e.part.name}" for e in self.optimizer.entries]
        if st["names"] != names:
            raise ValueError("the HD-PiSSA optimizer state targets other layers than this model "
                             "(--hd-pissa-target-modules differs from the saved run)")
        for p, saved in zip(self._factors(), st["factors"]):
            p.copy_(saved)
        self.optimizer.load_state_dict(st["optimizer"])
        self.optimizer.refresh_gathered_factors()
        mark_restored(self.model)

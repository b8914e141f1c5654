"""`HDPiSSAOptimizer` behind the interface Megatron-LM's training loop and checkpointing call,
chained with Megatron-LM's own optimizer for the other trainable parameters."""
from __future__ import annotations

import math

import torch
from torch import nn

from megatron_hdpissa.distributed.groups import ParallelGroups
from megatron_hdpissa.integrations.megatron_lm_model import mark_restored, on_decompose
from megatron_hdpissa.optimizer.clip_grads import clip_, global_grad_norm, record_step

SHARDED_KEY = "optimizer.hd_pissa_state"


def _main_grad(p: torch.Tensor):
    """The gradient a megatron-core optimizer steps its (fp32 main) parameter with."""
    g = getattr(p, "decoupled_grad", None)  # --use-precision-aware-optimizer
    return g if g is not None else p.grad


class MegatronHDPiSSAOptimizer:
    """`HDPiSSAOptimizer` with the interface Megatron-LM's training loop and checkpointing call.

    `others`: Megatron-LM's own optimizer (`get_megatron_optimizer`, built without clipping) for
    the trainable parameters that are not factors (`--hd-pissa-trainable-modules`); it keeps their
    fp32 main copies with `--bf16` and shards them with `--use-distributed-optimizer`. One step
    takes one global gradient norm (every DP rank's factors, plus `others.get_grad_norm()`),
    skips on every rank when it is not finite, and clips both with one coefficient.
    """

    is_stub_optimizer = False

    def __init__(self, model: nn.Module, lr: float, betas, eps: float, weight_decay: float,
                 clip_grad: float = 0.0, others=None):
        from megatron_hdpissa.optimizer.hd_pissa import HDPiSSAOptimizer

        self.model = model
        self.groups: ParallelGroups = model.hd_pissa_groups
        self.others = others
        self.clip_grad = float(clip_grad or 0.0)
        # clip_grad=0: this class clips, over the factors and Megatron's parameters together
        self.optimizer = HDPiSSAOptimizer(model, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                          groups=self.groups, clip_grad=0.0, others_optimizer="builtin")
        if len(self.optimizer.param_groups) != 1:
            raise RuntimeError("the HD-PiSSA optimizer took parameters other than the factors")
        for group in self.optimizer.param_groups:
            group["default_config"] = True  # Megatron logs the lr of such a group
        self._checked = False
        on_decompose(model, self.reload_masters)

    # -- what train_step calls --------------------------------------------------------------
    @property
    def param_groups(self):
        """HD-PiSSA's group, then Megatron's optimizer's groups (the LR scheduler sets them all)."""
        return self.optimizer.param_groups + (list(self.others.param_groups) if self.others else [])

    @property
    def state(self):
        return self.optimizer.state

    @property
    def masters_mode(self) -> str:
        return self.optimizer.master_mode

    def zero_grad(self, set_to_none: bool = True):
        self.optimizer.zero_grad(set_to_none=True)
        if self.others is not None:
            self.others.zero_grad(set_to_none)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def get_loss_scale(self) -> torch.Tensor:
        return torch.ones(1, device=self._device())

    def _device(self):
        return next(iter(self.optimizer.entries)).weight.device

    @torch.no_grad()
    def reload_masters(self) -> None:
        """Re-read the full-precision values from the weights (after a checkpoint load or the
        post-load decomposition): sharded fp32 masters take their row blocks of W, Kahan terms
        restart at zero."""
        self.optimizer.finish_param_gather()
        for m in self.optimizer.masters:
            m.data.copy_(m.weight.detach()[m.lo:m.hi].float())
        for c in self.optimizer.compensation:
            c.zero_()

    def reload_model_params(self, state_dict=None):
        """Megatron-LM calls this after loading weights without optimizer state (`--bf16`)."""
        self.reload_masters()
        if self.others is not None:
            self.others.reload_model_params(state_dict)

    def prepare_model_params_for_param_sync(self) -> None:
        self.optimizer.finish_param_gather()
        if self.others is not None and hasattr(self.others, "prepare_model_params_for_param_sync"):
            self.others.prepare_model_params_for_param_sync()

    def check_not_in_ddp(self):
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if hasattr(p, "main_grad"):
                    raise RuntimeError(
                        "an HD-PiSSA parameter has a megatron DDP main_grad: DDP was built after the "
                        "optimizer hook and would all-reduce the per-rank factor gradients; build DDP "
                        "first (Megatron-LM's order) so the parameters are still frozen then")
        self._checked = True

    def _factor_grads(self):
        """(is a TP shard, gradient) of each factor: the column-parallel B and the row-parallel A
        are TP shards, the other factor is replicated."""
        out = []
        for e in self.optimizer.entries:
            column = e.adapter.kind == "column"
            for p, sharded in ((e.a, not column), (e.b, column)):
                if p.grad is not None:
                    out.append((sharded and e.adapter.tp_size > 1, p.grad))
        return out

    @torch.no_grad()
    def step(self):
        """(update_successful, grad_norm, num_zeros_in_grad), as Megatron's optimizers return.
        grad_norm is the global one (every DP rank's factors, TP shards summed once, and
        Megatron's parameters), the norm --clip-grad clips; a non-finite gradient on any rank
        skips the step on all ranks."""
        if not self._checked:
            self.check_not_in_ddp()
        self.optimizer.finish_param_gather()
        factor_grads = self._factor_grads()
        found_inf = bool(self.others.prepare_grads()) if self.others is not None else False
        norm = global_grad_norm(factor_grads, [], self.groups)
        if self.others is not None:
            norm = math.sqrt(norm ** 2 + float(self.others.get_grad_norm() or 0.0) ** 2)
        if found_inf:
            norm = math.inf
        if record_step(self.optimizer, norm, not math.isfinite(norm)):
            self.zero_grad()
            return False, norm, None
        others_grads = [] if self.others is None else [
            g for g in map(_main_grad, self.others.get_parameters()) if g is not None]
        clip_([g for _, g in factor_grads] + others_grads, norm, self.clip_grad)
        self.optimizer.step()
        if self.optimizer.last_step_skipped:  # its finite guard refused the update: nothing taken
            self.zero_grad()
            return False, norm, None
        self.optimizer.last_grad_norm = norm
        if self.others is not None:
            self.others.step_with_ready_grads()
        return True, norm, None

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
        out = {"hd_pissa": self._local_state(complete=self.groups.dp_size == 1)}
        if self.others is not None:
            out["megatron"] = self.others.state_dict()
        return out

    def sharded_state_dict(self, model_sharded_state_dict=None, is_loading: bool = False, **kwargs) -> dict:
        """`torch_dist` checkpoints: one object per (pipeline, tensor, data-parallel) rank, and
        Megatron's optimizer's own sharded state."""
        from megatron.core import parallel_state as ps
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        g = self.groups
        pp_size, pp_rank = 1, 0
        if ps.model_parallel_is_initialized():
            pp_size = ps.get_pipeline_model_parallel_world_size()
            pp_rank = ps.get_pipeline_model_parallel_rank()
        obj = ShardedObject(SHARDED_KEY, self._local_state(complete=True), (pp_size, g.tp_size, g.dp_size),
                            (pp_rank, g.tp_rank, g.dp_rank), replica_id=0)
        out = {"hd_pissa": obj}
        if self.others is not None:
            out["megatron"] = self.others.sharded_state_dict(model_sharded_state_dict, is_loading=is_loading, **kwargs)
        return out

    def save_parameter_state(self, filename: str):
        """Legacy format with --use-distributed-optimizer: Megatron's optimizer's sharded state."""
        if self.others is not None and hasattr(self.others, "save_parameter_state"):
            self.others.save_parameter_state(filename)

    def load_parameter_state(self, filename: str, **kwargs):
        if self.others is not None and hasattr(self.others, "load_parameter_state"):
            self.others.load_parameter_state(filename, **kwargs)

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
        if self.others is not None:
            if "megatron" not in state_dict:
                raise KeyError("the optimizer state has no 'megatron' entry for --hd-pissa-trainable-modules: "
                               "it was saved without them; load with --no-load-optim")
            self.others.load_state_dict(state_dict["megatron"])
        mark_restored(self.model)

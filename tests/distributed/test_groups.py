"""distributed.groups.initialize on groups set up before it (a launcher, a test harness): expert
sizes other than the ones asked for are an error, not silently kept (the trainer's
--expert-model-parallel-size used to be ignored once megatron-core was initialised)."""
from __future__ import annotations

from tests.helpers.distributed import run_distributed


def _initialize_again(ep: int, etp):
    from megatron_hdpissa.distributed.groups import initialize

    try:
        g = initialize(1, 1, expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)
    except ValueError as err:
        return str(err)
    return (g.ep_size, g.etp_size)


def _cases():
    return [_initialize_again(2, None), _initialize_again(1, None), _initialize_again(2, 2)]


def test_initialize_refuses_other_expert_sizes_than_set_up():
    same, other_ep, other_etp = run_distributed(_cases, 2, ep=2)[0]
    assert same == (2, 1)
    assert "expert-parallel size 2" in other_ep and "--expert-model-parallel-size 1" in other_ep, other_ep
    assert "--expert-tensor-parallel-size 2" in other_etp, other_etp

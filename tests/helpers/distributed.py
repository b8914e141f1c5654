"""Run a test function on N real processes (gloo on CPU) with megatron-core groups initialised."""
from __future__ import annotations

import os
import pickle
import tempfile
import time
import traceback

import torch
import torch.multiprocessing as mp

from megatron_hdpissa.distributed.groups import free_port, initialize, shutdown


# imported once by the forkserver; every rank is forked from it with these already loaded
PRELOAD = ["torch", "megatron.core", "megatron.core.parallel_state", "megatron_hdpissa.distributed.groups",
           "megatron_hdpissa.training.finetune", "transformers", "tests.helpers.distributed"]


def _worker(rank, world_size, tp, port, fn, args, out_dir, backend, pp, environ, cwd, ep=1, etp=None):
    # a forkserver child starts with the forkserver's environment and folder, not the test's
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    try:
        initialize(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, backend=backend,
                   expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)
        result = fn(*args)
        error = None
    except BaseException:  # noqa: BLE001 - shipped back to the parent test
        result, error = None, traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump((result, error), f)
    try:
        shutdown()
    except Exception:  # noqa: BLE001
        pass


def run_distributed(fn, world_size: int, tp: int = 1, args: tuple = (), backend: str = "gloo",
                    pp: int = 1, ep: int = 1, etp: int | None = None, timeout: float | None = 900.0) -> list:
    """Spawn `world_size` processes, run `fn(*args)` in each after megatron-core initialisation
    with tensor / pipeline / expert-model / expert-tensor parallel sizes `tp` / `pp` / `ep` /
    `etp` (None: TP), and return the per-rank results (re-raising any failure). `timeout`
    (seconds): ranks still running then are killed and a TimeoutError names them (a hang fails)."""
    mp.set_forkserver_preload(PRELOAD)  # read when the forkserver starts (first call of the session)
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _worker,
            args=(world_size, tp, free_port(), fn, args, out_dir, backend, pp, dict(os.environ), os.getcwd(),
                  ep, etp),
            nprocs=world_size,
            join=False,
            start_method="forkserver",
        )
        deadline = None if timeout is None else time.monotonic() + timeout
        while not ctx.join(None if deadline is None else max(deadline - time.monotonic(), 0.0)):
            if deadline is not None and time.monotonic() >= deadline:
                stuck = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                        p.join()
                raise TimeoutError(f"ranks {stuck} of {world_size} still running after {timeout} s (killed); "
                                   f"the others ended with: {_outcomes(out_dir, world_size, stuck)}")
        results = []
        for rank in range(world_size):
            with open(os.path.join(out_dir, f"rank{rank}.pkl"), "rb") as f:
                result, error = pickle.load(f)
            if error is not None:
                raise RuntimeError(f"rank {rank} failed:\n{error}")
            results.append(result)
    return results


def _outcomes(out_dir: str, world_size: int, stuck: list[int]) -> dict[int, str]:
    """Each finished rank's outcome: its error's last line, or "ok"."""
    out = {}
    for rank in sorted(set(range(world_size)) - set(stuck)):
        path = os.path.join(out_dir, f"rank{rank}.pkl")
        if not os.path.exists(path):
            out[rank] = "died without a result"
            continue
        with open(path, "rb") as f:
            _, error = pickle.load(f)
        out[rank] = "ok" if error is None else error.strip().splitlines()[-1]
    return out

"""Named phases of an optimizer step, as profiler ranges and through an optional timing hook."""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Optional

import torch

# clip: global norm and clipping; adam: the AdamW steps; aggregate: the step's data-parallel
# communication and the merge into W or the masters; param_gather: the all-gather of weights
# from sharded masters (launch and finish_param_gather)
PHASES = ("clip", "adam", "aggregate", "param_gather")
RANGE_PREFIX = "hd_pissa.optimizer."

PhaseHook = Callable[[str], ContextManager]


@contextlib.contextmanager
def phase(name: str, hook: Optional[PhaseHook] = None):
    """Run the body inside the profiler range `hd_pissa.optimizer.<name>` and, when set, inside
    `hook(name)` (timing and synchronisation are the hook's business)."""
    assert name in PHASES, name
    with torch.profiler.record_function(RANGE_PREFIX + name):
        if hook is None:
            yield
        else:
            with hook(name):
                yield

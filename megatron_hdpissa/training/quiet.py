"""megatron-core's import-time notices, one line per run: without Apex / Transformer Engine it
warns once per module and per process that it falls back to torch (about 40 lines of stderr
from 2 ranks before anything of ours). The trainer and the tools install `quiet_megatron_notices`
before their first megatron import; rank 0 logs `hidden_notices_line()` once."""
from __future__ import annotations

import warnings
from typing import Optional

# what megatron-core says when Apex / Transformer Engine are missing, and its own default's deprecation
NOTICES = ("Transformer Engine and Apex are not installed", "Apex is not installed",
           "full scope is deprecated")
hidden: list[str] = []


def _is_notice(message, filename) -> bool:
    return "megatron" in str(filename) and any(n in str(message) for n in NOTICES)


def quiet_megatron_notices() -> None:
    """Keep megatron-core's fallback notices out of stderr, counting them (idempotent; every other
    warning is shown as before)."""
    show = warnings.showwarning
    if getattr(show, "hides_megatron_notices", False):
        return

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if _is_notice(message, filename):
            hidden.append(str(message))
            return
        show(message, category, filename, lineno, file, line)

    showwarning.hides_megatron_notices = True
    warnings.showwarning = showwarning


def hidden_notices_line() -> Optional[str]:
    """The one line that stands for the hidden notices, or None if there were none."""
    if not hidden:
        return None
    apex = any("Apex" in m for m in hidden)
    return (f"megatron-core: {'no Apex / Transformer Engine, using its torch fallbacks; ' if apex else ''}"
            f"{len(hidden)} import-time warnings not shown")

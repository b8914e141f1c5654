"""`pip install .` gives every command-line tool as a console script, with the flags of its
tools/*.py twin (which runs the same code from a source checkout)."""
from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def console_scripts() -> dict[str, str]:
    """name -> "module:function" from setup.py's entry_points, read without running setup()."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "entry_points":
            entries = ast.literal_eval(node.value)["console_scripts"]
            return dict(entry.replace(" ", "").split("=", 1) for entry in entries)
    raise AssertionError("setup.py declares no entry_points")


TOOLS = {"convert_hf_to_megatron": "hdpissa-convert-hf-to-megatron",
         "convert_megatron_to_hf": "hdpissa-convert-megatron-to-hf",
         "effective_rank": "hdpissa-effective-rank",
         "plot_curves": "hdpissa-plot-curves"}


def test_every_tool_has_a_console_script_running_the_same_main():
    scripts = console_scripts()
    assert set(TOOLS.values()) | {"hdpissa-finetune"} <= set(scripts)
    for tool, script in TOOLS.items():
        module, func = scripts[script].split(":")
        target = getattr(importlib.import_module(module), func)
        # tools/<tool>.py runs the very function the console script runs
        source = (REPO / "tools" / f"{tool}.py").read_text()
        assert f"from {module} import main" in source, tool
        assert callable(target)


@pytest.mark.parametrize("script", sorted(TOOLS.values()))
def test_installed_console_script_prints_its_flags(script):
    exe = BIN / script
    if not exe.exists():
        pytest.skip(f"{script} is not installed next to {sys.executable} (pip install . installs it)")
    tool = next(t for t, s in TOOLS.items() if s == script)
    installed = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120,
                               env={**os.environ, "COLUMNS": "200"})
    checkout = subprocess.run([sys.executable, f"tools/{tool}.py", "--help"], capture_output=True, text=True,
                              timeout=120, cwd=REPO, env={**os.environ, "COLUMNS": "200"})
    assert installed.returncode == 0 and checkout.returncode == 0, installed.stderr + checkout.stderr
    # the same flags either way (the program name in the usage line differs)
    flags = lambda text: sorted({w.strip(",[]") for w in text.split() if w.startswith("--")})  # noqa: E731
    assert flags(installed.stdout) == flags(checkout.stdout)
    assert len(flags(installed.stdout)) >= 3

"""Markdown pieces the benchmark reports share: numbers, the machine line, the model line, output files."""
from __future__ import annotations

import json


def fmt(x, spec=".0f", none="-"):
    """x formatted with spec; `none` for a missing value."""
    return none if x is None else format(x, spec)


def describe_machine(info, threads="") -> str:
    """The machine_info line of the tables, up to the device (threads: what follows the count)."""
    return (f"{info['cpu']}, {info['logical_cores']} logical cores "
            f"({info['cores_available']} available, 1-min load {fmt(info['load_avg_1m'], '.1f')} at start), "
            f"torch threads {info['torch_threads']}{threads}, torch {info['torch']}, "
            f"megatron-core {info['megatron_core']}, Python {info['python']}, device {info['device']}"
            + (f" ({info['gpu']})" if info.get("gpu") else ""))


def describe_model(args) -> str:
    """`layers x [the four linears and the mixer, with their shapes]`."""
    return (f"{args.layers} x [linear_qkv {args.hidden}->{(args.heads + 2 * args.groups) * args.head_dim} "
            f"({args.heads} heads / {args.groups} groups, head dim {args.head_dim}), "
            f"{args.mixer} mixer, linear_proj {args.heads * args.head_dim}->{args.hidden}, "
            f"linear_fc1 {args.hidden}->{2 * args.ffn} (gate/up), linear_fc2 {args.ffn}->{args.hidden}]")


def write_files(args, md: str, record: dict, default=None) -> None:
    """The markdown to --markdown-out and the record to --json-out, where given."""
    if args.markdown_out:
        with open(args.markdown_out, "w") as f:
            f.write(md)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(record, f, indent=2, default=default)

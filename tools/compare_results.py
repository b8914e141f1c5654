"""Compare the JSON / JSONL result files of two runs of the same command (e.g. under SLURM and torchrun).

    python tools/compare_results.py REFERENCE_DIR OTHER_DIR [--rtol 0] [--atol 0] [--ignore KEY ...]

Every *.json and *.jsonl file under REFERENCE_DIR must exist under OTHER_DIR with the same
structure; numbers must agree within the tolerances (exact by default: the same command on
the same CPUs is deterministic), anything else exactly. Keys named by --ignore (timings, paths,
host names) are skipped at any depth. Other files are listed, not compared. Exit status 0 when
all agree, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def differences(ref, other, path: str, rtol: float, atol: float, ignore: set[str]) -> list[str]:
    """Human-readable differences between two decoded JSON values."""
    if isinstance(ref, bool) or isinstance(other, bool):
        return [] if ref is other else [f"{path}: {ref!r} != {other!r}"]
    if isinstance(ref, (int, float)) and isinstance(other, (int, float)):
        if math.isnan(ref) and math.isnan(other):
            return []
        if math.isclose(ref, other, rel_tol=rtol, abs_tol=atol):
            return []
        return [f"{path}: {ref!r} != {other!r}"]
    if isinstance(ref, dict) and isinstance(other, dict):
        out = []
        keys = (ref.keys() | other.keys()) - ignore
        for key in sorted(keys):
            if key not in other:
                out.append(f"{path}.{key}: missing in the second run")
            elif key not in ref:
                out.append(f"{path}.{key}: only in the second run")
            else:
                out += differences(ref[key], other[key], f"{path}.{key}", rtol, atol, ignore)
        return out
    if isinstance(ref, list) and isinstance(other, list):
        if len(ref) != len(other):
            return [f"{path}: {len(ref)} items != {len(other)} items"]
        out = []
        for i, (a, b) in enumerate(zip(ref, other)):
            out += differences(a, b, f"{path}[{i}]", rtol, atol, ignore)
        return out
    return [] if ref == other else [f"{path}: {ref!r} != {other!r}"]


def _load(path: Path):
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return json.loads(path.read_text())


def compare_dirs(ref_dir: Path, other_dir: Path, rtol: float = 0.0, atol: float = 0.0,
                 ignore: set[str] = frozenset()) -> tuple[list[str], list[str]]:
    """(problems, compared file names)."""
    problems, compared = [], []
    files = sorted(p for p in ref_dir.rglob("*") if p.is_file())
    if not any(p.suffix in (".json", ".jsonl") for p in files):
        problems.append(f"no .json/.jsonl result file under {ref_dir}")
    for ref_file in files:
        rel = ref_file.relative_to(ref_dir)
        if ref_file.suffix not in (".json", ".jsonl"):
            print(f"  (not compared: {rel})")
            continue
        other_file = other_dir / rel
        if not other_file.is_file():
            problems.append(f"{rel}: missing under {other_dir}")
            continue
        problems += [f"{rel}{d}" for d in differences(_load(ref_file), _load(other_file), "", rtol, atol, ignore)]
        compared.append(str(rel))
    return problems, compared


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reference", type=Path)
    p.add_argument("other", type=Path)
    p.add_argument("--rtol", type=float, default=0.0)
    p.add_argument("--atol", type=float, default=0.0)
    p.add_argument("--ignore", nargs="*", default=[], help="keys to skip at any depth")
    args = p.parse_args(argv)
    problems, compared = compare_dirs(args.reference, args.other, args.rtol, args.atol, set(args.ignore))
    for line in problems[:50]:
        print(f"  DIFFERENT {line}")
    if len(problems) > 50:
        print(f"  ... and {len(problems) - 50} more")
    verdict = "agree" if not problems else "DISAGREE"
    print(f"{args.reference} vs {args.other}: {len(compared)} file(s) compared, {verdict}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())

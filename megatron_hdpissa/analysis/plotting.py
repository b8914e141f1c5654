"""Figures of the tools and the study: spectra of W_T - W_0 and learning curves from --log-json files."""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path) -> Path:
    """Lay out, write (80 dpi PNG, parent folders created) and close `fig`; returns the path."""
    plt = _pyplot()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_spectra(results: dict, threshold: float, path, title: str = "") -> Path:
    """One panel per projection type: sigma_i / sigma_max of W_T - W_0 (log scale) for every
    layer (thin lines) of every checkpoint (one colour each), with the threshold marked.
    `results` maps a checkpoint name to `analysis.effective_rank.analyse`'s `MatrixResult`s."""
    plt = _pyplot()
    projs = list(dict.fromkeys(m.projection for mats in results.values() for m in mats))
    cols = min(4, len(projs))
    rows = math.ceil(len(projs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, proj in zip(axes.flat, projs):
        for c, (name, mats) in enumerate(results.items()):
            mine = [m for m in mats if m.projection == proj]
            for j, m in enumerate(mine):
                s = m.sigma
                if not s.numel() or float(s[0]) <= 0:
                    continue
                s = (s / s[0]).clamp_min(1e-12).numpy()
                ranks = statistics.fmean(x.effective_rank for x in mine)
                ax.semilogy(range(1, len(s) + 1), s, color=colours[c % len(colours)], lw=0.8, alpha=0.7,
                            label=f"{name} (mean {ranks:.0f})" if j == 0 else None)
        ax.axhline(threshold, color="k", ls="--", lw=0.7)
        ax.set_title(proj, fontsize=9)
        ax.set_ylim(1e-8, 2)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="lower left")
    for ax in list(axes.flat)[len(projs):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("sigma_i / sigma_max", fontsize=8)
    for ax in axes[-1, :]:
        ax.set_xlabel("index i", fontsize=8)
    fig.suptitle((title + "\n" if title else "") + f"spectra of W_T - W_0; dashed: threshold {threshold:g} "
                 "(effective rank = values above it)", fontsize=9)
    return save_figure(fig, path)


def read_log_json(path) -> dict:
    """The trainer's `--log-json` lines as {"train": [(iteration, loss)], "valid": [(iteration,
    held-out loss)], "tokens_per_s": [...]}; a later line for the same iteration wins (a resumed run
    appends to the same file)."""
    train, valid, tps = {}, {}, {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                it = int(rec["iteration"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{lineno}: not a --log-json line ({e})") from None
            if "loss" in rec:
                train[it] = float(rec["loss"])
            if "valid_loss" in rec:
                valid[it] = float(rec["valid_loss"])
            if "tokens_per_s" in rec:
                tps[it] = float(rec["tokens_per_s"])
    return {"train": sorted(train.items()), "valid": sorted(valid.items()), "tokens_per_s": sorted(tps.items())}


def plot_learning_curves(runs: dict[str, dict], path, title: str = "", smooth: int = 1) -> Path:
    """Two panels side by side: training loss vs iteration (optionally a trailing moving average
    over `smooth` iterations, raw values faint) and held-out loss vs iteration, one colour per run.
    `runs` maps a name to `read_log_json`'s dict."""
    plt = _pyplot()
    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(10, 3.6))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for c, (name, log) in enumerate(runs.items()):
        colour = colours[c % len(colours)]
        if log["train"]:
            its, losses = zip(*log["train"])
            if smooth > 1:
                ax_t.plot(its, losses, color=colour, lw=0.6, alpha=0.3)
                avg = [statistics.fmean(losses[max(0, i - smooth + 1):i + 1]) for i in range(len(losses))]
                ax_t.plot(its, avg, color=colour, lw=1.4, label=name)
            else:
                ax_t.plot(its, losses, color=colour, lw=1.2, label=name)
        if log["valid"]:
            its, losses = zip(*log["valid"])
            ax_v.plot(its, losses, color=colour, lw=1.2, marker="o", ms=3, label=name)
    ax_t.set_title("training loss" + (f" (moving average over {smooth})" if smooth > 1 else ""), fontsize=9)
    ax_v.set_title("held-out loss", fontsize=9)
    for ax in (ax_t, ax_v):
        ax.set_xlabel("iteration", fontsize=8)
        ax.set_ylabel("mean token loss", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)

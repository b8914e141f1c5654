"""The capacity study's plots: recall against steps, recall against K, recall vs forgetting."""
from __future__ import annotations

from pathlib import Path

from benchmarks.study_plots import pyplot, save_figure


def plot_all(a: dict, out: Path) -> None:
    plot_curves(a, Path(out) / "capacity_curves.png")
    plot_k(a, Path(out) / "capacity_k.png")
    plot_forgetting(a, Path(out) / "capacity_forgetting.png")


def _points(curve):
    pts = [(s, r) for s, r in curve if r is not None]
    return [s for s, _ in pts], [100 * r for _, r in pts]


def plot_curves(a: dict, path: Path) -> Path:
    """Recall of the reported facts against steps: one colour per method, seed 1 solid, seed 2 dashed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for c, (m, p) in enumerate(a["per_method"].items()):
        for run, style in zip(p["runs"], ("-", "--")):
            ax.plot(*_points(run["curve"]), style, marker="o", ms=3, color=colours[c % 10],
                    label=f"{m} (lr {p['lr']:g}, seed {run['seed']})")
    ax.set_xlabel("optimizer step", fontsize=8)
    ax.set_ylabel("exact recall of the reported facts (%)", fontsize=8)
    ax.set_title("facts memorised against steps, each method at its chosen LR", fontsize=9)
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    ax.tick_params(labelsize=7)
    return save_figure(fig, path)


def plot_k(a: dict, path: Path) -> Path:
    """HD-PiSSA's K sweep: recall against steps per K (left), final recall against K with its
    Wilson interval (right, log2 axis)."""
    plt = pyplot()
    fig, (ax_c, ax_k) = plt.subplots(1, 2, figsize=(9, 3.4))
    ks, rates, los, his = [], [], [], []
    for k, v in a["k_sweep"].items():
        ax_c.plot(*_points(v["curve"]), marker="o", ms=3, label=f"K={k}")
        if v["recall"]:
            ks.append(int(k))
            rates.append(100 * v["recall"]["rate"])
            los.append(max(0.0, rates[-1] - 100 * v["recall"]["ci95"][0]))  # rounding near 0 and 1
            his.append(max(0.0, 100 * v["recall"]["ci95"][1] - rates[-1]))
    if ks:
        ax_k.errorbar(ks, rates, yerr=[los, his], marker="o", capsize=3)
        ax_k.set_xscale("log", base=2)
        ax_k.set_xticks(ks, [str(k) for k in ks])
    ax_c.set_title("HD-PiSSA recall against steps, by K", fontsize=9)
    ax_k.set_title("final recall against K (95% Wilson)", fontsize=9)
    ax_c.set_xlabel("optimizer step", fontsize=8)
    ax_k.set_xlabel("K (virtual ranks; update rank <= 2Kr)", fontsize=8)
    for ax in (ax_c, ax_k):
        ax.set_ylabel("exact recall (%)", fontsize=8)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    ax_c.legend(fontsize=7)
    return save_figure(fig, path)


def plot_forgetting(a: dict, path: Path) -> Path:
    """Learning vs forgetting: x = final recall of the reported facts, y = Botchan loss (inverted:
    up = forgot less); one point per reported run, the base model a star."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for c, (m, p) in enumerate(a["per_method"].items()):
        pts = [(100 * r["recall"]["rate"], r["botchan"]) for r in p["runs"] if r["recall"] and r["botchan"] is not None]
        if pts:
            ax.scatter(*zip(*pts), color=colours[c % 10], label=m, zorder=3)
    ks = [(k, 100 * v["recall"]["rate"], v["botchan"]) for k, v in a["k_sweep"].items()
          if v["recall"] and v["botchan"] is not None]
    for k, x, y in ks:
        ax.scatter([x], [y], marker="x", color="grey", zorder=3)
        ax.annotate(f"K={k}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.scatter([100 * a["base"]["recall"]["rate"]], [a["base"]["botchan"]], marker="*", s=120, color="k",
               label="base", zorder=4)
    ax.invert_yaxis()
    ax.set_xlabel("exact recall of the reported facts (%; right = learnt more)", fontsize=8)
    ax.set_ylabel("Botchan loss (up = forgot less)", fontsize=8)
    ax.set_title("learning vs forgetting (x: HD-PiSSA's K sweep)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.tick_params(labelsize=7)
    return save_figure(fig, path)

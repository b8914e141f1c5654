"""The study's plots: learning curves, learning vs forgetting, and the learning-rate sweeps."""
from __future__ import annotations

from pathlib import Path


def plot_all(study: dict, out: Path) -> None:
    from megatron_hdpissa.analysis.plotting import plot_learning_curves

    a = study["analysis"]
    curves = {f"{m} (lr {a['per_method'][m]['best_lr']:g}, seed {study['args']['seeds'][1]})":
              {"train": study["seconds"][m]["train"], "valid": study["seconds"][m]["valid"]} for m in a["methods"]}
    plot_learning_curves(curves, Path(out) / "curves.png",
                         "GSM8K at each method's best LR: training loss (each batch unseen before its step) "
                         "and validation loss (trainer)")
    plot_forgetting(a, Path(out) / "forgetting.png")
    plot_sweep(a, Path(out) / "lr_sweep.png")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_forgetting(a: dict, path: Path) -> Path:
    """Learning vs forgetting in the style of Biderman et al. (2024): one point per GSM8K run
    (every LR of every method), x = GSM8K validation loss, y = Botchan loss; both axes inverted so
    up and right are better; the base model is the star."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for c, (m, p) in enumerate(a["per_method"].items()):
        pts = [(r["val"], r["botchan"], r["lr"], r["best"]) for r in p["sweep"] if r["val"] is not None]
        if not pts:
            continue
        xs, ys, lrs, best = zip(*pts)
        ax.plot(xs, ys, "-", color=colours[c % 10], lw=0.8, alpha=0.6)
        ax.scatter(xs, ys, color=colours[c % 10], s=[60 if b else 22 for b in best], label=m, zorder=3)
        for x, y, lr in zip(xs, ys, lrs):
            ax.annotate(f"{lr:g}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.scatter([a["base"]["val"]], [a["base"]["botchan"]], marker="*", s=120, color="k", label="base", zorder=4)
    ax.invert_xaxis()
    ax.invert_yaxis()
    ax.set_xlabel("GSM8K validation loss (learning; right = learnt more)", fontsize=8)
    ax.set_ylabel("Botchan loss (forgetting; up = forgot less)", fontsize=8)
    ax.set_title("learning vs forgetting, every learning rate (large: best)", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_sweep(a: dict, path: Path) -> Path:
    plt = pyplot()
    fig, (ax_v, ax_b) = plt.subplots(1, 2, figsize=(9, 3.4))
    for m, p in a["per_method"].items():
        rows = [r for r in p["sweep"] if r["val"] is not None]
        if rows:
            ax_v.semilogx([r["lr"] for r in rows], [r["val"] for r in rows], marker="o", ms=3, label=m)
            ax_b.semilogx([r["lr"] for r in rows], [r["botchan"] for r in rows], marker="o", ms=3, label=m)
    ax_v.axhline(a["base"]["val"], color="k", ls="--", lw=0.7, label="base")
    ax_b.axhline(a["base"]["botchan"], color="k", ls="--", lw=0.7, label="base")
    ax_v.set_title("GSM8K validation loss vs learning rate", fontsize=9)
    ax_b.set_title("Botchan loss vs learning rate", fontsize=9)
    for ax in (ax_v, ax_b):
        ax.set_xlabel("learning rate", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path

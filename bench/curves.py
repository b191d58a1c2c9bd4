"""One picture for the training benches: held-out perplexity against training tokens, per run."""

from __future__ import annotations

from pathlib import Path


def plot_curves(
    curves: dict[str, list[tuple[int, float]]], path: Path, title: str, dense: float | None = None
) -> str | None:
    """Write a log-scale ppl-vs-tokens plot of ``curves`` ({label: [(tokens, ppl), ...]}) to ``path``.

    Returns the file name (for a markdown link), or None when there is nothing to draw."""
    curves = {label: points for label, points in curves.items() if len(points) > 1}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for label, points in curves.items():
        tokens, ppl = zip(*points)
        ax.plot(tokens, ppl, marker="o", label=label)
    if dense is not None:
        ax.axhline(dense, color="black", lw=0.8, ls="--", label=f"dense ({dense:.4g})")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name

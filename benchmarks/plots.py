"""PNG plots of benchmark results (matplotlib, Agg backend: no display needed). Each function returns its path."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from tidar_jax.checkpoint import atomic


def _save(fig, path: str) -> str:
    try:
        return atomic.write_file(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"),
                                 binary=True)
    finally:
        plt.close(fig)


def latency_curve(rows: list[dict], recommendation: dict, path: str, stat: str = "p25") -> str:
    """Left: p25 latency vs query tokens per context (plain forward; TiDAR step points marked). Right: expected
    tokens/s vs block size per context, with the AR baseline as a dashed line."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    contexts = sorted({r["context"] for r in rows})
    for i, context in enumerate(contexts):
        color = f"C{i}"
        plain = sorted((r["query_tokens"], r[f"{stat}_ms"]) for r in rows
                       if r["kind"] == "plain" and r["context"] == context)
        ax.plot(*zip(*plain), "o-", color=color, label=f"L={context}")
        steps = sorted((r["query_tokens"], r[f"{stat}_ms"], r["block_size"]) for r in rows
                       if r["kind"] == "tidar_step" and r["context"] == context)
        if steps:
            ax.plot([s[0] for s in steps], [s[1] for s in steps], "x", color=color, markersize=9)
            for q, ms, b in steps:
                ax.annotate(f"B={b}", (q, ms), textcoords="offset points", xytext=(4, -10), fontsize=7, color=color)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("query tokens per forward (Q)")
    ax.set_ylabel(f"latency, {stat} (ms)")
    ax.set_title("forward latency, batch 1 (x = TiDAR step, Q=B(B+1))")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()

    for i, (context, info) in enumerate(recommendation["per_context"].items()):
        blocks = [r["block_size"] for r in info["blocks"]]
        ax2.plot(blocks, [r["expected_tokens_per_s"] for r in info["blocks"]], "o-", color=f"C{i}",
                 label=f"TiDAR L={context}")
        ax2.axhline(info["ar_tokens_per_s"], color=f"C{i}", linestyle="--", alpha=0.6)
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("draft block size B")
    ax2.set_ylabel("expected tokens/s (dashed: AR)")
    ax2.set_title(f"expected throughput; best B = {recommendation['best_block_size']}")
    ax2.grid(True, alpha=0.3)
    ax2.legend()
    return _save(fig, path)


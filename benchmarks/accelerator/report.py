"""The suite's markdown report and plots.
"""

from __future__ import annotations

import os

import numpy as np


# ------------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------------

def _f(x, fmt="{:.2f}"):
    return "-" if x is None else fmt.format(x)


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Accelerator evidence suite", "",
             f"Device: {m['device_count']} x {m['device_kind']} ({m['backend']}), jax {m['jax_version']}, "
             f"jaxlib {m['jaxlib_version']}; {'SMOKE (tiny shapes, numbers mean nothing)' if result['smoke'] else ''}",
             f"Command: `{result['command']}`; budget {result['budget_s']:.0f} s, "
             f"elapsed {result['elapsed_s']:.0f} s.", ""]
    for name, sec in result["sections"].items():
        lines += [f"## {name}: {sec['status']}" + (f" ({sec['reason']})" if sec["reason"] else ""), "",
                  f"Reproduce: `{sec['command']}`", ""]
        if sec["status"] != "ok":
            continue
        if name.startswith("cpu_"):
            lines += [f"Results: `{sec['result_file']}` (model: {sec['model']}; alone: `{sec['script_command']}`)", ""]
        elif name == "trained_speedup":
            t = sec["training"]
            lines += [f"Trained {t['num_params'] / 1e6:.1f}M params, S={t['seq_len']}, batch {t['batch']}, "
                      f"B={t['block_size']}, {t['steps']} steps in {t['wall_s']:.0f} s "
                      f"({t['epochs_over_train_split']:.2f} epochs). Held-out AR loss "
                      f"{t['heldout']['ar_loss']:.3f}, diffusion loss {_f(t['heldout'].get('diff_loss'), '{:.3f}')}; "
                      f"train-window AR loss {t['train_windows']['ar_loss']:.3f}; overfits: {t['overfits']}.", "",
                      "| decode | batch | tokens/s | T/NFE | speedup vs AR | identical to AR |",
                      "|---|---|---|---|---|---|"]
            for r in sec["decode"]["rows"]:
                label = "AR" if r["mode"] == "ar" else f"TiDAR B={r['block_size']}"
                lines.append(f"| {label} | {r['batch']} | {r['tokens_per_s']:.1f} | {r['tokens_per_nfe']:.2f} | "
                             f"{_f(r['speedup_vs_ar'])} | {_f(r['outputs_identical_to_ar'], '{}')} |")
            lines.append("")
        elif name == "free_slots":
            lines += ["| model | batch | context | AR step ms | TiDAR B=16 step ms | step cost | projected speedup "
                      "at paper T/NFE | paper |", "|---|---|---|---|---|---|---|---|"]
            for p in sec["projections"]:
                lines.append(f"| {p['model']} | {p['batch']} | {p['context']} | {p['ar_step_ms']:.3f} | "
                             f"{p['tidar_step_ms']:.3f} | {p['step_cost_ratio']:.2f}x | "
                             f"{p['projected_speedup']:.2f}x (T/NFE {p['paper_tokens_per_nfe']}) | "
                             f"{p['paper_speedup']}x |")
            lines.append("")
        elif name == "roofline":
            lines += [f"Copy bandwidth {sec['bandwidth']['copy_gb_s']:.1f} GB/s.", "",
                      "| model | context | MB/step | bound ms | AR step ms | tokens/s | of roofline |",
                      "|---|---|---|---|---|---|---|"]
            for r in sec["ar_step"]:
                lines.append(f"| {r['model']} | {r['context']} | {r['bytes_per_step'] / 1e6:.1f} | "
                             f"{r['bound_ms']:.3f} | {r['ar_step_ms']:.3f} | {r['tokens_per_s']:.1f} | "
                             f"{r['fraction_of_roofline']:.0%} |")
            for r in sec["ar_loop"]:
                lines.append(f"| {r['model']} AR loop | - | - | {r['bound_ms_per_token']:.3f} | "
                             f"{r['ms_per_token']:.3f} | {r['tokens_per_s']:.1f} | {r['fraction_of_roofline']:.0%} |")
            lines.append("")
        elif name == "train_throughput":
            lines += [f"{sec['model']} train step, S={sec['seq_len']}, global batch {sec['global_batch']}, "
                      f"{'remat' if sec['remat'] else 'no remat'}; "
                      f"peak {_f(sec['peak_flops_per_s'] and sec['peak_flops_per_s'] / 1e12, '{:.0f}')} TFLOP/s "
                      f"(datasheet), measured matmul {sec['measured_matmul']['flops_per_s'] / 1e12:.1f} TFLOP/s.", "",
                      "| kernel | objective | layers | step s | tokens/s | MFU | full-depth tokens/s (est.) | "
                      "full MFU | TiDAR/AR |", "|---|---|---|---|---|---|---|---|---|"]
            for k, e in sec["kernels"].items():
                if e["status"] != "ok":
                    lines.append(f"| {k} | skipped: {e['reason']} | | | | | | | |")
                    continue
                for obj, o in e["objectives"].items():
                    for r in o["by_depth"]:
                        lines.append(f"| {k} | {obj} | {r['layers']} | {r['step_s']:.4f} | {r['tokens_per_s']:.0f} | "
                                     f"{_f(r['mfu'], '{:.1%}')} | {_f(o['full_tokens_per_s'], '{:.0f}')} | "
                                     f"{_f(o['full_mfu'], '{:.1%}')} | "
                                     f"{_f(e['tidar_over_ar_step'][str(r['layers'])])} |")
            lines.append("")
        elif name == "attention_kernels":
            lines += ["| kernel | S | block | fwd ms | fwd estimate ms | fwd+bwd ms | fwd+bwd estimate ms |",
                      "|---|---|---|---|---|---|---|"]
            for r in sec["rows"]:
                if "fwd_s" not in r:
                    lines.append(f"| {r['kernel']} | {r['seq_len']} | | {r.get('error') or r.get('skipped')} | | | |")
                    continue
                lines.append(f"| {r['kernel']} | {r['seq_len']} | {r['block']} | {r['fwd_s'] * 1e3:.3f} | "
                             f"{_f(r['fwd_estimate_s'] and r['fwd_estimate_s'] * 1e3, '{:.3f}')} | "
                             f"{r['fwd_bwd_s'] * 1e3:.3f} | "
                             f"{_f(r['fwd_bwd_estimate_s'] and r['fwd_bwd_estimate_s'] * 1e3, '{:.3f}')} |")
            lines.append("")
        elif name == "decode_step":
            lines += ["| model | step | measured ms | estimate ms | measured/estimate | over AR step |",
                      "|---|---|---|---|---|---|"]
            for r in sec["cases"]:
                lines.append(f"| {r['preset']} | {r['name']} | {r['measured_s'] * 1e3:.3f} | "
                             f"{_f(r['estimate_s'] and r['estimate_s'] * 1e3, '{:.3f}')} | "
                             f"{_f(r['measured_over_estimate'])} | {r['over_ar_step']:.2f}x |")
            lines += [f"- skipped {s['preset']}: {s['reason']}" for s in sec["skipped"]] + [""]
    if result["plots"]:
        lines += ["## Plots", ""] + [f"- `{p['path']}`: {p['what']} (`{p['command']}`)" for p in result["plots"]]
    return "\n".join(lines) + "\n"


def make_plots(result: dict, out: str) -> list[dict]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = []

    def save(fig, name, what, section):
        from tidar_jax.checkpoint import atomic

        atomic.write_file(os.path.join(out, name),
                          lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"), binary=True)
        plt.close(fig)
        plots.append({"path": name, "what": what, "section": section,
                      "command": result["sections"][section]["command"]})

    s1 = result["sections"]["trained_speedup"]
    if s1["status"] == "ok":
        fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
        curve = s1["training"]["loss_curve"]
        a.plot([c[0] for c in curve], [c[1] for c in curve])
        if s1["training"]["heldout"].get("tidar_loss") is not None:
            a.axhline(s1["training"]["heldout"]["tidar_loss"], color="C1", ls="--", label="held-out TiDAR loss")
        a.set(xlabel="step", ylabel="TiDAR loss", title="training")
        a.legend()
        rows = s1["decode"]["rows"]
        labels = [("AR" if r["mode"] == "ar" else f"B={r['block_size']}") + f"\nN={r['batch']}" for r in rows]
        b.bar(range(len(rows)), [r["tokens_per_s"] for r in rows],
              color=["C0" if r["mode"] == "ar" else "C2" for r in rows])
        b.set_xticks(range(len(rows)), labels, fontsize=7)
        b.set(ylabel="tokens/s", title="decode (trained model)")
        save(fig, "trained_speedup.png", "training loss and decode tokens/s", "trained_speedup")
    s2 = result["sections"]["free_slots"]
    if s2["status"] == "ok":
        names = [n for n, m in s2["models"].items() if m["latency"]]
        fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
        for ax, name in zip(axes[0], names):
            lat = s2["models"][name]["latency"]
            for i, (batch, ctxlen) in enumerate(sorted({(r["batch"], r["context"]) for r in lat})):
                pts = sorted((r["query_tokens"], r["min_ms"]) for r in lat if r["kind"] == "plain"
                             and r["batch"] == batch and r["context"] == ctxlen)
                ax.plot(*zip(*pts), "o-", color=f"C{i}", label=f"N={batch} L={ctxlen}")
                st = [(r["query_tokens"], r["min_ms"]) for r in lat if r["kind"] == "tidar_step"
                      and r["batch"] == batch and r["context"] == ctxlen]
                if st:
                    ax.plot(*zip(*st), "x", color=f"C{i}", ms=10)
            ax.set(xscale="log", yscale="log", xlabel="query tokens q (x: TiDAR step)", ylabel="ms", title=name)
            ax.legend(fontsize=7)
        save(fig, "free_slots.png", "forward latency vs query tokens", "free_slots")
    s3 = result["sections"]["roofline"]
    if s3["status"] == "ok" and s3["ar_step"]:
        fig, ax = plt.subplots(figsize=(7, 4))
        rows = s3["ar_step"]
        x = np.arange(len(rows))
        ax.bar(x - 0.2, [r["bound_ms"] for r in rows], 0.4, label="bandwidth bound")
        ax.bar(x + 0.2, [r["ar_step_ms"] for r in rows], 0.4, label="measured AR step")
        ax.set_xticks(x, [f"{r['model']}\nL={r['context']}" for r in rows], fontsize=7)
        ax.set(ylabel="ms per token (batch 1)")
        ax.legend()
        save(fig, "roofline.png", "AR step vs memory roofline", "roofline")
    s4 = result["sections"]["train_throughput"]
    if s4["status"] == "ok":
        fig, ax = plt.subplots(figsize=(7, 4))
        labels, values = [], []
        for k, e in s4["kernels"].items():
            if e["status"] == "ok":
                for obj, o in e["objectives"].items():
                    labels.append(f"{k}\n{obj}")
                    values.append(o["full_tokens_per_s"] or 0.0)
        ax.bar(range(len(values)), values)
        ax.set_xticks(range(len(values)), labels, fontsize=7)
        ax.set(ylabel="train tokens/s (full depth, est.)", title=f"{s4['model']} S={s4['seq_len']}")
        save(fig, "train_throughput.png", "train tokens/s per attention kernel", "train_throughput")
    return plots

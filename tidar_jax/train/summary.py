"""The end-of-run summary printed by train.py."""

from __future__ import annotations

import os


def format_summary(result, cfg) -> str:
    ran = result.final_step - result.start_step
    lines = ["", "=" * 72,
             f"run finished: step {result.final_step}/{cfg.train.steps}"
             + (f" (resumed at {result.start_step}, {ran} steps this call)" if result.resumed else f" ({ran} steps)")
             + f" in {result.wall_s:.1f} s"]
    tm = result.train_metrics
    if tm:
        parts = [f"loss {tm['loss']:.4f}"] + [f"{k} {tm[k]:.4f}" for k in ("ar_loss", "diff_loss") if k in tm]
        lines.append("train (last logging window): " + ", ".join(parts))
    em = result.eval_metrics
    if em:
        parts = [f"{k} {v:.4f}" for k, v in em.items()]
        lines.append("held-out: " + ", ".join(parts))
    if result.unigram_entropy is not None:
        line = f"held-out unigram entropy (train-split unigram frequencies): {result.unigram_entropy:.4f} nats/token"
        if em.get("ar_loss") is not None:
            line += f"; AR loss is {result.unigram_entropy - em['ar_loss']:.3f} nats below it"
        lines.append(line)
    if result.decode_probe:
        p = result.decode_probe
        lines.append(f"decode probe: lossless TiDAR (output == AR) at B={p.get('block_size', '?')}: "
                     f"{p['tokens_per_nfe']:.2f} tokens per forward (T/NFE) on {p['prompts']} held-out prompts, "
                     f"{p['new_tokens'] // max(p['prompts'], 1)} new tokens each")
    run = result.run_dir
    lines += [f"run dir:      {run}",
              f"checkpoints:  {os.path.join(run, 'checkpoints')}",
              f"tensorboard:  tensorboard --logdir {os.path.join(run, 'tb')}",
              f"config:       {os.path.join(run, 'config.yaml')}",
              "=" * 72]
    return "\n".join(lines)

"""Accelerator evidence suite: one command that measures TiDAR where the paper measures it (one GPU or TPU).

    python -m benchmarks.accelerator --out DIR [--budget-s 440] [--data DIR] [--prompt-file FILE]
    python -m benchmarks.accelerator --smoke --out DIR            # tiny shapes, CPU, < 1 minute (the test)

Sections, run in this order; each gets a share of what is left of ``--budget-s`` and is recorded as skipped (with
the reason) when that share is too small; long loops check the section's deadline and record what they left out:
  1. trained_speedup: train a TiDAR model (78M params, bf16 compute, S=1024, batch 8 on an accelerator) on the
     prepared stdlib corpus for a fixed wall budget; held-out and train AR/diffusion losses; then greedy lossless
     TiDAR (B = 4, 8 and the trained B) and our own AR decode of held-out prompts at batch 1, 4, 16: tokens/s,
     T/NFE, speedup, outputs identical to AR.
  2. free_slots: random bf16 models with the real shapes of Qwen2.5-0.5B, Qwen2.5-1.5B and Qwen3-8B: forward
     latency for q = 1..512 query tokens over a KV cache of 1024 and 4096, batch 1 and 8; the exact TiDAR step at
     B = 4, 8, 16; the speedup projected at the paper's T/NFE from the measured step cost, beside the paper's.
  3. roofline: batch-1 AR step and AR decode loop of those shapes against (weight + KV bytes) / measured copy
     bandwidth.
  4. train_throughput: the Qwen2.5-1.5B train step at S=4096, global batch 16 on one device for every attention
     kernel the installed code and the backend support: tokens/s, MFU, compiled and peak memory, TiDAR/AR step.

Writes ``accelerator.json`` (schema: docs/benchmarks.md), ``accelerator.md`` and PNG plots into ``--out``,
rewriting the JSON and markdown after every section (a run cut short keeps what it measured). Never imports grain.

One module per section (``trained_speedup``, ``free_slots``, ``roofline``, ``train_throughput``), the shared pieces
in ``common`` and the report in ``report``; this package is the driver. A new section is a new module with a
``section_<name>(ctx, deadline) -> dict`` function, registered in ``SECTIONS``/``SHARES`` and ``SECTION_FNS``.
"""

# The package imports nothing heavy: ``options`` (the command line) must be importable without jax, so that bad
# input exits with one line before jax and its plugins start logging. The suite's names resolve from ``driver``.


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module("benchmarks.accelerator.driver"), name)

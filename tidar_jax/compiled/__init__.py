"""What a compiled program is: its kernels, loops and transfers, read from the optimized HLO XLA built for a target
(``hlo``), and what it would cost on that target (``cost_model``, estimates with their assumptions)."""

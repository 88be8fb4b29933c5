"""The analysis floor: what a compiled program is and what it would cost, read from the runtime, never read by it.

``hlo`` and ``thunks`` read the optimized program XLA built for a target (kernels, loops, transfers); ``chips``
holds each chip's cost figures and ``kernel_costs`` the work of the custom kernels; ``cost_model`` estimates a
program's time from them (estimates with their assumptions); ``train_plan``, ``decode_plan`` and ``recommend``
compile the train step and the decode programs for a target and report them.
"""

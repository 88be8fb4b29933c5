"""The analysis floor: what a compiled program is and what it would cost, read from the runtime, never read by it.

``hlo`` and ``thunks`` read the optimized program XLA built for a target (kernels, loops, transfers); ``chips``
holds each chip's cost figures and ``kernel_costs`` the work of the custom kernels; ``cost_model`` estimates a
program's time from them (estimates with their assumptions); ``train_plan``, ``decode_plan`` and ``recommend``
compile the train step and the decode programs for a target and report them.
``efficiency`` turns a ceiling estimate (datasheet peaks) into the expected one, per chip and kernel class, each
efficiency with its public source.
``calibrate`` fits that efficiency table from a measured profile and writes it where ``efficiency`` reads it.
``xla_cost`` reads XLA:GPU's own per-fusion cost model from a deviceless compile, beside ours.
``tpu_time`` estimates a TPU program's time, taking its loops' trip counts from the unoptimised HLO.
"""

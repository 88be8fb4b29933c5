"""Read XLA:GPU's thunk sequence of a compiled program: which kernels run inside command buffers (CUDA graphs).

XLA:GPU turns the scheduled HLO into a sequence of thunks (one per kernel, copy, GEMM, loop) and then, in a
thunk pass at compile time, wraps runs of capturable thunks into ``kCommandBuffer`` thunks that execute as one
CUDA graph (``--xla_gpu_enable_command_buffer`` says which kinds: FUSION, CUBLAS, CUBLASLT, CUSTOM_CALL, CUDNN
and DYNAMIC_SLICE_FUSION by default; WHILE and CONDITIONAL opt in). None of this is in the optimized HLO text
(``compiled.as_text()``); it is in the compile's dump, ``<module>.thunk_sequence_after_thunk_passes.txt``, which a
deviceless compile writes too when asked (``compiler_options={"xla_dump_to": dir}``). The dump's format is XLA's
debug text (one thunk per line, ``NNN: kKind [...] name``, nested thunks indented four spaces): stable across jax
0.10/0.11 as far as used here, but not an API, hence a reader that fails loudly when the file is missing.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re

_THUNK = re.compile(r"^(\s*)\d+: (k\w+)")


@dataclasses.dataclass(frozen=True)
class ThunkSequence:
    """Top-level thunks of one program and, for each command buffer, how many thunks it holds."""

    top_level: tuple[str, ...]  # thunk kinds in order (kCommandBuffer, kCustomKernel, kWhile, kCopy, ...)
    command_buffer_sizes: tuple[int, ...]

    @property
    def command_buffers(self) -> int:
        return len(self.command_buffer_sizes)

    @property
    def in_command_buffers(self) -> int:
        return sum(self.command_buffer_sizes)

    @property
    def outside_command_buffers(self) -> int:
        """Top-level thunks that are not command buffers: each one launches on its own (a ``kWhile`` runs its
        body's thunks eagerly too)."""
        return sum(1 for k in self.top_level if k != "kCommandBuffer")

    def summary(self) -> dict:
        return {"command_buffers": self.command_buffers, "thunks_in_command_buffers": self.in_command_buffers,
                "top_level_thunks_outside": self.outside_command_buffers,
                "top_level_kinds_outside": sorted({k for k in self.top_level if k != "kCommandBuffer"})}


def parse_thunk_sequence(text: str) -> ThunkSequence:
    top: list[str] = []
    sizes: list[int] = []
    in_buffer = False
    for line in text.splitlines():
        m = _THUNK.match(line)
        if not m:
            continue
        depth = len(m.group(1)) // 4
        if depth == 0:
            top.append(m.group(2))
            in_buffer = m.group(2) == "kCommandBuffer"
            if in_buffer:
                sizes.append(0)
        elif depth == 1 and in_buffer:
            sizes[-1] += 1
    return ThunkSequence(tuple(top), tuple(sizes))


def read_dump(dump_dir: str, module: str) -> ThunkSequence:
    """The thunk sequence (after XLA's thunk passes) of the module whose name contains ``module`` in ``dump_dir``
    (a compile with ``xla_dump_to=dump_dir``)."""
    paths = sorted(glob.glob(os.path.join(dump_dir, f"*{module}*thunk_sequence_after_thunk_passes.txt")))
    if not paths:
        raise FileNotFoundError(f"no thunk sequence of a module named *{module}* in {dump_dir} (was the program "
                                f"compiled for a GPU with xla_dump_to={dump_dir!r}?)")
    with open(paths[-1]) as f:
        return parse_thunk_sequence(f.read())

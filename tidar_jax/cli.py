"""What every command line shares: argument errors as one ``error: ...`` line and a non-zero exit.

argparse's own ``error`` prints the whole usage block before the message; a bad value (``--for vllm``, ``--dtype
fp8``, ``--max-new-tokens x``) should read like every other bad input of this project: one line naming the value
and what is allowed (argparse's message does both), nothing else. ``--help`` is unchanged.
"""

from __future__ import annotations

import argparse


class OneLineArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors exit with one line; subparsers inherit it. Parsing is where every
    command starts, before it imports jax: on a host without an accelerator the command then runs on jax's CPU
    backend alone, so no compiler plugin prints its start-up errors (``targets.cpu_only_when_no_accelerator``)."""

    def parse_known_args(self, args=None, namespace=None):
        from tidar_jax.targets import cpu_only_when_no_accelerator

        cpu_only_when_no_accelerator()
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        raise SystemExit(f"error: {message}")

"""What every command line shares: argument errors as one ``error: ...`` line and a non-zero exit.

argparse's own ``error`` prints the whole usage block before the message; a bad value (``--for vllm``, ``--dtype
fp8``, ``--max-new-tokens x``) should read like every other bad input of this project: one line naming the value
and what is allowed (argparse's message does both), nothing else. ``--help`` is unchanged.
"""

from __future__ import annotations

import argparse


class OneLineArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors exit with one line; subparsers inherit it."""

    def error(self, message: str):
        raise SystemExit(f"error: {message}")

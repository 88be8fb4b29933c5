"""What a user reads on stderr from one of our commands, without the log lines jax's optional GPU compiler plugin
prints at every jax start on a machine without a GPU.

requirements-dev.txt installs jax-cuda12-plugin (for the deviceless GPU-compile tests). jax imports every
installed plugin when it starts, whatever JAX_PLATFORMS says, and the plugin's CUDA stub logs through absl before
absl is initialised, so no environment variable silences it. Those lines are the plugin's, not ours; the tests
that hold a command to "one line" check the rest.
"""

import re

_PLUGIN_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IW]\d{4} [\d:.]+\s+\d+ cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine.*)$")


def user_lines(stderr: str) -> list[str]:
    """Non-empty stderr lines, minus the GPU compiler plugin's startup log lines."""
    return [ln for ln in stderr.strip().splitlines() if ln.strip() and not _PLUGIN_NOISE.match(ln.strip())]

"""Multi-host setup: one wrapper around ``jax.distributed.initialize`` and the mesh shape resolution.

TPU pods and SLURM/GPU clusters are detected by jax itself (``enabled: auto`` initialises when one of their
environments is present); explicit ``coordinator_address/num_processes/process_id`` (config or the
``TIDAR_COORDINATOR/TIDAR_NUM_PROCESSES/TIDAR_PROCESS_ID`` env vars) override detection, e.g. for plain GPU hosts
or two CPU processes on localhost.
"""

from __future__ import annotations

import math
import os

import jax

from tidar_jax.config import ConfigError

_CLUSTER_ENV = ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "OMPI_COMM_WORLD_SIZE")
_ENV_OVERRIDES = {"coordinator_address": "TIDAR_COORDINATOR", "num_processes": "TIDAR_NUM_PROCESSES",
                  "process_id": "TIDAR_PROCESS_ID"}


def distributed_options(section) -> dict:
    """Explicit ``jax.distributed.initialize`` kwargs from the config section, then env overrides."""
    opts = {k: getattr(section, k) for k in ("coordinator_address", "num_processes", "process_id")}
    for key, env in _ENV_OVERRIDES.items():
        if os.environ.get(env):
            value = os.environ[env]
            opts[key] = value if key == "coordinator_address" else int(value)
    if section.local_device_ids is not None:
        opts["local_device_ids"] = list(section.local_device_ids)
    return {k: v for k, v in opts.items() if v is not None}


def initialize(section) -> bool:
    """Initialise ``jax.distributed`` when asked (``true``), or when ``auto`` and a cluster/explicit setup is seen.

    Returns whether it initialised. Must run before anything touches the devices.
    """
    opts = distributed_options(section)
    explicit = "coordinator_address" in opts
    if section.enabled == "false":
        return False
    if section.enabled == "auto" and not explicit and not any(k in os.environ for k in _CLUSTER_ENV):
        return False
    if explicit and ("num_processes" not in opts or "process_id" not in opts):
        raise ConfigError(f"distributed.coordinator_address={opts['coordinator_address']!r} needs num_processes and "
                          "process_id too (config keys or TIDAR_NUM_PROCESSES / TIDAR_PROCESS_ID)")
    if jax.config.jax_platforms in (None, "", "cpu") and explicit:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(initialization_timeout=section.initialization_timeout, **opts)
    return True


def resolve_mesh_shape(section, num_devices: int) -> tuple[int, int, int]:
    """``(data, fsdp, tensor)`` with a ``-1`` axis filled so that the product is ``num_devices``."""
    shape = [section.data, section.fsdp, section.tensor]
    fixed = math.prod(a for a in shape if a != -1)
    if -1 in shape:
        if num_devices % fixed:
            raise ConfigError(f"mesh {dict(zip(('data', 'fsdp', 'tensor'), shape))}: the fixed axes ({fixed}) must "
                              f"divide the device count {num_devices}")
        shape[shape.index(-1)] = num_devices // fixed
    if math.prod(shape) != num_devices:
        raise ConfigError(f"mesh data*fsdp*tensor = {math.prod(shape)} but there are {num_devices} devices; "
                          "make the product equal the device count (or set one axis to -1)")
    return tuple(shape)

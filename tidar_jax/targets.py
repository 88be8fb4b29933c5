"""Compile targets: the accelerators users train and decode on, described so that XLA compiles for them here.

XLA builds a GPU or TPU program on a machine that has neither ("deviceless" ahead-of-time compilation): a
topology description stands in for the chips, ``jit(...).lower(...).compile()`` runs XLA:GPU's or XLA:TPU's real
pipeline, and ``memory_analysis()`` / ``as_text()`` show the program the hardware would run. This module owns:

* what each chip is (``CHIPS``): the compiler's device description (its cost data is
  ``tidar_jax.analysis.chips``'s);
* the ``--target NAME[xN]`` syntax (``h100x8``, ``h200``, ``v5p-8``) and its one-line errors;
* the environment switches a deviceless compile needs, set by code (``prepare_environment``), and the optional
  installs it needs, checked with a one-line error naming the requirements file;
* which platform a program is being built for (``compiling_for``), because ``jax.default_backend()`` says "cpu"
  while compiling for a GPU this way: kernel choices (``tidar_jax.attention.resolve``) read ``build_platform()``.

It imports nothing from jax at module level, so ``train.py`` / ``decode.py`` can parse ``--target`` and set the
environment before jax initialises its backends.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib.util
import os
import re

from tidar_jax.config import ConfigError


class TargetError(ConfigError):
    """A ``--target`` that cannot be built here (unknown name, unusable chip count, missing compiler plugin)."""


GPU_COMPILE_REQUIREMENTS = "requirements-gpu-compile.txt"
TPU_COMPILE_REQUIREMENTS = "requirements-tpu-compile.txt"


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator as the compiler sees it: its platform, the ``device_kind`` it reports, and what XLA's
    deviceless topology needs to schedule and tile for it. What a program would cost on it (peak rates, launch
    costs) is the analysis layer's (``tidar_jax.analysis.chips``)."""

    name: str
    platform: str  # "gpu" | "tpu"
    description: str  # the device_kind the compiled program reports
    hbm_bytes_per_s: float  # datasheet HBM bandwidth (XLA's GpuTargetConfig reads it)
    hbm_bytes: float
    # GPU only: what XLA's GpuTargetConfig needs to schedule and tile for this chip
    sm_count: int = 0
    compute_capability: tuple[int, int] = (0, 0)
    l2_bytes: int = 0
    clock_ghz: float = 0.0
    shared_memory_per_sm: int = 0
    shared_memory_per_block_optin: int = 0
    fpus_per_sm: int = 0
    # TPU only: chips per topology name (Cloud TPU slice names count TensorCores for v5p, chips for v5e/v6e)
    tpu_family: str = ""
    tpu_topologies: tuple[tuple[int, str], ...] = ()


_HOPPER = dict(sm_count=132, compute_capability=(9, 0), l2_bytes=50 * 2 ** 20, clock_ghz=1.98,
               shared_memory_per_sm=233472, shared_memory_per_block_optin=232448, fpus_per_sm=128)
CHIPS: dict[str, Chip] = {
    "h100": Chip("h100", "gpu", "NVIDIA H100 80GB HBM3", 3.35e12, 80e9, **_HOPPER),
    "h200": Chip("h200", "gpu", "NVIDIA H200 141GB HBM3e", 4.8e12, 141e9, **_HOPPER),
    "a100": Chip("a100", "gpu", "NVIDIA A100-SXM4-80GB", 2.039e12, 80e9,
                 sm_count=108, compute_capability=(8, 0), l2_bytes=40 * 2 ** 20, clock_ghz=1.41,
                 shared_memory_per_sm=167936, shared_memory_per_block_optin=166912, fpus_per_sm=64),
    "b200": Chip("b200", "gpu", "NVIDIA B200", 8.0e12, 180e9,
                 sm_count=148, compute_capability=(10, 0), l2_bytes=126 * 2 ** 20, clock_ghz=1.965,
                 shared_memory_per_sm=233472, shared_memory_per_block_optin=232448, fpus_per_sm=128),
    "v5e": Chip("v5e", "tpu", "TPU v5 lite", 819e9, 16e9, tpu_family="v5e",
                tpu_topologies=((4, "v5e:2x2"), (8, "v5e:2x4"), (16, "v5e:4x4"))),
    "v5p": Chip("v5p", "tpu", "TPU v5", 2.765e12, 95e9, tpu_family="v5p",
                tpu_topologies=((4, "v5p:2x2x1"), (8, "v5p:2x2x2"), (16, "v5p:2x2x4"))),
    "v6e": Chip("v6e", "tpu", "TPU v6 lite", 1.64e12, 32e9, tpu_family="v6e",
                tpu_topologies=((4, "v6e:2x2"), (8, "v6e:2x4"), (16, "v6e:4x4"))),
}

# Cloud TPU slice names: v5p-N counts TensorCores (2 per chip); v5e-N and v6e-N count chips.
_TPU_CORES_PER_CHIP = {"v5e": 1, "v5p": 2, "v6e": 1}
GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64)


@dataclasses.dataclass(frozen=True)
class Target:
    chip: Chip
    count: int  # chips
    name: str  # as the user wrote it, normalised

    @property
    def platform(self) -> str:
        return self.chip.platform


def _allowed() -> str:
    gpus = ", ".join(f"{n}[xN]" for n, c in CHIPS.items() if c.platform == "gpu")
    tpus = ", ".join(f"{c.tpu_family}-{k * _TPU_CORES_PER_CHIP[c.tpu_family]}" for c in CHIPS.values()
                     if c.platform == "tpu" for k, _ in c.tpu_topologies)
    return f"GPUs {gpus} with N in {', '.join(map(str, GPU_COUNTS))}; TPU slices {tpus}"


def parse_target(text: str) -> Target:
    """``h100x8`` / ``h200`` / ``v5p-8`` -> Target; anything else raises one ``TargetError`` line."""
    raw = text
    text = (text or "").strip().lower()
    m = re.fullmatch(r"([a-z]\d+)(?:x(\d+))?", text)
    if m and m.group(1) in CHIPS and CHIPS[m.group(1)].platform == "gpu":
        count = int(m.group(2) or 1)
        if count not in GPU_COUNTS:
            raise TargetError(f"--target {raw!r}: {count} GPUs cannot form a mesh here; allowed counts: "
                              f"{', '.join(map(str, GPU_COUNTS))} (1-8 per host, then whole 8-GPU hosts)")
        return Target(CHIPS[m.group(1)], count, f"{m.group(1)}x{count}")
    m = re.fullmatch(r"(v\d+[a-z])-(\d+)", text)
    if m and m.group(1) in CHIPS:
        chip = CHIPS[m.group(1)]
        cores = int(m.group(2))
        chips = cores // _TPU_CORES_PER_CHIP[chip.tpu_family]
        counts = dict(chip.tpu_topologies)
        if cores % _TPU_CORES_PER_CHIP[chip.tpu_family] or chips not in counts:
            sizes = ", ".join(f"{chip.tpu_family}-{k * _TPU_CORES_PER_CHIP[chip.tpu_family]}" for k in counts)
            raise TargetError(f"--target {raw!r}: no deviceless {chip.tpu_family} topology of that size; allowed: "
                              f"{sizes} (a single chip is refused by libtpu's deviceless mode)")
        return Target(chip, chips, text)
    raise TargetError(f"--target {raw!r}: unknown target; allowed: {_allowed()}")


def gpu_target_config(chip: Chip) -> str:
    """XLA's ``GpuTargetConfig`` in protobuf text form, from the chip's description (public datasheet figures;
    the field set is the one jax 0.10's XLA reads)."""
    major, minor = chip.compute_capability
    return (
        "gpu_device_info {\n"
        "  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152\n"
        f"  shared_memory_per_core: {chip.shared_memory_per_sm} threads_per_core_limit: 2048\n"
        f"  core_count: {chip.sm_count} fpus_per_core: {chip.fpus_per_sm}\n"
        "  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535\n"
        f"  memory_bandwidth: {int(chip.hbm_bytes_per_s)} l2_cache_size: {chip.l2_bytes}\n"
        f"  clock_rate_ghz: {chip.clock_ghz} device_memory_size: {int(chip.hbm_bytes)}\n"
        f"  shared_memory_per_block_optin: {chip.shared_memory_per_block_optin}\n"
        f"  cuda_compute_capability {{ major: {major} minor: {minor} }}\n"
        "  registers_per_core_limit: 65536 registers_per_block_limit: 65536\n"
        "}\n"
        'platform_name: "CUDA"\n'
        "dnn_version_info { major: 9 minor: 8 }\n"
        "runtime_version { major: 12 minor: 8 }\n"
        f'device_description_str: "{chip.description}"\n'
    )


# The compile-only plugins (requirements-{gpu,tpu}-compile.txt) live in a folder of their own, off sys.path, so
# that jax does not load them at every import (on a host without an accelerator they print a CUDA traceback and
# libtpu's errors); a process compiling for a target puts them on sys.path (README: the test install).
COMPILE_PLUGINS = os.environ.get("TIDAR_COMPILE_PLUGINS") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".compile-plugins")


def use_compile_plugins() -> bool:
    """Put the compile-only plugins on sys.path (best before jax is imported); False when none are installed."""
    import sys

    if not os.path.isdir(COMPILE_PLUGINS):
        return False
    if COMPILE_PLUGINS not in sys.path:
        sys.path.insert(0, COMPILE_PLUGINS)
    return True


def prepare_environment(target: Target) -> None:
    """Environment switches for a deviceless compile; call before jax initialises its backends. The computation
    itself stays on CPU (``JAX_PLATFORMS=cpu``): only the topology's devices are the target's."""
    use_compile_plugins()
    os.environ["JAX_PLATFORMS"] = "cpu"
    if target.platform == "gpu":
        os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"  # the plugin's cuInit check fails without a GPU
        os.environ["CUDA_VISIBLE_DEVICES"] = "-1"
    else:
        os.environ["TPU_SKIP_MDS_QUERY"] = "1"  # no GCE metadata server to ask for the slice
        # libtpu locks /tmp/libtpu_lockfile for the one process that may drive the chips; a deviceless compile
        # drives none, so concurrent compiles (parallel tests, several plans) must not wait on each other
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    import sys

    if "jax" in sys.modules:  # imported already (tests, notebooks): its config read JAX_PLATFORMS at import
        sys.modules["jax"].config.update("jax_platforms", "cpu")


# Device nodes of an accelerator jax could use: NVIDIA, AMD (ROCm), TPU (v4/v5p: accel; v5e/v6e: vfio).
_ACCELERATOR_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/accel0", "/dev/vfio/0")


def cpu_only_when_no_accelerator() -> None:
    """On a host without any accelerator device node, make jax use its CPU backend alone (``JAX_PLATFORMS=cpu``)
    unless the user chose platforms. Why: where the GPU/TPU compiler plugins are on sys.path (a compile for a
    target, or installed into site-packages), jax would otherwise ask each to start a backend, which on such a host
    prints a CUDA traceback and libtpu's error lines before any output of ours. Call before jax initialises its
    backends."""
    if "JAX_PLATFORMS" in os.environ or any(os.path.exists(node) for node in _ACCELERATOR_NODES):
        return
    os.environ["JAX_PLATFORMS"] = "cpu"


def missing_install(target: Target) -> str | None:
    """Why ``target`` cannot be compiled for here (a one-line install hint), or None."""
    use_compile_plugins()
    if target.platform == "gpu":
        need = [m for m in ("jax_plugins.xla_cuda12", "nvidia.cuda_nvcc") if _find(m) is None]
        if need:
            return (f"--target {target.name}: the CUDA compiler plugin is not installed (missing "
                    f"{', '.join(need)}); run: {_install_command(GPU_COMPILE_REQUIREMENTS)}")
    elif _find("libtpu") is None:
        return f"--target {target.name}: libtpu is not installed; run: {_install_command(TPU_COMPILE_REQUIREMENTS)}"
    return None


def _install_command(requirements: str) -> str:
    shown = os.path.relpath(COMPILE_PLUGINS)
    return f"pip install --no-deps --target {COMPILE_PLUGINS if shown.startswith('..') else shown} -r {requirements}"


def _find(module: str):
    try:
        return importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None


@functools.lru_cache(maxsize=None)
def _topology_devices(chip_name: str, count: int) -> tuple:
    from jax.experimental import topologies

    chip = CHIPS[chip_name]
    if chip.platform == "gpu":
        hosts, per_host = (1, count) if count <= 8 else (count // 8, 8)
        topo = topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config(chip),
                                            topology=f"{hosts}x1x{per_host}")
    else:
        topo = topologies.get_topology_desc(topology_name=dict(chip.tpu_topologies)[count], platform="tpu")
    return tuple(topo.devices)


def target_devices(target: Target | str) -> list:
    """The target's devices for a ``Mesh``: compile on them, never run. Raises ``TargetError`` (one line) when
    the optional compiler install is missing or the topology cannot be built."""
    target = parse_target(target) if isinstance(target, str) else target
    reason = missing_install(target)
    if reason:
        raise TargetError(reason)
    prepare_environment(target)
    try:
        return list(_topology_devices(target.chip.name, target.count))
    except Exception as e:  # the plugin's own message is many lines; keep the first
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TargetError(f"--target {target.name}: the deviceless topology could not be built: {first}") from None


_BUILD_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("tidar_build_platform", default=None)
_BUILD_CHIP: contextvars.ContextVar[str | None] = contextvars.ContextVar("tidar_build_chip", default=None)


@contextlib.contextmanager
def compiling_for(platform: str | Target | None):
    """Kernel choices made inside this block are for ``platform`` ("gpu", "tpu", "cpu" or a Target, which also
    names the chip: ``build_chip``), whatever ``jax.default_backend()`` says. Wrap the lowering of a program for a
    deviceless target in it."""
    value = platform.platform if isinstance(platform, Target) else platform
    token = _BUILD_PLATFORM.set(value)
    chip_token = _BUILD_CHIP.set(platform.chip.name if isinstance(platform, Target) else None)
    try:
        yield
    finally:
        _BUILD_CHIP.reset(chip_token)
        _BUILD_PLATFORM.reset(token)


def chip_of_device_kind(kind: str) -> str | None:
    """The ``CHIPS`` name of a jax ``device_kind`` (e.g. "NVIDIA H100 80GB HBM3" -> "h100"), or None."""
    kind = kind.lower()
    exact = next((c.name for c in CHIPS.values() if c.description.lower() == kind), None)
    return exact or next((c.name for c in CHIPS.values() if c.platform == "gpu" and c.name in kind), None)


def build_chip() -> str | None:
    """The ``CHIPS`` name of the chip the program being traced is built for: ``compiling_for``'s target's, else
    the local device's when it is on the build platform; None when unknown (CPU, an unlisted chip, a
    platform-only ``compiling_for`` on another platform)."""
    chip = _BUILD_CHIP.get()
    if chip is not None:
        return chip
    import jax

    device = jax.devices()[0]
    if platform_of_devices([device]) != build_platform():
        return None
    return chip_of_device_kind(device.device_kind)


def platform_kind(platform: str) -> str:
    """"gpu" for any GPU platform name jax uses ("gpu", "cuda", "rocm"); other names ("tpu", "cpu") as they are."""
    return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


def build_platform() -> str:
    """The platform kind (``platform_kind``) the program being traced is built for: ``compiling_for``'s, else jax's
    default backend's."""
    value = _BUILD_PLATFORM.get()
    if value is not None:
        return platform_kind(value)
    import jax

    return platform_kind(jax.default_backend())


def platform_of_devices(devices) -> str:
    """"gpu" / "tpu" / "cpu" for a list of (possibly deviceless) devices."""
    return platform_kind(devices[0].platform if devices else "cpu")


__all__ = ["CHIPS", "Chip", "Target", "TargetError", "build_chip", "build_platform", "chip_of_device_kind",
           "compiling_for", "cpu_only_when_no_accelerator", "gpu_target_config", "missing_install", "parse_target",
           "platform_kind", "platform_of_devices", "prepare_environment", "target_devices"]

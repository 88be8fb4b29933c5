"""Test setup: 8 fake CPU devices, configured before jax initialises."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tidar_jax import targets  # noqa: E402 (jax-free)

targets.use_compile_plugins()  # the GPU/TPU compile tests need them; jax reads the CUDA plugin at import

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def train_corpus(tmp_path_factory) -> str:
    """A small prepared corpus (30 stdlib files, a 384-token vocabulary), made once per session for the training
    tests."""
    from tidar_jax.data import prepare_corpus

    path = tmp_path_factory.getbasetemp() / "train_corpus"
    prepare_corpus(path, max_files=30, vocab_size=384)
    return str(path)


def _target_devices_or_skip(name: str):
    reason = targets.missing_install(targets.parse_target(name))
    if reason:
        pytest.skip(reason)
    return targets.target_devices(name)


@pytest.fixture(scope="session")
def v5e_devices():
    """A deviceless TPU v5e-4 slice's devices (skips, saying why, where the TPU compile plugin is missing)."""
    return _target_devices_or_skip("v5e-4")


@pytest.fixture(scope="session")
def h100_devices():
    """A deviceless H100's devices (skips, saying why, where the CUDA compile plugin is missing)."""
    return _target_devices_or_skip("h100")

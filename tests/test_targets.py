"""Deviceless compile targets (tidar_jax/targets.py): the ``--target`` syntax, its one-line errors, and real XLA:GPU
and XLA:TPU compiles on this CPU. The compile tests need the optional installs (requirements-gpu-compile.txt,
requirements-tpu-compile.txt; the README's test command installs them, so CI runs them) and skip with the reason
elsewhere."""

import numpy as np
import pytest

from tidar_jax import targets
from tidar_jax.targets import TargetError, parse_target


def _need(name):
    reason = targets.missing_install(parse_target(name))
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("text, chip, count", [("h100x8", "h100", 8), ("H200", "h200", 1), ("a100x4", "a100", 4),
                                               ("b200x16", "b200", 16), ("v5p-8", "v5p", 4), ("v5e-8", "v5e", 8),
                                               ("v6e-4", "v6e", 4)])
def test_parse_target(text, chip, count):
    t = parse_target(text)
    assert (t.chip.name, t.count) == (chip, count)


@pytest.mark.parametrize("text, fragment", [("h100x3", "3 GPUs cannot form a mesh"), ("x100", "unknown target"),
                                            ("v5p-2", "no deviceless v5p topology"), ("", "unknown target"),
                                            ("v7x-8", "unknown target"), ("h100x0", "0 GPUs")])
def test_bad_target_is_one_line(text, fragment):
    with pytest.raises(TargetError) as e:
        parse_target(text)
    assert fragment in str(e.value) and "\n" not in str(e.value) and "allowed" in str(e.value)


def test_missing_plugin_names_the_requirements_file(monkeypatch):
    monkeypatch.setattr(targets, "_find", lambda module: None)
    with pytest.raises(TargetError, match=r"pip install --no-deps --target \S+ -r requirements-gpu-compile.txt"):
        targets.target_devices("h100x8")
    with pytest.raises(TargetError, match=r"pip install --no-deps --target \S+ -r requirements-tpu-compile.txt"):
        targets.target_devices("v5e-4")


def test_compiling_for_sets_the_kernel_platform():
    from tidar_jax.attention import resolve

    assert resolve("auto") == "blockwise"  # the CPU the tests run on
    with targets.compiling_for("tpu"):
        assert targets.build_platform() == "tpu" and resolve("auto") == "splash"
    assert targets.build_platform() == "cpu"


def _compile_matmul(devices):
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(devices), ("x",))
    x = jax.ShapeDtypeStruct((len(devices) * 128, 256), jnp.bfloat16, sharding=NamedSharding(mesh, P("x")))
    w = jax.ShapeDtypeStruct((256, 512), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
    return jax.jit(lambda a, b: a @ b).lower(x, w).compile()


def test_gpu_target_compiles_for_the_named_chip():
    _need("h100x8")
    devices = targets.target_devices("h100x8")
    assert len(devices) == 8 and devices[0].device_kind == "NVIDIA H100 80GB HBM3"
    assert targets.platform_of_devices(devices) == "gpu"
    compiled = _compile_matmul(devices)
    hlo = compiled.as_text()
    assert "custom-call" in hlo or "fusion" in hlo  # an XLA:GPU program (cuBLAS call or Triton GEMM fusion)
    assert compiled.memory_analysis().argument_size_in_bytes == 128 * 256 * 2 + 256 * 512 * 2  # one shard of x + w


def test_tpu_target_compiles_for_the_named_chip():
    _need("v5e-4")
    devices = targets.target_devices("v5e-4")
    assert len(devices) == 4 and devices[0].device_kind == "TPU v5 lite"
    assert targets.platform_of_devices(devices) == "tpu"
    compiled = _compile_matmul(devices)
    assert "convolution" in compiled.as_text() or "dot" in compiled.as_text()

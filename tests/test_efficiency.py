"""The efficiency table and the expected time: every entry carries a source, and for every kernel class below 100%
of its peak the expected time of a kernel is slower than its ceiling (a launch class: at least the ceiling's)."""

import pytest

from tidar_jax.analysis import efficiency as eff
from tidar_jax.analysis.chips import chip_costs
from tidar_jax.targets import CHIPS


def test_every_entry_has_a_source_and_a_sane_value():
    assert set(eff.EFFICIENCY) == set(CHIPS)
    for chip, entries in eff.EFFICIENCY.items():
        assert set(entries) == set(eff.classes_for(CHIPS[chip])), chip
        for cls, e in entries.items():
            assert e.source.strip(), (chip, cls)
            assert e.url.startswith("https://") or e.borrowed_from, (chip, cls)  # an address, or says whose it is
            assert not e.borrowed_from or e.why_borrowed, (chip, cls)
            if cls in eff.LAUNCH_CLASSES:
                assert 0 < e.value < 1e-4, (chip, cls)
            else:
                assert 0 < e.value <= 1, (chip, cls)


def _kernel(cls, compute_s, memory_s, launch_s):
    return eff.CeilingKernel("k", cls, compute_s * 1e15, memory_s * 3e12, compute_s, memory_s, launch_s)


@pytest.mark.parametrize("chip", sorted(CHIPS))
@pytest.mark.parametrize("graph", [True, False])
def test_expected_is_slower_than_the_ceiling_for_every_class_below_full_efficiency(chip, graph):
    entries = eff.table(chip, calibration_path=None)
    launch = chip_costs(chip).launch_s if not graph else 1e-6 if CHIPS[chip].platform == "gpu" else 0.5e-6
    for cls in eff.classes_for(CHIPS[chip]):
        if cls in eff.LAUNCH_CLASSES:
            continue
        for compute_s, memory_s in ((1e-3, 1e-5), (1e-5, 1e-3)):  # compute-bound, memory-bound
            k = _kernel(cls, 0.0 if cls in (eff.MEMORY, eff.COLLECTIVE) else compute_s, memory_s, launch)
            got = eff.expected_kernel_s(k, entries, graph)
            binding = eff.MEMORY if k.memory_s >= k.compute_s and cls != eff.COLLECTIVE else cls
            if entries[binding].value < 1:
                assert got > k.ceiling_s, (cls, compute_s, memory_s)
            assert got >= k.ceiling_s
            # the binding side is derated by exactly its entry
            work = max(k.compute_s / entries[cls].value if cls not in (eff.MEMORY, eff.COLLECTIVE) else 0,
                       k.memory_s / entries[eff.COLLECTIVE if cls == eff.COLLECTIVE else eff.MEMORY].value)
            measured = max(entries[eff.LAUNCH_GRAPH].value, 0 if graph else entries[eff.LAUNCH_EAGER].value)
            assert got == pytest.approx(work + max(launch, measured))


def test_kernel_classes_of_cost_model_kinds():
    assert eff.kernel_class("fusion:__triton_nested_gemm_fusion", "jit(step)/dot_general", 1e6, "memory") == eff.GEMM
    assert eff.kernel_class("custom-call:__cublas$gemm", "", 1e9, "compute") == eff.GEMM
    assert eff.kernel_class("custom-call:__cudnn$fmhaSoftmax", "", 1e9, "compute") == eff.ATTENTION_CUDNN
    assert eff.kernel_class("custom-call:__gpu$xla.gpu.triton", "x/pallas_call", 1e9, "compute") == \
        eff.ATTENTION_PALLAS
    assert eff.kernel_class("custom-call:tpu_custom_call", "x/splash", 1e9, "compute") == eff.ATTENTION_PALLAS
    assert eff.kernel_class("fusion:kLoop", "jit(step)/add", 0.0, "memory") == eff.MEMORY
    assert eff.kernel_class("all-reduce-start", "", 0.0, "collective") == eff.COLLECTIVE


def test_calibrated_entries_override_the_published_ones(tmp_path):
    import json

    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"h100": {"gemm": {"value": 0.61, "source": "profile x"}}}))
    got = eff.table("h100", calibration_path=str(path))
    assert got[eff.GEMM].value == 0.61 and got[eff.GEMM].source == "profile x"
    assert got[eff.MEMORY] == eff.EFFICIENCY["h100"][eff.MEMORY]
    assert eff.table("h200", calibration_path=str(path)) == eff.EFFICIENCY["h200"]


def test_docs_give_every_source_address():
    import os

    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "estimates.md")) as f:
        doc = f.read()
    for chip, entries in eff.EFFICIENCY.items():
        for cls, e in entries.items():
            assert not e.url or e.url in doc, (chip, cls, e.url)

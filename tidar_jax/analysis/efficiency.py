"""The expected time of a compiled program: the ceiling estimate (``tidar_jax.analysis.cost_model``, every kernel at
the datasheet peak) derated by public measurements of what each kind of kernel achieves on each chip.

Two figures for every estimate: the ceiling (datasheet peaks, the cost model as it is) and the expected time. The
expected time of one kernel is a roofline whose peaks are derated per kernel class, plus a measured launch cost:

    expected = max(compute_s / compute efficiency, memory_s / HBM efficiency) + launch   (collective: comm_s / link
    efficiency + launch)

``EFFICIENCY`` holds, per chip and kernel class, the fraction of the peak a public measurement reached (a launch
class holds seconds per kernel instead), with the measurement's conditions and address; docs/estimates.md lists
them. A chip without a measurement of its own borrows another chip's figure and says which and why. Every
efficiency is at most 1 and every launch cost at least the ceiling's, so the expected time is never below the
ceiling.

Calibration (``tidar_jax.analysis.calibrate``) writes measured entries to ``CALIBRATION_FILE`` next to this module;
``table`` reads them over the published ones. Nothing outside the analysis floor reads that file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

from tidar_jax.targets import Chip

GEMM = "gemm"
ATTENTION_PALLAS = "attention_pallas"  # Pallas (Triton / Mosaic GPU / Mosaic TPU) attention kernels
ATTENTION_CUDNN = "attention_cudnn"
MEMORY = "memory_fusion"  # memory-bound fusions, copies, and the HBM side of every kernel
COLLECTIVE = "collective"
LAUNCH_GRAPH = "launch_in_graph"  # seconds per kernel inside one CUDA graph / one TPU program
LAUNCH_EAGER = "launch_eager"  # seconds per kernel launched from the host
KERNEL_CLASSES = (GEMM, ATTENTION_PALLAS, ATTENTION_CUDNN, MEMORY, COLLECTIVE, LAUNCH_GRAPH, LAUNCH_EAGER)
LAUNCH_CLASSES = (LAUNCH_GRAPH, LAUNCH_EAGER)
GPU_ONLY_CLASSES = (ATTENTION_CUDNN,)  # no cuDNN on a TPU: the class never occurs there

CALIBRATION_FILE = os.path.join(os.path.dirname(__file__), "efficiency_calibrated.json")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One efficiency: ``value`` is a fraction of the peak (a launch class: seconds per kernel)."""

    value: float
    source: str  # the measurement: who, what, under which conditions
    url: str
    borrowed_from: str = ""  # the chip whose measurement this is, when not this chip's own
    why_borrowed: str = ""


# --- the measurements (docs/estimates.md gives each with its conditions) ---------------------------------------
_FA3 = "https://arxiv.org/abs/2407.08608"
_NO_BUBBLES = "https://hazyresearch.stanford.edu/blog/2025-05-27-no-bubbles"
_H100_GEMM = Entry(518.6 / 989.4, "cuBLAS bf16 GEMM 8192x8192x8192 on one H100 SXM, CUDA 12.4: 518.6 TFLOP/s "
                   "(user measurement in the fast.cu repository's issue 13)",
                   "https://github.com/pranjalssh/fast.cu/issues/13")
_H100_FA2 = Entry(0.35, "FlashAttention-2 on H100: 35% of the dense fp16 peak (FlashAttention-3 paper, abstract); "
                  "a Pallas/Triton kernel without Hopper's warp specialisation and TMA is this class", _FA3)
_H100_CUDNN = Entry(740e12 / 989.4e12, "FlashAttention-3 forward fp16 on H100: up to 740 TFLOP/s (75%); cuDNN's "
                    "Hopper attention uses the same techniques and benchmarks within a few percent of it "
                    "(flash-attention issue 1310, H20)", _FA3)
_H100_MEMORY = Entry(0.78, "Llama-3.2-1B bf16 batch-1 decode as one megakernel on H100: 78% of HBM bandwidth with no "
                     "kernel boundaries (Hazy Research, 'Look Ma, No Bubbles', 2025); kernel boundaries are charged "
                     "by the launch class, so a kernel's own streaming rate is this one", _NO_BUBBLES)
# vLLM / SGLang (CUDA graphs, ~100 kernels per forward) reach at most 50% of HBM bandwidth on the same workload
# where the megakernel reaches 78%; the weights (2.47 GB) stream in 0.74 ms at 100%, so the boundaries cost
# (0.74/0.50 - 0.74/0.78) ms over ~100 kernels = 5.3 us per kernel inside a graph.
_H100_GRAPH_LAUNCH = Entry((2.47e9 / 3.35e12) * (1 / 0.50 - 1 / 0.78) / 100,
                           "derived from the same study: vLLM/SGLang (CUDA graphs, about a hundred kernels per "
                           "forward) at most 50% of HBM bandwidth vs the megakernel's 78%; the difference over ~100 kernels is "
                           "5.3 us per kernel boundary (setup, teardown, tail)", _NO_BUBBLES)
_EAGER_LAUNCH = Entry(5e-6, "host launch through the CUDA runtime: 4-6 us per kernel measured (pegainfer, RTX 5070 Ti, "
                      "CUDA 13); the launch path is the host's driver, not the GPU", 
                      "https://susun-blog.com/blog/pegainfer-3-cuda-graph", borrowed_from="RTX 5070 Ti",
                      why_borrowed="no published per-launch figure for a data-centre GPU; the cost is the host's "
                      "driver path, the same on every NVIDIA GPU")
_H100_NCCL = Entry(370 / 450, "NCCL on 8 x H100 NVLink4: 450 GB/s line rate, ~20% protocol overhead, 370 GB/s "
                   "effective bus bandwidth for ring collectives (NCCL maintainer, nccl-tests issue 212)",
                   "https://github.com/NVIDIA/nccl-tests/issues/212")


def _borrow(entry: Entry, chip: str, why: str) -> Entry:
    return dataclasses.replace(entry, borrowed_from=entry.borrowed_from or chip, why_borrowed=entry.why_borrowed or why)


_SAME_DIE = "same GH100 die, SMs and clocks as the H100 (only the HBM differs); no published figure of its own"
_H100_HBM = "no published streaming fraction of its own; the H100's measured fraction of peak is applied to its peak"
_TPU_LAUNCH = ("XLA:TPU runs the whole step as one program: no published per-op gap, the cost model's 0.5 us kept "
               "(expected = ceiling)")
_MAXTEXT = "https://maxtext.readthedocs.io/en/maxtext-v0.2.0/reference/models/tiering.html"


def _tpu(gemm: Entry) -> dict[str, Entry]:
    return {
        GEMM: gemm,
        ATTENTION_PALLAS: dataclasses.replace(gemm, source="splash attention inside the same MaxText runs: the "
                                              "step's MFU, attention included (no separate attention measurement)"),
        MEMORY: _borrow(_H100_MEMORY, "h100", "no public HBM streaming measurement on this TPU; the best-sourced "
                        "memory-bound fraction (a batch-1 decode) is the H100's"),
        COLLECTIVE: _borrow(_H100_NCCL, "h100", "no public ICI bus-bandwidth measurement; the H100's NVLink protocol "
                            "overhead stands in for ICI's"),
        LAUNCH_GRAPH: Entry(0.5e-6, _TPU_LAUNCH, "", "cost model", "an assumption, not a measurement"),
        LAUNCH_EAGER: Entry(0.5e-6, _TPU_LAUNCH, "", "cost model", "an assumption, not a measurement"),
    }


EFFICIENCY: dict[str, dict[str, Entry]] = {
    "h100": {GEMM: _H100_GEMM, ATTENTION_PALLAS: _H100_FA2, ATTENTION_CUDNN: _H100_CUDNN, MEMORY: _H100_MEMORY,
             COLLECTIVE: _H100_NCCL, LAUNCH_GRAPH: _H100_GRAPH_LAUNCH, LAUNCH_EAGER: _EAGER_LAUNCH},
    "h200": {GEMM: _borrow(_H100_GEMM, "h100", _SAME_DIE), ATTENTION_PALLAS: _borrow(_H100_FA2, "h100", _SAME_DIE),
             ATTENTION_CUDNN: _borrow(_H100_CUDNN, "h100", _SAME_DIE), MEMORY: _borrow(_H100_MEMORY, "h100", _H100_HBM),
             COLLECTIVE: _borrow(_H100_NCCL, "h100", "the same NVLink4 / NVSwitch as an 8 x H100 host"),
             LAUNCH_GRAPH: _borrow(_H100_GRAPH_LAUNCH, "h100", _SAME_DIE), LAUNCH_EAGER: _EAGER_LAUNCH},
    "a100": {
        GEMM: _borrow(_H100_GEMM, "h100", "no A100 GEMM measurement found; the H100's fraction of its own peak"),
        ATTENTION_PALLAS: Entry(0.50, "FlashAttention-2 forward on A100: 50-73% of the theoretical peak (paper, "
                                "abstract); the low end for a Pallas/Triton kernel",
                                "https://arxiv.org/abs/2307.08691"),
        ATTENTION_CUDNN: Entry(0.73, "FlashAttention-2 forward on A100: up to 73% of the peak (paper, abstract); "
                               "cuDNN's Ampere attention taken at that level", "https://arxiv.org/abs/2307.08691"),
        MEMORY: _borrow(_H100_MEMORY, "h100", _H100_HBM),
        COLLECTIVE: Entry(200 / 300, "nccl-tests all_reduce on 8 x A100 SXM4 80GB over NVLink: bus bandwidth ~200 "
                          "GB/s of 300 GB/s per direction (nccl-tests issue 149)",
                          "https://github.com/NVIDIA/nccl-tests/issues/149"),
        LAUNCH_GRAPH: _borrow(_H100_GRAPH_LAUNCH, "h100", "no A100 measurement; kernel boundaries cost about the same"),
        LAUNCH_EAGER: _EAGER_LAUNCH},
    "b200": {
        GEMM: Entry(1610 / 2250, "cuBLAS bf16 GEMM 8192^3 on B200: 1610 TFLOP/s of 2250 dense (pyptx performance "
                    "page, PyTorch 2.8 / CUDA 12.8)", "https://pyptx.dev/performance/"),
        ATTENTION_PALLAS: _borrow(_H100_FA2, "h100", "no B200 measurement of a non-specialised attention kernel"),
        ATTENTION_CUDNN: _borrow(_H100_CUDNN, "h100", "no B200 attention measurement found"),
        MEMORY: _borrow(_H100_MEMORY, "h100", _H100_HBM),
        COLLECTIVE: _borrow(_H100_NCCL, "h100", "NVLink5: the same protocol overhead assumed"),
        LAUNCH_GRAPH: _borrow(_H100_GRAPH_LAUNCH, "h100", "no B200 measurement"), LAUNCH_EAGER: _EAGER_LAUNCH},
    "v5e": _tpu(Entry(123 / 197, "MaxText 128B-parameter model training on v5e: 123 TFLOP/s per chip of 197 (MaxText "
                      "pull request 450, remat minimal_offload); a whole-step MFU, so a lower bound for its GEMMs",
                      "https://github.com/AI-Hypercomputer/maxtext/pull/450")),
    "v5p": _tpu(Entry(0.654, "MaxText Llama 2 70B on 512 v5p chips, bf16, sequence 4096: 65.4% MFU (MaxText optimized "
                      "models tiering, Gold); a whole-step MFU, so a lower bound for its GEMMs", _MAXTEXT)),
    "v6e": _tpu(Entry(0.4546, "MaxText Llama 3.1 8B on 256 v6e chips, bf16, sequence 8192: 45.46% MFU (MaxText "
                      "optimized models tiering, Gold); a whole-step MFU, so a lower bound for its GEMMs", _MAXTEXT)),
}


def classes_for(chip: Chip) -> tuple[str, ...]:
    """The kernel classes that occur on ``chip``'s platform."""
    return tuple(c for c in KERNEL_CLASSES if chip.platform == "gpu" or c not in GPU_ONLY_CLASSES)


def table(chip: Chip | str, calibration_path: str | None = CALIBRATION_FILE) -> dict[str, Entry]:
    """The efficiencies for ``chip``: the published ones, each overridden by a calibrated entry when
    ``calibration_path`` holds one for this chip (``tidar_jax.analysis.calibrate`` writes that file)."""
    name = chip if isinstance(chip, str) else chip.name
    out = dict(EFFICIENCY[name])
    if calibration_path and os.path.exists(calibration_path):
        with open(calibration_path) as f:
            calibrated = json.load(f).get(name, {})
        for cls, e in calibrated.items():
            out[cls] = Entry(float(e["value"]), e["source"], e.get("url", ""))
    return out


# --- kernel classes of the cost model's kernels --------------------------------------------------------------
_CUDNN = re.compile(r"cudnn|fmha", re.I)
_PALLAS = re.compile(r"__gpu\$xla\.gpu\.triton|mosaic|tpu_custom_call|pallas", re.I)
_ATTENTION = re.compile(r"attention|flash|splash|fmha|mha", re.I)


def kernel_class(kind: str, op_name: str, flops: float, bound: str) -> str:
    """The efficiency class of one cost-model kernel (``KernelCost``'s ``kind``, ``op_name``, ``flops``, ``bound``)."""
    if bound == "collective":
        return COLLECTIVE
    if kind.startswith("custom-call") and _CUDNN.search(kind):
        return ATTENTION_CUDNN
    if _PALLAS.search(kind) or (kind.startswith("custom-call") and _ATTENTION.search(op_name)):
        return ATTENTION_PALLAS
    return GEMM if flops > 0 else MEMORY


@dataclasses.dataclass(frozen=True)
class CeilingKernel:
    """One kernel of a ceiling estimate: its class, work and the ceiling's time split into its roofline sides."""

    name: str
    cls: str
    flops: float
    bytes: float
    compute_s: float  # at the datasheet peak (0 for a collective)
    memory_s: float  # at full HBM bandwidth (a collective: its traffic at full link bandwidth)
    launch_s: float  # the ceiling's launch cost
    runs: int = 1

    @property
    def ceiling_s(self) -> float:
        return max(self.compute_s, self.memory_s) + self.launch_s

    @classmethod
    def of(cls, k, assumptions) -> "CeilingKernel":
        """From a cost-model ``KernelCost`` and its ``Assumptions``. The f32/bf16 choice is the cost model's: for a
        compute-bound kernel the compute side is its work; otherwise FLOPs at the bf16 peak (below the memory side
        either way)."""
        work = k.time_s - assumptions.launch_s
        klass = kernel_class(k.kind, k.op_name, k.flops, k.bound)
        moved = k.bytes_read + k.bytes_written
        if klass == COLLECTIVE:
            return cls(k.name, klass, 0.0, moved, 0.0, work, assumptions.launch_s, k.runs)
        compute = work if k.bound == "compute" else min(k.flops / assumptions.peak_bf16_flops, work)
        memory = moved / assumptions.hbm_bytes_per_s
        return cls(k.name, klass, k.flops, moved, compute, memory, assumptions.launch_s, k.runs)


def expected_kernel_s(k: CeilingKernel, entries: dict[str, Entry], graph: bool) -> float:
    """One launch of ``k`` at the measured efficiencies: derated roofline plus the measured launch cost (never below
    the ceiling's launch cost; a host launch never below the in-graph kernel boundary)."""
    launch = max(entries[LAUNCH_GRAPH].value, k.launch_s)
    if not graph:  # a host launch overlaps the previous kernel; the boundary on the GPU is paid either way
        launch = max(launch, entries[LAUNCH_EAGER].value)
    if k.cls == COLLECTIVE:
        return k.memory_s / entries[COLLECTIVE].value + launch
    compute = k.compute_s / entries[k.cls].value if k.cls != MEMORY else 0.0
    return max(compute, k.memory_s / entries[MEMORY].value) + launch


@dataclasses.dataclass
class Expected:
    """A ceiling estimate beside its expected time."""

    chip: str
    ceiling_s: float
    expected_s: float
    ceiling_by_class: dict[str, float]
    expected_by_class: dict[str, float]
    round_trip_s: float  # host round trips, in both figures alike

    def summary(self) -> dict:
        return dataclasses.asdict(self)


def expected(estimate, chip: Chip, graph: bool, calibration_path: str | None = CALIBRATION_FILE) -> Expected:
    """The expected time of a cost-model ``Estimate`` for ``chip`` (``graph``: kernels inside one CUDA graph / one TPU
    program), beside its ceiling."""
    entries = table(chip, calibration_path)
    ceiling_by: dict[str, float] = {}
    expected_by: dict[str, float] = {}
    for kc in estimate.kernels:
        ck = CeilingKernel.of(kc, estimate.assumptions)
        ceiling_by[ck.cls] = ceiling_by.get(ck.cls, 0.0) + ck.ceiling_s * ck.runs
        expected_by[ck.cls] = expected_by.get(ck.cls, 0.0) + expected_kernel_s(ck, entries, graph) * ck.runs
    rt = estimate.round_trip_time_s
    return Expected(chip.name, sum(ceiling_by.values()) + rt, sum(expected_by.values()) + rt, ceiling_by,
                    expected_by, rt)


def sources_markdown() -> str:
    """The table as markdown rows (docs/estimates.md)."""
    rows = ["| chip | class | value | source | borrowed from (why) |", "|---|---|---|---|---|"]
    for chip, entries in EFFICIENCY.items():
        for cls, e in entries.items():
            value = f"{e.value * 1e6:.1f} us" if cls in LAUNCH_CLASSES else f"{e.value:.0%}"
            src = f"[{e.source}]({e.url})" if e.url else e.source
            borrowed = f"{e.borrowed_from} ({e.why_borrowed})" if e.borrowed_from else ""
            rows.append(f"| {chip} | {cls} | {value} | {src} | {borrowed} |")
    return "\n".join(rows)


__all__ = ["ATTENTION_CUDNN", "ATTENTION_PALLAS", "CALIBRATION_FILE", "COLLECTIVE", "CeilingKernel", "EFFICIENCY",
           "Entry", "Expected", "GEMM", "KERNEL_CLASSES", "LAUNCH_EAGER", "LAUNCH_GRAPH", "MEMORY", "classes_for",
           "expected", "expected_kernel_s", "kernel_class", "sources_markdown", "table"]

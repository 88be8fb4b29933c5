"""A roofline cost model of a compiled program: an *estimate* of its time on a target chip, with its assumptions.

For every kernel of the optimized HLO (``tidar_jax.analysis.hlo``: a fusion, a custom call, a copy, a collective):

* FLOPs: the ``dot`` and ``convolution`` instructions inside it (2 per multiply-add, from the operand and result
  shapes), a cuBLAS GEMM custom call from its dot dimension numbers, and an attention custom call (cuDNN fused
  attention, a Pallas/Triton or Mosaic kernel) from its operand shapes: ``4 N H T S D`` forward (every query-key
  pair: an upper bound for a masked kernel that skips tiles), 2.5x that for a backward call; a Pallas kernel that
  names the sizes of its work (``tidar_jax.analysis.kernel_costs``: the block-sparse attention kernels, the tiles
  their schedule visits) is charged for those; the fused cache attention has a fixed part and FLOPs per live
  cache slot, charged for the live length the estimate is given (every allocated slot when none).
  Elementwise work is not counted (it is memory-bound; its bytes are).
* bytes: what it reads (each operand; an operand only sliced inside the kernel counts its slices, one only
  updated in place counts nothing) plus what it writes (each result; an in-place update counts its update).
* time: ``max(FLOPs / peak(dtype), bytes / HBM bandwidth) + launch`` (the chip's eager launch cost, or with
  ``graph=True`` the assumed cost of a kernel inside one CUDA graph, ``GRAPH_LAUNCH_S``); a collective moves its
  ring traffic over the chip's interconnect instead.

A loop's kernels count once per iteration (trip counts multiply through nesting); a loop whose trip count is only
known at run time runs ``dynamic_trips`` iterations (an assumption) and pays a host round trip per iteration plus
the exit test (XLA:GPU copies its predicate to the host). Everything assumed is carried in ``Assumptions`` and
printed beside every estimate: these are estimates of a model, not measurements. The accelerator suite records
them beside its measurements so that the first GPU run calibrates them.

Why our own model: XLA's ``cost_analysis()`` is None for a deviceless GPU compile, and XLA's GpuPerformanceModel
(which this follows: roofline per kernel plus a launch cost) has no Python API.
"""

from __future__ import annotations

import dataclasses
import math
import re

from tidar_jax.analysis.chips import chip_costs
from tidar_jax.analysis.hlo import COLLECTIVES, HloProgram, Instruction, array_shapes, type_bytes
from tidar_jax.analysis.kernel_costs import named_kernel_flops
from tidar_jax.targets import Chip

# Ops that read only part of their first operand / update their first operand in place.
_SLICERS = frozenset({"dynamic-slice", "slice", "gather"})
_UPDATERS = {"dynamic-update-slice": 1, "scatter": 2}  # opcode -> index of the update operand
_ATTENTION_TARGET = re.compile(r"fmha|flash|attention|mha|splash|__gpu\$xla\.gpu\.triton|mosaic", re.I)
_BACKWARD = re.compile(r"backward|bwd|_vjp|grad", re.I)

# A kernel inside a CUDA graph (an XLA:GPU command buffer, which the H100 decode step compiles to: see
# docs/decode.md) still pays a dependency gap but no host-side launch. ASSUMED, not measured: 1 us, the kernel
# launch overhead XLA's own GpuPerformanceModel uses.
GRAPH_LAUNCH_S = 1e-6
GRAPH_LAUNCH_SOURCE = "one CUDA graph: 1 us per kernel ASSUMED, XLA GpuPerformanceModel's launch cost"


@dataclasses.dataclass(frozen=True)
class Assumptions:
    """Everything the estimate assumes; ``line()`` is printed beside every figure."""

    chip: str
    peak_bf16_flops: float
    peak_fp32_flops: float
    hbm_bytes_per_s: float
    interconnect_bytes_per_s: float
    launch_s: float
    host_round_trip_s: float
    dynamic_trips: int
    launch_source: str = "eager stream launches"
    live_cache_slots: int | None = None  # the fused cache kernel is charged for these slots per row (None: all)

    @classmethod
    def of(cls, chip: Chip, dynamic_trips: int = 1, graph: bool = False,
           live_cache_slots: int | None = None) -> "Assumptions":
        """``graph``: the program runs as one CUDA graph (XLA:GPU command buffer), each kernel costing
        ``GRAPH_LAUNCH_S`` instead of the chip's eager launch cost (``GRAPH_LAUNCH_SOURCE`` says where it is from)."""
        c = chip_costs(chip)
        launch_s, source = (GRAPH_LAUNCH_S, GRAPH_LAUNCH_SOURCE) if graph else (c.launch_s, "eager stream launches")
        return cls(c.name, c.peak_bf16_flops, c.peak_fp32_flops, c.hbm_bytes_per_s, c.interconnect_bytes_per_s,
                   launch_s, c.host_round_trip_s, int(dynamic_trips), source, live_cache_slots)

    def line(self) -> str:
        cache = ("the whole cache" if self.live_cache_slots is None
                 else f"{self.live_cache_slots} live slots per row")
        return (f"estimate for {self.chip}: bf16 peak {self.peak_bf16_flops / 1e12:.0f} TFLOP/s, f32 dots "
                f"{self.peak_fp32_flops / 1e12:.0f} TFLOP/s, HBM {self.hbm_bytes_per_s / 1e12:.2f} TB/s, "
                f"interconnect {self.interconnect_bytes_per_s / 1e9:.0f} GB/s, launch {self.launch_s * 1e6:.1f} us "
                f"per kernel ({self.launch_source}), fused cache attention charged for "
                f"{cache}, host round trip {self.host_round_trip_s * 1e6:.0f} us, {self.dynamic_trips} "
                f"iterations assumed per data-dependent loop; no overlap of kernels, roofline per kernel")


@dataclasses.dataclass
class KernelCost:
    """One kernel of the program; ``runs`` is how often one run of the program launches it."""

    name: str
    kind: str
    op_name: str
    runs: int
    flops: float
    bytes_read: float
    bytes_written: float
    time_s: float  # of one launch, launch cost included
    bound: str  # "compute" | "memory" | "collective" | "launch"

    @property
    def total_time_s(self) -> float:
        return self.time_s * self.runs


@dataclasses.dataclass
class Estimate:
    assumptions: Assumptions
    kernels: list[KernelCost]
    host_round_trips: int

    @property
    def flops(self) -> float:
        return sum(k.flops * k.runs for k in self.kernels)

    @property
    def bytes(self) -> float:
        return sum((k.bytes_read + k.bytes_written) * k.runs for k in self.kernels)

    @property
    def launches(self) -> int:
        return sum(k.runs for k in self.kernels)

    @property
    def kernel_time_s(self) -> float:
        return sum(k.total_time_s for k in self.kernels)

    @property
    def launch_time_s(self) -> float:
        return self.launches * self.assumptions.launch_s

    @property
    def round_trip_time_s(self) -> float:
        return self.host_round_trips * self.assumptions.host_round_trip_s

    @property
    def time_s(self) -> float:
        return self.kernel_time_s + self.round_trip_time_s

    def time_by(self, bound: str) -> float:
        return sum(k.total_time_s for k in self.kernels if k.bound == bound)

    def top(self, n: int = 10) -> list[KernelCost]:
        return sorted(self.kernels, key=lambda k: -k.total_time_s)[:n]

    def summary(self) -> dict:
        a = self.assumptions
        return {"time_s": self.time_s, "flops": self.flops, "bytes": self.bytes, "launches": self.launches,
                "host_round_trips": self.host_round_trips, "launch_time_s": self.launch_time_s,
                "round_trip_time_s": self.round_trip_time_s, "compute_bound_time_s": self.time_by("compute"),
                "memory_bound_time_s": self.time_by("memory"), "collective_time_s": self.time_by("collective"),
                "launch_bound_time_s": self.time_by("launch"),
                "assumptions": dataclasses.asdict(a), "assumptions_line": a.line()}

    def line(self) -> str:
        return (f"{self.time_s * 1e3:.3f} ms (kernels {self.kernel_time_s * 1e3:.3f} ms of which launch "
                f"{self.launch_time_s * 1e3:.3f} ms over {self.launches} launches; {self.host_round_trips} host round "
                f"trips {self.round_trip_time_s * 1e3:.3f} ms; {self.flops / 1e9:.2f} GFLOP, "
                f"{self.bytes / 1e9:.3f} GB) [{self.assumptions.line()}]")


# ---------------------------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------------------------

def _dims(attr: str | None) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", attr or "")]


def _shape(type_str: str) -> tuple[str, tuple[int, ...]]:
    shapes = array_shapes(type_str)
    return shapes[0] if shapes else ("", ())


def dot_flops(program: HloProgram, instr: Instruction) -> float:
    """2 x result elements x contracted size of an HLO ``dot``."""
    _, lhs = _shape(program.types.get(instr.operands[0], ""))
    _, out = _shape(instr.type_str)
    contracted = math.prod(lhs[i] for i in _dims(instr.attr("lhs_contracting_dims")) if i < len(lhs))
    return 2.0 * math.prod(out) * contracted


def convolution_flops(program: HloProgram, instr: Instruction) -> float:
    """2 x output elements x (kernel elements / output features): a dot lowered as a convolution (XLA:TPU)."""
    _, rhs = _shape(program.types.get(instr.operands[1], ""))
    _, out = _shape(instr.type_str)
    labels = instr.attr("dim_labels") or ""
    m = re.match(r"[^_]*_([^-]*)->", labels)
    o_index = m.group(1).find("o") if m else -1
    out_features = rhs[o_index] if 0 <= o_index < len(rhs) else 1
    return 2.0 * math.prod(out) * math.prod(rhs) / max(out_features, 1)


def _gemm_flops(program: HloProgram, instr: Instruction) -> float:
    """A cuBLAS / cuBLASLt GEMM custom call: its result's first array times the contracted size."""
    cfg = instr.backend_config.get("gemm_backend_config", {})
    dnums = cfg.get("dot_dimension_numbers", {})
    _, lhs = _shape(program.types.get(instr.operands[0], "")) if instr.operands else ("", ())
    _, out = _shape(instr.type_str)
    contracted = math.prod(lhs[int(i)] for i in dnums.get("lhs_contracting_dimensions", []) if int(i) < len(lhs))
    return 2.0 * math.prod(out) * contracted


def attention_flops(operand_shapes: list[tuple[int, ...]], backward: bool) -> float:
    """An attention kernel's FLOPs from its operands: q and k are the first two rank-4 operands with the same last
    (head) dimension, ``q [N, T, H, D]`` (or ``[N, H, T, D]``), ``k [N, S, K, D]``; every query-key pair counted
    (scores and the weighted sum of values: 4 N H T S D), 2.5x for a backward kernel (five matmuls to two)."""
    rank4 = [s for s in operand_shapes if len(s) == 4]
    for i, q in enumerate(rank4):
        for k in rank4[i + 1:]:
            if k[-1] == q[-1] and k[0] == q[0]:
                s = max(k[1], k[2])  # the key length, whichever of the two middle axes it is
                return 4.0 * math.prod(q) * s * (2.5 if backward else 1.0)
    return 0.0


def _named_flops(instr: Instruction) -> tuple[float, float | None] | None:
    """What a custom kernel's name says it costs (``kernel_costs.named_kernel_flops``): read from the op_name, else
    from the backend_config's kernel name (text: jax 0.10 prints it as an MLIR dictionary, not JSON)."""
    found = named_kernel_flops(_op_name(instr))
    if found is None:
        m = re.search(r'\bname\s*[=:]\s*\\?"([^"\\]*)', instr.attr("backend_config") or "")
        found = named_kernel_flops(m.group(1) if m else "")
    return found


def declared_kernel_flops(instr: Instruction) -> float | None:
    """The fixed FLOPs of one launch of a custom kernel that names its work (the block-sparse attention kernels
    are charged for the tiles their schedule visits, not for every query-key pair of their operands), or None."""
    found = _named_flops(instr)
    return None if found is None else found[0]


def declared_cache_slot_flops(program: HloProgram, instr: Instruction, live_slots: int | None) -> float:
    """The FLOPs a kernel's name gives per live cache slot (the fused cache attention) times the live slots:
    ``live_slots`` (an assumption of the estimate) or, when None, every allocated slot of its whole-cache operand
    ``[L, N, C, K, D]``. 0 for any other kernel."""
    found = _named_flops(instr)
    if found is None or found[1] is None:
        return 0.0
    slots = max((dims[2] for t in program.operand_types(instr) for _, dims in array_shapes(t) if len(dims) == 5),
                default=0)
    return found[1] * (slots if live_slots is None else min(live_slots, slots))


def _custom_call_flops(program: HloProgram, instr: Instruction) -> float:
    target = instr.attr("custom_call_target") or ""
    if "gemm" in target or "matmul" in target:
        return _gemm_flops(program, instr)
    declared = declared_kernel_flops(instr)
    if declared is not None:
        return declared
    if _ATTENTION_TARGET.search(target) or _ATTENTION_TARGET.search(_op_name(instr)):
        shapes = [_shape(t)[1] for t in program.operand_types(instr)]
        # the op's own name (``.../dot_product_attention_bwd``), not the path above it: a jitted function named
        # ``fwd_bwd`` must not make its forward call a backward one
        own_name = _op_name(instr).rsplit("/", 1)[-1]
        return attention_flops(shapes, bool(_BACKWARD.search(target + " " + own_name)))
    return 0.0


def _flops_and_dtype(program: HloProgram, comp: str, seen: set) -> tuple[float, bool]:
    """FLOPs of the dots/convolutions in ``comp`` and the computations it calls; whether any runs in f32."""
    if comp in seen or comp not in program.computations:
        return 0.0, False
    seen.add(comp)
    flops, f32 = 0.0, False
    for i in program.instructions(comp):
        if i.opcode == "dot":
            flops += dot_flops(program, i)
            f32 |= any(_shape(program.types.get(o, ""))[0] in ("f32", "f64") for o in i.operands)
        elif i.opcode == "convolution":
            flops += convolution_flops(program, i)
            f32 |= any(_shape(program.types.get(o, ""))[0] in ("f32", "f64") for o in i.operands)
        elif i.opcode == "custom-call":
            flops += _custom_call_flops(program, i)
        for c in i.called:
            sub, sub32 = _flops_and_dtype(program, c, seen)
            flops, f32 = flops + sub, f32 or sub32
    return flops, f32


def kernel_flops(program: HloProgram, instr: Instruction) -> tuple[float, bool]:
    """``(FLOPs, runs in f32)`` of one kernel."""
    if instr.opcode == "custom-call":
        flops = _custom_call_flops(program, instr)
        f32 = any(_shape(t)[0] in ("f32", "f64") for t in program.operand_types(instr)[:2])
        return flops, f32
    if instr.opcode == "dot":
        return dot_flops(program, instr), _shape(program.types.get(instr.operands[0], ""))[0] == "f32"
    if instr.opcode == "convolution":
        return convolution_flops(program, instr), _shape(program.types.get(instr.operands[0], ""))[0] == "f32"
    if instr.opcode == "fusion":
        return _flops_and_dtype(program, instr.attr("calls") or "", set())
    return 0.0, False


# ---------------------------------------------------------------------------------------------------------------
# bytes
# ---------------------------------------------------------------------------------------------------------------

def _users(program: HloProgram, comp: str) -> dict[str, list[Instruction]]:
    users: dict[str, list[Instruction]] = {}
    for i in program.instructions(comp):
        for o in i.operands:
            users.setdefault(o, []).append(i)
    return users


def _read_through(program: HloProgram, name: str, users, depth: int = 0) -> float | None:
    """Bytes read of value ``name`` when every use only slices it or updates it in place (None: read whole)."""
    total = 0.0
    for u in users.get(name, []):
        if u.opcode in _SLICERS and u.operands and u.operands[0] == name:
            total += type_bytes(u.type_str)
        elif u.opcode in _UPDATERS and u.operands and u.operands[0] == name:
            continue  # updated in place: the untouched part is neither read nor written
        elif u.opcode == "bitcast" and depth < 4:
            sub = _read_through(program, u.name, users, depth + 1)
            if sub is None:
                return None
            total += sub
        else:
            return None
    return total


def _written(program: HloProgram, comp: str, root_name: str) -> float:
    instrs = {i.name: i for i in program.instructions(comp)}
    root = instrs.get(root_name)
    if root is None:
        return 0.0
    if root.opcode == "tuple":
        return sum(_written(program, comp, o) for o in root.operands)
    if root.opcode == "bitcast" and root.operands:
        return _written(program, comp, root.operands[0])
    if root.opcode in _UPDATERS and len(root.operands) > _UPDATERS[root.opcode]:
        return type_bytes(program.types.get(root.operands[_UPDATERS[root.opcode]], ""))
    return type_bytes(root.type_str)


def kernel_bytes(program: HloProgram, instr: Instruction) -> tuple[float, float]:
    """``(bytes read, bytes written)`` of one kernel from its operand and result shapes."""
    if instr.opcode == "fusion":
        comp = instr.attr("calls") or ""
        if comp in program.computations:
            params = {i.name: i for i in program.instructions(comp) if i.opcode == "parameter"}
            users = _users(program, comp)
            read = 0.0
            for name, p in params.items():
                part = _read_through(program, name, users)
                read += type_bytes(p.type_str) if part is None else part
            root = program.roots.get(comp)
            written = _written(program, comp, root) if root else type_bytes(instr.type_str)
            return read, written
    if instr.opcode in _UPDATERS and len(instr.operands) > _UPDATERS[instr.opcode]:
        update = type_bytes(program.types.get(instr.operands[_UPDATERS[instr.opcode]], ""))
        return update, update
    if instr.opcode in _SLICERS:
        out = type_bytes(instr.type_str)
        return out, out
    read = sum(type_bytes(t) for t in program.operand_types(instr))
    written = type_bytes(instr.type_str)
    if instr.opcode == "custom-call":  # a GEMM's result tuple carries its scratch workspace: not HBM traffic
        shapes = array_shapes(instr.type_str)
        if len(shapes) > 1 and shapes[-1][0] == "s8":
            written -= math.prod(shapes[-1][1])
    return read, written


# ---------------------------------------------------------------------------------------------------------------
# collectives
# ---------------------------------------------------------------------------------------------------------------

def group_size(instr: Instruction) -> int:
    """Participants per replica group: ``mesh['a'=8,'b'=1] {'a'}`` (mesh-axes form: the named axes' sizes
    multiply), ``[G,n]<=[...]`` (iota form) or ``{{0,1,..},..}``."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", instr.attrs)
    if m:
        sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
        return math.prod(sizes.get(a, 1) for a in re.findall(r"'([^']+)'", m.group(2)))
    groups = instr.attr("replica_groups") or ""
    m = re.match(r"\[(\d+),(\d+)\]", groups)
    if m:
        return int(m.group(2))
    first = re.search(r"\{\{?([\d,\s]*)\}", groups)
    if first and first.group(1).strip():
        return len(first.group(1).split(","))
    pairs = instr.attr("source_target_pairs")
    return 2 if pairs else 1


def collective_bytes(program: HloProgram, instr: Instruction) -> float:
    """Bytes one chip sends over its links for a ring implementation of the collective."""
    op = instr.opcode.removesuffix("-start")
    n = group_size(instr)
    if n <= 1 and op != "collective-permute":
        return 0.0
    operand = sum(type_bytes(t) for t in program.operand_types(instr))
    result = _result_bytes(instr)
    if op == "all-reduce":
        return 2.0 * (n - 1) / n * operand
    if op == "all-gather":
        return (n - 1) / n * result
    if op in ("reduce-scatter", "all-to-all", "ragged-all-to-all"):
        return (n - 1) / n * operand
    return operand  # collective-permute / broadcast: the whole buffer once


def _result_bytes(instr: Instruction) -> float:
    shapes = array_shapes(instr.type_str)
    if instr.opcode.endswith("-start") and len(shapes) > 1:  # (operands..., results...) of an async start
        return float(sum(math.prod(d) * _bytes_of(dt) for dt, d in shapes[len(shapes) // 2:]))
    return type_bytes(instr.type_str)


def _bytes_of(dtype: str) -> float:
    return type_bytes(f"{dtype}[1]")


def _is_collective(instr: Instruction) -> bool:
    return instr.opcode.removesuffix("-start") in COLLECTIVES


# ---------------------------------------------------------------------------------------------------------------
# the estimate
# ---------------------------------------------------------------------------------------------------------------

def kernel_cost(program: HloProgram, instr: Instruction, a: Assumptions, runs: int) -> KernelCost:
    if _is_collective(instr):
        moved = collective_bytes(program, instr)
        t = moved / a.interconnect_bytes_per_s if a.interconnect_bytes_per_s else 0.0
        return KernelCost(instr.name, instr.kind, _op_name(instr), runs, 0.0, moved, 0.0, t + a.launch_s,
                          "collective")
    flops, f32 = kernel_flops(program, instr)
    flops += declared_cache_slot_flops(program, instr, a.live_cache_slots)
    read, written = kernel_bytes(program, instr)
    if a.live_cache_slots is not None:
        read -= fused_cache_unread_bytes(program, instr, a.live_cache_slots)
    compute = flops / (a.peak_fp32_flops if f32 else a.peak_bf16_flops)
    memory = (read + written) / a.hbm_bytes_per_s
    work = max(compute, memory)
    bound = "launch" if work < a.launch_s else ("compute" if compute >= memory else "memory")
    return KernelCost(instr.name, instr.kind, _op_name(instr), runs, flops, read, written, work + a.launch_s, bound)


# the kernels that read the whole allocated cache in place and stop at each row's live length
CACHE_KERNELS = ("fused_cache_attention", "tpu_cache_attention")


def fused_cache_unread_bytes(program: HloProgram, instr: Instruction, live_slots: int) -> float:
    """Bytes of its whole-cache operands ``[L, N, C, K, D]`` that one call of a cache attention kernel
    (``tidar_jax.attention.fused_cache`` on GPU, ``tidar_jax.attention.tpu_cache`` on TPU) does not read: it reads one layer's first ``live_slots`` slots of each row
    (its key-block loop stops at the live end), the operand shapes say the whole allocated cache. 0 for any other
    kernel."""
    if instr.opcode != "custom-call" or not any(k in _op_name(instr) for k in CACHE_KERNELS):
        return 0.0
    unread = 0.0
    for t in program.operand_types(instr):
        for dt, dims in array_shapes(t):
            if len(dims) == 5:
                layers, rows, slots, kv, d = dims
                unread += type_bytes(t) - type_bytes(f"{dt}[{rows},{min(live_slots, slots)},{kv},{d}]")
    return unread


def estimate(program: HloProgram, chip: Chip, dynamic_trips: int = 1, graph: bool = False,
             live_cache_slots: int | None = None) -> Estimate:
    """The estimated time of one run of ``program`` on ``chip`` (see the module docstring for the model).
    ``graph``: launches at the in-graph cost (``Assumptions.of``); ``live_cache_slots``: the live cache length,
    for the fused cache kernel's reads (``fused_cache_unread_bytes``)."""
    a = Assumptions.of(chip, dynamic_trips, graph, live_cache_slots)
    kernels: list[KernelCost] = []

    def visit(comp: str, runs: int):
        for i in program.instructions(comp):
            if i.is_kernel:
                kernels.append(kernel_cost(program, i, a, runs))
            if i.opcode == "while":
                trips = i.trip_count if i.trip_count is not None else dynamic_trips
                visit(i.attr("body"), runs * trips)
                visit(i.attr("condition"), runs * trips)  # as HloProgram.launches counts it
            elif i.opcode in ("conditional", "call"):
                for c in i.called:  # a conditional runs one branch: the model charges each (an upper bound)
                    visit(c, runs)

    visit(program.entry, 1)
    return Estimate(a, kernels, program.host_round_trips(dynamic_trips))


def _op_name(instr: Instruction) -> str:
    m = re.search(r'op_name="([^"]*)"', instr.attrs)
    return m.group(1) if m else ""


__all__ = ["GRAPH_LAUNCH_S", "Assumptions", "Estimate", "KernelCost", "attention_flops", "collective_bytes",
           "convolution_flops", "declared_cache_slot_flops", "declared_kernel_flops", "dot_flops", "estimate", "fused_cache_unread_bytes",
           "kernel_bytes", "kernel_flops"]

"""TPU step times: the cost model on XLA:TPU's compiled program, with the loop trip counts XLA:TPU's optimised HLO
drops taken from the program before XLA's passes, and TPU peaks; both the ceiling and the expected figure.

XLA:GPU records a loop's trip count in its ``while``'s backend_config (``known_trip_count``); XLA:TPU's optimised
HLO does not. The program jax hands to XLA (``Lowered.as_text(dialect="hlo")``) still has the loop's shape: a
``scan`` / ``fori_loop`` with static bounds lowers to a ``while`` whose condition is ``counter < constant`` and
whose initial counter is a constant. That pattern (the one XLA's own loop analysis matches) gives the trip count;
any other condition is data-dependent. XLA:TPU keeps each loop's body computation name through its passes
(``region_1.1`` becomes ``wide.region_1.1.sunk``), which maps each compiled loop to its source loop.

HBM traffic on a TPU: XLA:TPU places some buffers in on-chip VMEM (memory space 1, ``S(1)`` in the layout) and
prefetches weights into it with async copies (``slice-start`` / ``copy-start``). The cost model counts every
operand and result as HBM traffic; here a VMEM operand or result is not HBM traffic, and an async non-collective
``-start`` moves its result once (read from HBM into VMEM), not its whole operand tuple. XLA:TPU also nests
fusions: an operand a kernel hands to a nested fusion that only slices it (the paged cache walk's page of the
whole-cache operand) is charged the slice, as the cost model charges an operand sliced directly.

A data-dependent loop (the paged cache walk of a decode step) runs the iterations the caller assumes, as on GPU.
On a TPU the loop runs on the device: no host round trip per iteration is charged (the GPU notion; the cost model's
``host_round_trips`` is not added here).

TPU peaks (per chip, bf16 dense / HBM / ICI per direction) are ``tidar_jax.analysis.chips``'s, from Google Cloud's
TPU pages: v5e 197 TFLOP/s, 819 GB/s; v5p 459 TFLOP/s, 2765 GB/s; v6e 918 TFLOP/s, 1640 GB/s (docs/estimates.md
gives the addresses).
"""

from __future__ import annotations

import dataclasses
import json
import re

from tidar_jax.analysis.efficiency import expected
from tidar_jax.analysis.chips import chip_costs
from tidar_jax.analysis.cost_model import estimate
from tidar_jax.analysis.hlo import COLLECTIVES, HloProgram, type_bytes
from tidar_jax.targets import Chip

TPU_PEAK_SOURCES = {
    "v5e": "https://cloud.google.com/tpu/docs/v5e",
    "v5p": "https://cloud.google.com/tpu/docs/v5p",
    "v6e": "https://cloud.google.com/tpu/docs/v6e",
}

_REGION = re.compile(r"region_\d+(?:\.\d+)?")


@dataclasses.dataclass(frozen=True)
class _Op:
    """One instruction of the unoptimised HLO (XLA's short text form, as jax prints it)."""

    name: str
    opcode: str
    args: list[str]  # operand names, or a constant's literal
    attrs: str


_SHORT_HEADER = re.compile(r"^(ENTRY\s+)?([\w.\-]+)\s*\{\s*$")
_SHORT_INSTR = re.compile(r"^\s*(ROOT\s+)?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"(?:^|\s)([a-z][\w\-]*)\(")


def _parse_short(text: str) -> tuple[dict[str, dict[str, _Op]], dict[str, str]]:
    """Computations (name -> {instruction name -> _Op}) and each computation's ROOT name."""
    from tidar_jax.analysis.hlo import _balanced

    comps: dict[str, dict[str, _Op]] = {}
    roots: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        h = _SHORT_HEADER.match(line)
        if h:
            current = h.group(2)
            comps[current] = {}
            continue
        if current is None:
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _SHORT_INSTR.match(line)
        if not m:
            continue
        rest = m.group(3)
        op = _OPCODE.search(rest)
        if not op:
            continue
        open_at = op.end() - 1
        close = _balanced(rest, open_at)
        args = [a.strip() for a in rest[open_at + 1:close - 1].split(",") if a.strip()]
        comps[current][m.group(2)] = _Op(m.group(2), op.group(1), args, rest[close:])
        if m.group(1):
            roots[current] = m.group(2)
    return comps, roots


def _constant(ops: dict[str, _Op], name: str) -> int | None:
    op = ops.get(name)
    if op is None:
        return None
    if op.opcode == "constant" and len(op.args) == 1 and re.fullmatch(r"-?\d+", op.args[0]):
        return int(op.args[0])
    if op.opcode in ("convert", "copy", "bitcast") and op.args:
        return _constant(ops, op.args[0])
    return None


def _counter_index(ops: dict[str, _Op], name: str) -> int | None:
    """The tuple index of the loop parameter ``name`` reads (``get-tuple-element(param), index=i``), or None."""
    op = ops.get(name)
    if op is None or op.opcode != "get-tuple-element":
        return None
    m = re.search(r"index=(\d+)", op.attrs)
    return int(m.group(1)) if m else None


def _attr(op: _Op, key: str) -> str | None:
    m = re.search(r"(?:^|[\s,])" + re.escape(key) + r"=([\w.\-]+)", op.attrs)
    return m.group(1) if m else None


def static_trip_count(comps: dict[str, dict[str, _Op]], roots: dict[str, str], caller: str,
                      loop: _Op) -> int | None:
    """The trip count of an unoptimised ``while`` of the form ``i = K; while i < C`` (``C > i`` alike), else None."""
    cond = _attr(loop, "condition")
    if cond not in comps or not loop.args:
        return None
    ops = comps[cond]
    root = ops.get(roots.get(cond, ""))
    if root is None or root.opcode != "compare" or len(root.args) != 2:
        return None
    direction = _attr(root, "direction")
    lhs, rhs = root.args
    if direction == "LT":
        index, limit = _counter_index(ops, lhs), _constant(ops, rhs)
    elif direction == "GT":
        index, limit = _counter_index(ops, rhs), _constant(ops, lhs)
    else:
        return None
    init = comps[caller].get(loop.args[0])
    if index is None or limit is None or init is None or init.opcode != "tuple" or index >= len(init.args):
        return None
    start = _constant(comps[caller], init.args[index])
    return None if start is None else max(limit - start, 0)


def source_trip_counts(unoptimized_hlo: str) -> dict[str, int | None]:
    """Loop body computation name -> trip count (None: data-dependent) of every ``while`` in the unoptimised HLO."""
    comps, roots = _parse_short(unoptimized_hlo)
    out: dict[str, int | None] = {}
    for caller, ops in comps.items():
        for op in ops.values():
            if op.opcode == "while":
                out[_attr(op, "body") or ""] = static_trip_count(comps, roots, caller, op)
    return out


@dataclasses.dataclass(frozen=True)
class LoopTrips:
    name: str  # the compiled while
    op_name: str
    source_body: str  # its body in the unoptimised HLO ('' when unmatched)
    trips: int | None  # None: data-dependent
    assumed: int  # what the estimate charges


def with_trip_counts(compiled: HloProgram, unoptimized_hlo: str,
                     dynamic_trips: int) -> tuple[HloProgram, list[LoopTrips]]:
    """A copy of ``compiled`` whose ``while`` loops carry the trip counts of their source loops (XLA's
    ``known_trip_count``), and the loops with what was recovered. A loop left data-dependent keeps no count (the
    estimate then charges ``dynamic_trips``)."""
    trips = source_trip_counts(unoptimized_hlo)
    program = HloProgram.__new__(HloProgram)
    program.__dict__.update(compiled.__dict__)
    program.computations = {c: list(instrs) for c, instrs in compiled.computations.items()}
    loops: list[LoopTrips] = []
    for comp, instrs in program.computations.items():
        for idx, i in enumerate(instrs):
            if i.opcode != "while":
                continue
            body = i.attr("body") or ""
            m = _REGION.search(body)
            source = next((b for b in trips if m and _REGION.search(b) and _REGION.search(b).group(0) == m.group(0)),
                          "")
            n = i.trip_count if i.trip_count is not None else trips.get(source)
            if n is not None and i.trip_count is None:
                instrs[idx] = dataclasses.replace(i, attrs=_set_trip_count(i.attrs, n))
            op = re.search(r'op_name="([^"]*)"', i.attrs)
            loops.append(LoopTrips(i.name, op.group(1) if op else "", source, n,
                                   n if n is not None else dynamic_trips))
    return program, loops


def _set_trip_count(attrs: str, n: int) -> str:
    entry = {"known_trip_count": {"n": str(n)}}
    m = re.search(r"backend_config=(\{)", attrs)
    if not m:
        return attrs + ", backend_config=" + json.dumps(entry)
    from tidar_jax.analysis.hlo import _balanced

    end = _balanced(attrs, m.start(1))
    try:
        config = json.loads(attrs[m.start(1):end])
    except json.JSONDecodeError:
        return attrs
    config.update(entry)
    return attrs[:m.start(1)] + json.dumps(config) + attrs[end:]


_ARRAY_WITH_LAYOUT = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]\{([^}]*)\}")


def _vmem_bytes(type_str: str) -> float:
    """Bytes of the arrays of an HLO type that live in VMEM (memory space 1)."""
    return sum(type_bytes(f"{dt}[{dims}]") for dt, dims, layout in _ARRAY_WITH_LAYOUT.findall(type_str)
               if "S(1)" in layout)


def _async_result_type(type_str: str) -> str:
    """The produced value of an async start's ``((operands), result, context)`` tuple type."""
    from tidar_jax.analysis.hlo import _balanced

    inner = type_str.strip()[1:-1] if type_str.strip().startswith("(") else type_str
    if inner.startswith("("):
        inner = inner[_balanced(inner, 0):].lstrip(", ")
    depth, end = 0, len(inner)
    for j, c in enumerate(inner):  # the first element after the operand tuple
        depth += c in "([{"
        depth -= c in ")]}"
        if c == "," and depth == 0:
            end = j
            break
    return inner[:end]


def _param_index(name: str) -> int | None:
    m = re.match(r"param_(\d+)", name)  # XLA names a fusion's parameters param_<index>.<id>
    return int(m.group(1)) if m else None


def _nested_read(program: HloProgram, comp: str, name: str, depth: int = 0) -> float | None:
    """Bytes of value ``name`` of computation ``comp`` read when every use hands it to a nested fusion that only
    slices it (recursively), else None."""
    from tidar_jax.analysis.cost_model import _read_through, _users

    uses = _users(program, comp).get(name, [])
    if not uses or depth > 3:
        return None
    total = 0.0
    for u in uses:
        inner = u.attr("calls") or ""
        if u.opcode != "fusion" or inner not in program.computations:
            return None
        index = u.operands.index(name)
        param = next((i for i in program.instructions(inner)
                      if i.opcode == "parameter" and _param_index(i.name) == index), None)
        if param is None:
            return None
        part = _read_through(program, param.name, _users(program, inner))
        if part is None:
            part = _nested_read(program, inner, param.name, depth + 1)
        if part is None:
            return None
        total += part
    return total


def _nested_overcount(program: HloProgram, instr) -> float:
    """Bytes the cost model charges a fusion for operands that its nested fusions only slice."""
    from tidar_jax.analysis.cost_model import _read_through, _users

    comp = instr.attr("calls") or ""
    if instr.opcode != "fusion" or comp not in program.computations:
        return 0.0
    users = _users(program, comp)
    over = 0.0
    for p in program.instructions(comp):
        if p.opcode != "parameter" or _read_through(program, p.name, users) is not None:
            continue
        nested = _nested_read(program, comp, p.name)
        if nested is not None:
            over += max(type_bytes(p.type_str) - nested, 0.0)
    return over


def hbm_corrected(est, program: HloProgram, chip: Chip):
    """``est`` with each kernel's bytes counting HBM traffic only (module docstring) and its time recomputed."""
    instrs = {i.name: i for comp in program.computations.values() for i in comp}
    kernels = []
    for k in est.kernels:
        i = instrs.get(k.name)
        if i is None or k.bound == "collective":
            kernels.append(k)
            continue
        read, written = k.bytes_read, k.bytes_written
        if i.opcode.endswith("-start") and i.opcode.removesuffix("-start") not in COLLECTIVES:
            read, written = type_bytes(_async_result_type(i.type_str)), 0.0
        else:
            read -= _nested_overcount(program, i)
            read = max(read - sum(_vmem_bytes(t) for t in program.operand_types(i)), 0.0)
            written = max(written - _vmem_bytes(i.type_str), 0.0)
        compute = k.flops / chip_costs(chip).peak_bf16_flops
        memory = (read + written) / chip.hbm_bytes_per_s
        work = max(compute, memory)
        launch = est.assumptions.launch_s
        bound = "launch" if work < launch else ("compute" if compute >= memory else "memory")
        kernels.append(dataclasses.replace(k, bytes_read=read, bytes_written=written, time_s=work + launch,
                                           bound=bound))
    return dataclasses.replace(est, kernels=kernels)


@dataclasses.dataclass
class TpuTime:
    chip: str
    ceiling_s: float
    expected_s: float
    launches: int
    loops: list[LoopTrips]
    assumptions_line: str
    ceiling_by_class: dict = dataclasses.field(default_factory=dict)  # kernel class -> seconds (analysis.efficiency)
    expected_by_class: dict = dataclasses.field(default_factory=dict)
    flops: float = 0.0

    def summary(self) -> dict:
        return {"chip": self.chip, "ceiling_s": self.ceiling_s, "expected_s": self.expected_s,
                "launches": self.launches, "assumptions_line": self.assumptions_line,
                "loops": [dataclasses.asdict(lp) for lp in self.loops], "flops": self.flops,
                "ceiling_by_class_s": self.ceiling_by_class, "expected_by_class_s": self.expected_by_class}


def tpu_time(compiled: HloProgram, unoptimized_hlo: str, chip: Chip, dynamic_trips: int = 1,
             live_cache_slots: int | None = None) -> TpuTime:
    """One run of a program compiled for ``chip`` (a TPU): ceiling and expected seconds, no host round trips."""
    if chip.platform != "tpu":
        raise ValueError(f"tpu_time: chip {chip.name!r} is a {chip.platform}; allowed: a TPU chip")
    program, loops = with_trip_counts(compiled, unoptimized_hlo, dynamic_trips)
    est = hbm_corrected(estimate(program, chip, dynamic_trips, graph=False, live_cache_slots=live_cache_slots),
                        program, chip)
    est.host_round_trips = 0  # on-device loops: no predicate goes to the host
    exp = expected(est, chip, graph=False)
    line = (est.assumptions.line().replace(f", host round trip {chip_costs(chip).host_round_trip_s * 1e6:.0f} us", "")
            + "; VMEM buffers are not HBM traffic").replace("(eager stream launches)", "(per op of one TPU program)")
    return TpuTime(chip.name, exp.ceiling_s, exp.expected_s, est.launches, loops,
                   line + "; loops run on the device (no host round trips)", exp.ceiling_by_class,
                   exp.expected_by_class, est.flops)


__all__ = ["LoopTrips", "hbm_corrected", "TPU_PEAK_SOURCES", "TpuTime", "source_trip_counts", "static_trip_count",
           "tpu_time",
           "with_trip_counts"]

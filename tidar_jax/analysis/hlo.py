"""Read the optimized, scheduled HLO of a compiled program (``compiled.as_text()``): its kernels, its ``while``
loops with their trip counts, and the host round trips a data-dependent loop costs on a GPU.

Why a reader of our own: XLA exposes no structured view of the compiled (post-fusion) module through jax, and
``cost_analysis()`` returns None for a deviceless GPU compile; the text form is stable across jax 0.10/0.11.

What counts as a kernel (one launch on XLA:GPU): ``fusion``, ``custom-call`` (cuBLAS/cuDNN/Triton/Pallas), a
``copy`` XLA did not elide, collectives (an async ``-start``/``-done`` pair is one), ``sort``, sends/receives and
any other op that is not pure bookkeeping (parameters, tuples, bitcasts, constants, control flow).
A ``while`` whose backend_config carries ``known_trip_count`` runs that many times; one without it has a
data-dependent trip count, and XLA:GPU copies its predicate to the host on every iteration (one round trip each).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

# Ops that launch nothing: bookkeeping, control flow (its bodies' kernels are counted instead), async '-done' halves.
_NOT_KERNELS = frozenset({
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call", "after-all",
    "opt-barrier", "add-dependency", "domain", "partition-id", "replica-id", "iota",
})
COLLECTIVES = frozenset({"all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
                         "collective-broadcast", "ragged-all-to-all"})

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16, "token": 0}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")


def array_shapes(type_str: str) -> list[tuple[str, tuple[int, ...]]]:
    """``(dtype, dims)`` of every array in an HLO type (a tuple type lists several)."""
    return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY.findall(type_str)
            if dt in _DTYPE_BYTES]


def type_bytes(type_str: str) -> float:
    """Bytes of an HLO type (sum over a tuple's arrays)."""
    return float(sum(_DTYPE_BYTES[dt] * math.prod(dims) for dt, dims in array_shapes(type_str)))


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group opening at ``text[start]``."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack = [pairs[text[start]]]
    i = start + 1
    in_str = False
    while i < len(text) and stack:
        c = text[i]
        if in_str:
            if c == "\\":
                i += 1
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in pairs:
            stack.append(pairs[c])
        elif c == stack[-1]:
            stack.pop()
        i += 1
    return i


@dataclasses.dataclass
class Instruction:
    name: str
    opcode: str
    type_str: str  # the result type
    operands: list[str]  # operand instruction names
    attrs: str  # everything after the operand list
    computation: str  # the computation this instruction is in

    def attr(self, key: str) -> str | None:
        """The value of ``key=...`` (a %name, a word, a quoted string or a bracketed group), or None."""
        m = re.search(r"(?:^|[\s,])" + re.escape(key) + r"=", self.attrs)
        if not m:
            return None
        i = m.end()
        if i < len(self.attrs) and self.attrs[i] in "{([":
            return self.attrs[i:_balanced(self.attrs, i)]
        if i < len(self.attrs) and self.attrs[i] == '"':
            j = self.attrs.index('"', i + 1)
            return self.attrs[i + 1:j]
        m2 = re.match(r"[^,\s]+", self.attrs[i:])
        return m2.group(0).lstrip("%") if m2 else None

    @property
    def called(self) -> list[str]:
        """Computations this instruction calls (fusion bodies, loop body/condition, branches, reducers)."""
        out = []
        for key in ("calls", "body", "condition", "to_apply"):
            v = self.attr(key)
            if v:
                out += [x.strip().lstrip("%") for x in v.strip("{}").split(",") if x.strip()]
        v = self.attr("branch_computations")
        if v:
            out += [x.strip().lstrip("%") for x in v.strip("{}").split(",") if x.strip()]
        return out

    @property
    def backend_config(self) -> dict:
        raw = self.attr("backend_config")
        if not raw or not raw.startswith("{"):
            return {}
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return {}

    @property
    def is_kernel(self) -> bool:
        return self.opcode not in _NOT_KERNELS and not self.opcode.endswith("-done")

    @property
    def trip_count(self) -> int | None:
        """A ``while``'s trip count when XLA knows it, else None (data-dependent)."""
        n = self.backend_config.get("known_trip_count", {}).get("n")
        return int(n) if n is not None else None

    @property
    def kind(self) -> str:
        """A short label: the fusion kind or the custom-call target (what the kernel is), else the opcode."""
        if self.opcode == "fusion":
            fb = self.backend_config.get("fusion_backend_config", {}).get("kind")
            return f"fusion:{fb or self.attr('kind') or '?'}"
        if self.opcode == "custom-call":
            return f"custom-call:{self.attr('custom_call_target')}"
        return self.opcode


@dataclasses.dataclass
class Loop:
    """One ``while`` of the program with what one iteration launches."""
    name: str
    computation: str  # where the while sits
    trip_count: int | None  # None: data-dependent
    body_kernels: list[Instruction]  # kernels of one iteration (body + condition, nested loops' kernels once)
    op_name: str  # the jax source op that made it (metadata), for people reading the report

    @property
    def dynamic(self) -> bool:
        return self.trip_count is None


class HloProgram:
    """The optimized HLO of one compiled program."""

    def __init__(self, text: str):
        self.text = text
        self.computations: dict[str, list[Instruction]] = {}
        self.entry = ""
        self.types: dict[str, str] = {}
        self.roots: dict[str, str] = {}  # computation -> its ROOT instruction's name
        current = None
        for line in text.splitlines():
            h = _HEADER.match(line)
            if h:
                current = h.group(2)
                self.computations[current] = []
                if h.group(1):
                    self.entry = current
                continue
            if current is None:
                continue
            if line.strip() == "}":
                current = None
                continue
            m = _INSTR.match(line)
            if m:
                instr = _parse_instruction(m.group(2), m.group(3), current)
                if instr is not None:
                    self.computations[current].append(instr)
                    self.types[instr.name] = instr.type_str
                    if m.group(1):
                        self.roots[current] = instr.name
        if not self.entry:
            raise ValueError("not an HLO module text: no ENTRY computation")

    @classmethod
    def of(cls, compiled) -> "HloProgram":
        text = compiled.as_text()
        return cls(text if isinstance(text, str) else text[0])

    def instructions(self, computation: str | None = None) -> list[Instruction]:
        return self.computations[computation or self.entry]

    def kernels(self, computation: str | None = None) -> list[Instruction]:
        """Kernels launched once by ``computation`` itself (default: the entry), not counting loop bodies or
        branches (see ``loops``) and not looking inside fusions (one fusion = one kernel)."""
        return [i for i in self.instructions(computation) if i.is_kernel]

    def _iteration_kernels(self, loop: Instruction) -> list[Instruction]:
        body, cond = loop.attr("body"), loop.attr("condition")
        out = []
        for comp in (body, cond):
            out += self.kernels(comp)
            for inner in self.instructions(comp):
                if inner.opcode == "while":
                    out += self._iteration_kernels(inner)
                elif inner.opcode in ("conditional", "call"):
                    for c in inner.called:
                        out += self.kernels(c)
        return out

    def loops(self) -> list[Loop]:
        """Every ``while`` reachable from the entry (nested ones too), outermost first."""
        out = []
        seen = set()

        def visit(comp):
            if comp in seen or comp not in self.computations:
                return
            seen.add(comp)
            for i in self.instructions(comp):
                if i.opcode == "while":
                    out.append(Loop(i.name, comp, i.trip_count, self._iteration_kernels(i),
                                    _op_name(i)))
                if i.opcode in ("while", "conditional", "call"):
                    for c in i.called:
                        visit(c)
        visit(self.entry)
        return out

    def launches(self, dynamic_trips: int = 1) -> int:
        """Kernel launches of one run: the entry's kernels plus every loop's iteration kernels times its trip
        count (nested trip counts multiply); a data-dependent loop counts ``dynamic_trips`` iterations."""
        return self._launches(self.entry, dynamic_trips)

    def _launches(self, comp: str, dynamic_trips: int) -> int:
        total = len(self.kernels(comp))
        for i in self.instructions(comp):
            if i.opcode == "while":
                trips = i.trip_count if i.trip_count is not None else dynamic_trips
                per_iter = self._launches(i.attr("body"), dynamic_trips) + self._launches(i.attr("condition"),
                                                                                          dynamic_trips)
                total += trips * per_iter
            elif i.opcode in ("conditional", "call"):
                total += max((self._launches(c, dynamic_trips) for c in i.called), default=0)
        return total

    def host_round_trips(self, dynamic_trips: int = 1) -> int:
        """Device-to-host round trips of one run on XLA:GPU: one per iteration of every data-dependent loop (its
        predicate), ``dynamic_trips`` iterations assumed each, multiplied by enclosing loops' trips, plus explicit
        host transfers (host callbacks, outfeed, host send/recv)."""
        return self._round_trips(self.entry, dynamic_trips, 1)

    def _round_trips(self, comp: str, dynamic_trips: int, outer: int) -> int:
        total = 0
        for i in self.instructions(comp):
            if i.opcode in ("outfeed", "infeed") or (i.opcode in ("send", "recv") and "is_host_transfer=true" in i.attrs) \
                    or (i.opcode == "custom-call" and "callback" in (i.attr("custom_call_target") or "")):
                total += outer
            if i.opcode == "while":
                trips = i.trip_count if i.trip_count is not None else dynamic_trips
                if i.trip_count is None:
                    total += outer * (trips + 1)  # the predicate of each iteration and of the exit test
                for c in (i.attr("body"), i.attr("condition")):
                    total += self._round_trips(c, dynamic_trips, outer * trips)
            elif i.opcode in ("conditional", "call"):
                for c in i.called:
                    total += self._round_trips(c, dynamic_trips, outer)
        return total

    def operand_types(self, instr: Instruction) -> list[str]:
        return [self.types.get(o, "") for o in instr.operands]


def _op_name(instr: Instruction) -> str:
    m = re.search(r'op_name="([^"]*)"', instr.attrs)
    return m.group(1) if m else ""


def _parse_instruction(name: str, rest: str, computation: str) -> Instruction | None:
    rest = rest.strip()
    if rest.startswith("("):
        end = _balanced(rest, 0)
        type_str, rest = rest[:end], rest[end:].lstrip()
    else:
        sp = rest.find(" ")
        if sp < 0:
            return None
        type_str, rest = rest[:sp], rest[sp + 1:].lstrip()
    m = re.match(r"([a-z][\w\-]*)\(", rest)
    if not m:
        return None
    opcode = m.group(1)
    end = _balanced(rest, m.end() - 1)
    operand_text = rest[m.end():end - 1]
    operands = re.findall(r"%([\w.\-]+)", operand_text)
    attrs = rest[end:].lstrip(", ")
    return Instruction(name, opcode, type_str, operands, attrs, computation)


__all__ = ["COLLECTIVES", "HloProgram", "Instruction", "Loop", "array_shapes", "type_bytes"]

"""XLA's own GPU cost model beside ours, per kernel and per step.

Compiled with ``compiler_options={COLLECT_OPTION: True}`` (``xla_gpu_collect_cost_model_stats``, an XLA:GPU debug
option that jaxlib 0.10 accepts on a deviceless H100 compile), XLA:GPU writes into each fusion's backend_config a
``reification_cost`` list: one record per cost model it ran (``exec_time_us``, ``compute_time_us``,
``memory_access_time_us``). The record with the empty name is the GpuPerformanceModel estimate XLA itself used for
that fusion; others (``indexing-cost-model``, ``experimental-gemm-cost-model``, ``sol``) are alternatives it also
ran. XLA's figure excludes the kernel launch (its model adds a 1 us launch only when comparing fusion choices), so
it is compared with our kernel's roofline work (``time_s`` less its launch). Kernels XLA does not cost (custom
calls: Pallas/Triton kernels, cuBLAS, cuDNN; copies) are counted and listed, not compared.

``program_text`` is the compiled ``as_text()`` of such a compile (``compile_options()`` gives the option).
"""

from __future__ import annotations

import dataclasses

from tidar_jax.analysis.cost_model import estimate as ceiling_estimate
from tidar_jax.analysis.hlo import HloProgram, Instruction
from tidar_jax.targets import Chip

COLLECT_OPTION = "xla_gpu_collect_cost_model_stats"
XLA_MODEL = ""  # the record name of the model XLA:GPU used (GpuPerformanceModel)


def compile_options() -> dict:
    """The XLA options that make a GPU compile record its cost model's figures per fusion."""
    return {COLLECT_OPTION: True}


@dataclasses.dataclass(frozen=True)
class XlaCost:
    """XLA:GPU's estimate of one kernel (seconds, launch excluded) and its other models' figures."""

    exec_s: float
    compute_s: float
    memory_s: float
    other_models: dict  # model name -> exec seconds


def xla_cost(instr: Instruction) -> XlaCost | None:
    """The ``reification_cost`` XLA recorded for ``instr``, or None (none recorded, or an empty list)."""
    records = instr.backend_config.get("reification_cost") or []
    used = next((r for r in records if r.get("name", "") == XLA_MODEL), None)
    if used is None:
        return None
    others = {r["name"]: float(r.get("exec_time_us", 0.0)) * 1e-6 for r in records if r.get("name")}
    return XlaCost(float(used.get("exec_time_us", 0.0)) * 1e-6, float(used.get("compute_time_us", 0.0)) * 1e-6,
                   float(used.get("memory_access_time_us", 0.0)) * 1e-6, others)


@dataclasses.dataclass
class KernelRow:
    name: str
    kind: str
    runs: int
    ours_s: float  # our roofline work of one launch, launch excluded
    xla_s: float | None  # XLA's exec time of one launch; None: XLA does not cost this kernel
    bound: str  # ours: compute | memory | launch | collective
    xla_other_s: dict = dataclasses.field(default_factory=dict)  # XLA's other models: name -> exec seconds

    @property
    def ratio(self) -> float | None:
        return self.xla_s / self.ours_s if self.xla_s is not None and self.ours_s > 0 else None


@dataclasses.dataclass
class Comparison:
    rows: list[KernelRow]
    launch_s: float  # our launch cost per kernel in this comparison

    @property
    def covered(self) -> list[KernelRow]:
        return [r for r in self.rows if r.xla_s is not None]

    @property
    def uncovered(self) -> list[KernelRow]:
        return [r for r in self.rows if r.xla_s is None]

    def totals(self) -> dict:
        """Per step, over the kernels XLA covers: its figure, ours (work only, and with our launch cost added to
        both), and what XLA does not cover."""
        cov = self.covered
        xla = sum(r.xla_s * r.runs for r in cov)
        ours = sum(r.ours_s * r.runs for r in cov)
        launches = sum(r.runs for r in cov)
        uncovered_kinds: dict[str, int] = {}
        for r in self.uncovered:
            uncovered_kinds[r.kind] = uncovered_kinds.get(r.kind, 0) + r.runs
        return {"covered_kernels": len(cov), "covered_launches": launches, "xla_s": xla, "ours_s": ours,
                "xla_with_launch_s": xla + launches * self.launch_s,
                "ours_with_launch_s": ours + launches * self.launch_s,
                "xla_over_ours": xla / ours if ours else None,
                "uncovered_launches": sum(r.runs for r in self.uncovered), "uncovered_kinds": uncovered_kinds,
                "uncovered_ours_s": sum(r.ours_s * r.runs for r in self.uncovered),
                "xla_other_models_s": self._other_models()}

    def _other_models(self) -> dict:
        """Per alternative XLA model, its step total over the covered kernels; a kernel it did not cost counts at
        the figure XLA used."""
        names = sorted({m for r in self.covered for m in r.xla_other_s if m != "sol"})
        return {m: sum(r.xla_other_s.get(m, r.xla_s) * r.runs for r in self.covered) for m in names}

    def largest_disagreements(self, n: int = 10) -> list[KernelRow]:
        """Covered kernels by the time they disagree on (runs counted)."""
        return sorted(self.covered, key=lambda r: -abs(r.xla_s - r.ours_s) * r.runs)[:n]


def compare(program: HloProgram, chip: Chip, dynamic_trips: int = 1, graph: bool = True,
            live_cache_slots: int | None = None) -> Comparison:
    """Our estimate of ``program`` (compiled with ``compile_options()``) beside XLA's, kernel by kernel. Loop
    bodies count once per iteration in both (the same ``runs``)."""
    ours = ceiling_estimate(program, chip, dynamic_trips, graph, live_cache_slots)
    by_name = {}
    for comp in program.computations:
        for i in program.instructions(comp):
            if i.is_kernel:
                by_name[i.name] = i
    launch = ours.assumptions.launch_s
    rows = []
    for k in ours.kernels:
        instr = by_name.get(k.name)
        x = xla_cost(instr) if instr is not None else None
        rows.append(KernelRow(k.name, k.kind, k.runs, max(k.time_s - launch, 0.0), x.exec_s if x else None, k.bound,
                              x.other_models if x else {}))
    return Comparison(rows, launch)


def format_comparison(c: Comparison, top: int = 8) -> str:
    t = c.totals()
    lines = [f"XLA:GPU cost model vs ours over the {t['covered_kernels']} kernels XLA costs ({t['covered_launches']} "
             f"launches): XLA {t['xla_s'] * 1e3:.4f} ms, ours {t['ours_s'] * 1e3:.4f} ms (launch excluded; "
             f"x{t['xla_over_ours'] or 0:.2f}); with {c.launch_s * 1e6:.1f} us per launch: XLA "
             f"{t['xla_with_launch_s'] * 1e3:.4f} ms, ours {t['ours_with_launch_s'] * 1e3:.4f} ms. Not costed by XLA: "
             f"{t['uncovered_launches']} launches {t['uncovered_kinds']} (ours {t['uncovered_ours_s'] * 1e3:.4f} ms). "
             f"XLA's other "
             f"models: " + ", ".join(f"{m} {v * 1e3:.4f} ms" for m, v in t["xla_other_models_s"].items())]
    for r in c.largest_disagreements(top):
        lines.append(f"  {r.name:<40} {r.kind:<36} x{r.runs:<4} ours {r.ours_s * 1e6:9.3f} us  xla "
                     f"{r.xla_s * 1e6:9.3f} us  ({r.bound})")
    return "\n".join(lines)


__all__ = ["COLLECT_OPTION", "Comparison", "KernelRow", "XlaCost", "compare", "compile_options",
           "format_comparison", "xla_cost"]

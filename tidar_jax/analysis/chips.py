"""What a program costs on each chip of ``tidar_jax.targets.CHIPS``: the figures the cost model divides by.

Rates are dense (no sparsity), per chip, from the vendor datasheets; HBM bandwidth is the chip's own
(``targets.Chip.hbm_bytes_per_s``, which XLA's target description also reads). ``launch_s``,
``host_round_trip_s`` and the interconnect rate are assumptions of the cost model, printed beside every estimate:

* launch: 4 us per kernel is the usual launch-plus-dependency gap of XLA:GPU without CUDA graphs on Hopper; TPUs
  run a whole program per launch, so per-op overhead is a small fraction of a microsecond (assumed 0.5 us);
* host round trip (a device->host copy of a loop predicate, a stream sync and the next launch): assumed 20 us;
* interconnect: one direction per chip (NVLink / ICI datasheet figures), for the collectives' ring traffic.
"""

from __future__ import annotations

import dataclasses

from tidar_jax.targets import CHIPS, Chip


@dataclasses.dataclass(frozen=True)
class ChipCosts:
    name: str
    peak_bf16_flops: float
    peak_fp32_flops: float  # f32 dots: TF32 tensor cores on NVIDIA (XLA's default precision), the MXU on TPU
    hbm_bytes_per_s: float
    launch_s: float  # per kernel: launch plus the gap between dependent kernels (no CUDA graph)
    host_round_trip_s: float  # one device->host copy of a loop predicate and the host's decision
    interconnect_bytes_per_s: float


_GPU = dict(launch_s=4e-6, host_round_trip_s=20e-6)
_TPU = dict(launch_s=0.5e-6, host_round_trip_s=20e-6)
# name -> (bf16 peak, f32 dot peak, interconnect one direction, launch/round-trip assumptions)
_RATES = {
    "h100": (989.4e12, 494.7e12, 450e9, _GPU),
    "h200": (989.4e12, 494.7e12, 450e9, _GPU),
    "a100": (312e12, 156e12, 300e9, _GPU),
    "b200": (2.25e15, 1.1e15, 900e9, _GPU),
    "v5e": (197e12, 197e12, 200e9, _TPU),
    "v5p": (459e12, 459e12, 600e9, _TPU),
    "v6e": (918e12, 918e12, 400e9, _TPU),
}

COSTS: dict[str, ChipCosts] = {
    name: ChipCosts(name, bf16, f32, CHIPS[name].hbm_bytes_per_s, interconnect_bytes_per_s=link, **assumed)
    for name, (bf16, f32, link, assumed) in _RATES.items()}


def chip_costs(chip: Chip | str) -> ChipCosts:
    """The cost figures of ``chip`` (a ``targets.Chip`` or its name)."""
    return COSTS[chip if isinstance(chip, str) else chip.name]


__all__ = ["COSTS", "ChipCosts", "chip_costs"]

"""Per-device hardware numbers for the planner's roofline, each with its source.

One table, so every estimate jaxmp prints can be traced to a datasheet. ``peak_flops`` is what a
float32 (or bfloat16) matmul reaches at JAX's DEFAULT precision, which trades accuracy for speed:
TF32 tensor cores on recent NVIDIA GPUs, one bfloat16 pass on TPU (JAX's "Matmul precision" page).
Dense figures, not the "with sparsity" ones datasheets headline. ``link_bandwidth`` is the bandwidth
one device has to send to its peers in one direction; a collective over one mesh axis may get less.
"""

from __future__ import annotations

from typing import NamedTuple

from jaxmp.config import ConfigError

GIB = 2**30


class Hardware(NamedTuple):
    """One accelerator (or a simulated CPU device): the numbers of the roofline and where they come from."""

    name: str
    peak_flops: dict[str, float]  # dtype name -> FLOP/s of dense matmuls at DEFAULT precision
    memory_bytes: int  # HBM per device
    memory_bandwidth: float  # HBM bytes/s
    link_bandwidth: float  # interconnect bytes/s, one direction, per device
    source: str

    def flops_for(self, dtype: str) -> float:
        """Peak FLOP/s for matmuls in ``dtype`` (float32 when the dtype is not in the table)."""
        return self.peak_flops.get(dtype, self.peak_flops["float32"])


HARDWARE: dict[str, Hardware] = {
    "cpu": Hardware(
        name="cpu",
        peak_flops={"float32": 2.0e11, "bfloat16": 2.0e11},
        memory_bytes=16 * GIB,
        memory_bandwidth=5.0e10,
        link_bandwidth=1.0e10,
        source=(
            "rough laptop-class estimate, not a datasheet: ~8 cores x AVX2 FMA at ~3 GHz reach a few hundred "
            "GFLOP/s f32; dual-channel DDR5 ~50 GB/s; simulated devices exchange data by memcpy on one host "
            "(~10 GB/s) and share its cores, so absolute times are indicative only"
        ),
    ),
    "h100": Hardware(
        name="h100",
        peak_flops={"float32": 494.7e12, "bfloat16": 989.4e12},
        memory_bytes=80 * 10**9,
        memory_bandwidth=3.35e12,
        link_bandwidth=450e9,
        source=(
            "NVIDIA H100 Tensor Core GPU datasheet, SXM5: TF32 989 / BF16 1,979 TFLOPS with sparsity (dense: "
            "half), 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s (both directions; 450 GB/s each way)"
        ),
    ),
    "h200": Hardware(
        name="h200",
        peak_flops={"float32": 494.7e12, "bfloat16": 989.4e12},
        memory_bytes=141 * 10**9,
        memory_bandwidth=4.8e12,
        link_bandwidth=450e9,
        source=(
            "NVIDIA H200 Tensor Core GPU datasheet, SXM: TF32 989 / BF16 1,979 TFLOPS with sparsity (dense: "
            "half), 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s (both directions; 450 GB/s each way)"
        ),
    ),
    "tpu-v5p": Hardware(
        name="tpu-v5p",
        peak_flops={"float32": 459e12, "bfloat16": 459e12},
        memory_bytes=95 * 10**9,
        memory_bandwidth=2.765e12,
        link_bandwidth=600e9,
        source=(
            "Google Cloud TPU v5p documentation (system architecture): 459 TFLOPS bf16 per chip (f32 matmuls run "
            "as one bf16 pass at DEFAULT precision), 95 GB HBM2e at 2,765 GB/s, ICI 4,800 Gbps per chip "
            "(600 GB/s, all links together: optimistic for one mesh axis)"
        ),
    ),
}


def get_hardware(name: str, memory_gib: float | None = None) -> Hardware:
    """The table entry ``name``, with its memory replaced by ``memory_gib`` GiB if given.

    Raises:
      ConfigError: unknown name, or a memory that is not positive.
    """
    if name not in HARDWARE:
        raise ConfigError(f"--hardware {name!r} is not one of {', '.join(HARDWARE)}.")
    hardware = HARDWARE[name]
    if memory_gib is None:
        return hardware
    if not memory_gib > 0:
        raise ConfigError(f"--memory-gib must be positive, got {memory_gib}.")
    return hardware._replace(memory_bytes=int(memory_gib * GIB))

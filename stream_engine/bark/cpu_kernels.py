"""CPU kernels for decode steps: built from ``csrc/decode_cpu.cpp`` on first use.

A decode step multiplies a handful of rows by every weight of the semantic or coarse model, so
on a CPU its speed is how fast the weights stream from memory. MKL's matrix-vector product
(``F.linear``) reads them at about half this machine's bandwidth, oneDNN with a packed weight at
about three quarters; the AVX2 kernel here, which reads each weight row once and dots it with
every input row, comes close to the full bandwidth (``benchmarks/linear_kernels.py``). It
applies the MLP's GELU on the way out. The same build has the step's attention: one query per
slot over that slot's keys only, with the cache write, in place of sdpa with a mask and a few
indexing ops.

The kernel is compiled by torch's ``cpp_extension`` (a C++ compiler and ninja are needed) into
torch's extension cache, once per machine and source version; it runs on torch's own thread
pool. :func:`resolve` picks the kernels an engine uses for ``EngineConfig.cpu_decode_kernel``:

* ``"avx2"``: these kernels; an error if they cannot be built here.
* ``"onednn"``: oneDNN with a packed copy of each weight (more memory).
* ``"mkl"``: plain ``F.linear``.
* ``"auto"``: ``avx2`` where the CPU has AVX2 and the build succeeds, else ``onednn`` where
  torch has it, else ``mkl``. A failed build is logged, not raised.

All agree with ``F.linear`` and sdpa to float rounding.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from torch import Tensor

from ..config import CPU_DECODE_KERNELS
from ..errors import InvalidOption, ModelLoadError
from .model import DecodeKernels, can_pack

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "decode_cpu.cpp"


def cpu_has_avx2() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512", "AVX512_BF16", "AMX")


@functools.cache
def build() -> tuple[DecodeKernels | None, str]:
    """Compile (or load from torch's cache) the AVX2 kernels: ``(module, "")`` or ``(None, why)``.

    Tried once per process.
    """
    if not cpu_has_avx2():
        return (
            None,
            f"the CPU has no AVX2 (torch reports {torch.backends.cpu.get_cpu_capability()})",
        )
    try:
        from torch.utils.cpp_extension import load

        module = load(
            name="stream_engine_decode_cpu",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, a compile error: all mean "not here"
        lines = str(exc).strip().splitlines()
        return None, f"{type(exc).__name__}: {lines[-1] if lines else repr(exc)}"
    return module, ""


def resolve(choice: str, weight: Tensor) -> tuple[str, DecodeKernels | None]:
    """The kernel an engine's decode steps use for ``weight``'s dtype and device.

    Returns its name and, for ``"avx2"``, the kernels. On anything but a float32 CPU weight
    every choice resolves to ``"default"`` (the plain ``F.linear``; CUDA has its own paths).
    """
    if choice not in CPU_DECODE_KERNELS:
        raise InvalidOption(
            f"cpu_decode_kernel must be one of {CPU_DECODE_KERNELS}, got {choice!r}"
        )
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return "default", None
    if choice in ("auto", "avx2"):
        fn, why = build()
        if fn is not None:
            return "avx2", fn
        if choice == "avx2":
            raise ModelLoadError(f"cpu_decode_kernel='avx2' cannot be built here: {why}")
        log.warning("AVX2 decode kernel unavailable (%s); using oneDNN or MKL", why)
    if choice in ("auto", "onednn") and can_pack(weight):
        return "onednn", None
    if choice == "onednn":
        raise ModelLoadError("cpu_decode_kernel='onednn': this torch build has no oneDNN linear")
    return "mkl", None

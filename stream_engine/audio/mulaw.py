"""G.711 μ-law companding of 16-bit linear PCM, vectorised with numpy.

Bit-exact with the classic Sun/CCITT reference implementation (``g711.c``; the one Python's
``audioop.lin2ulaw`` uses): the 16-bit sample is shifted to 14 bits (arithmetic shift, so it
rounds towards minus infinity), its magnitude clipped to 8159 and biased by 33, and the code
is sign, 3-bit segment (exponent) and the 4 bits after the leading one, all bits inverted.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

_BIAS = 0x21  # 33, the bias at 14-bit scale (0x84 at 16-bit scale)
_CLIP = 8159  # largest magnitude at 14-bit scale before the bias
# the largest biased magnitude each of the 8 segments holds
_SEGMENT_ENDS = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF], np.int32)


def lin2ulaw(samples: npt.NDArray[np.int16]) -> npt.NDArray[np.uint8]:
    """μ-law code bytes of 16-bit linear samples (any shape; one byte per sample)."""
    v = np.asarray(samples, dtype=np.int16).astype(np.int32) >> 2  # 14-bit, floor
    negative = v < 0
    magnitude = np.minimum(np.abs(v), _CLIP) + _BIAS
    segment = np.searchsorted(_SEGMENT_ENDS, magnitude).astype(np.int32)  # 0..8
    mantissa = (magnitude >> (segment + 1)) & 0x0F
    # segment 8 (magnitudes clipped to 8159, biased to 8192) is out of range: the largest code
    code = np.where(segment < 8, (segment << 4) | mantissa, 0x7F)
    mask = np.where(negative, 0x7F, 0xFF)  # invert all bits; the sign bit only if positive
    return (code ^ mask).astype(np.uint8)


def ulaw2lin(codes: npt.NDArray[np.uint8]) -> npt.NDArray[np.int16]:
    """16-bit linear samples of μ-law code bytes (the standard expansion)."""
    u = ~np.asarray(codes, dtype=np.uint8).astype(np.int32) & 0xFF
    segment = (u >> 4) & 0x07
    magnitude = ((((u & 0x0F) << 3) + 0x84) << segment) - 0x84
    return np.where(u & 0x80, -magnitude, magnitude).astype(np.int16)

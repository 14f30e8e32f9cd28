"""The audio formats the server speaks and the sample rates each allows (protocol v1)."""

from __future__ import annotations

from ..errors import UnsupportedFormat

DEFAULT_FORMAT = "pcm_s16le"
DEFAULT_SAMPLE_RATE = 24_000

# format -> the output sample rates it may be encoded at
SAMPLE_RATES: dict[str, tuple[int, ...]] = {
    "pcm_s16le": (8_000, 16_000, 22_050, 24_000, 48_000),
    "pcm_f32le": (8_000, 16_000, 22_050, 24_000, 48_000),
    "mulaw": (8_000,),
    "opus": (8_000, 12_000, 16_000, 24_000, 48_000),
}
FORMATS = tuple(SAMPLE_RATES)


def check_format(fmt: object, sample_rate: object) -> tuple[str, int]:
    """Return ``(fmt, sample_rate)`` if the pair is supported, else raise UnsupportedFormat.

    ``sample_rate=None`` picks 24000 where the format allows it, else the format's only rate.
    """
    if not isinstance(fmt, str) or fmt not in SAMPLE_RATES:
        raise UnsupportedFormat(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    rates = SAMPLE_RATES[fmt]
    if sample_rate is None:
        return fmt, DEFAULT_SAMPLE_RATE if DEFAULT_SAMPLE_RATE in rates else rates[0]
    if (
        isinstance(sample_rate, bool)
        or not isinstance(sample_rate, int)
        or sample_rate not in rates
    ):
        raise UnsupportedFormat(f"{fmt} supports sample rates {list(rates)}, got {sample_rate!r}")
    return fmt, sample_rate

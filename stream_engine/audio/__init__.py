"""Audio for the wire: formats, resampling from the engine's 24 kHz, and per-stream encoders."""

from .encoders import AudioCount, Encoder
from .formats import DEFAULT_FORMAT, DEFAULT_SAMPLE_RATE, FORMATS, SAMPLE_RATES, check_format
from .resample import Resampler

__all__ = [
    "DEFAULT_FORMAT",
    "DEFAULT_SAMPLE_RATE",
    "FORMATS",
    "SAMPLE_RATES",
    "AudioCount",
    "Encoder",
    "Resampler",
    "check_format",
]

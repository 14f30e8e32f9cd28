"""Decoding the audio a client receives: PCM, μ-law and Opus payloads back to float samples.

The inverse of :mod:`.encoders`, for clients (``stream_engine.client``, the framework
integrations): each payload of a stream decodes on its own, except Opus, whose decoder keeps
state from packet to packet (one :class:`OpusDecoder` per stream).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ..errors import InvalidRequest
from .mulaw import ulaw2lin

OPUS_MAX_FRAME_MS = 120  # the longest frame an Opus packet can hold


def decode_audio(payload: bytes, format: str) -> npt.NDArray[np.float32]:
    """One PCM or μ-law payload as float32 samples in [-1, 1]."""
    if format == "pcm_f32le":
        return np.frombuffer(payload, dtype="<f4").astype(np.float32)
    if format == "pcm_s16le":
        return np.frombuffer(payload, dtype="<i2").astype(np.float32) / np.float32(32768.0)
    if format == "mulaw":
        samples = ulaw2lin(np.frombuffer(payload, dtype=np.uint8))
        return samples.astype(np.float32) / np.float32(32768.0)
    raise InvalidRequest(f"decode_audio decodes pcm_s16le, pcm_f32le and mulaw, not {format!r}")


def decode_pcm(payloads: list[bytes], format: str) -> npt.NDArray[np.float32]:
    """PCM or μ-law payloads of one stream as float32 samples."""
    return decode_audio(b"".join(payloads), format)


class OpusDecoder:
    """Decodes one stream's Opus packets (libopus keeps state between them)."""

    def __init__(self, sample_rate: int) -> None:
        import opuslib  # loads libopus: only when a client decodes Opus

        self._decoder = opuslib.Decoder(sample_rate, 1)
        self._max_frame = sample_rate * OPUS_MAX_FRAME_MS // 1000

    def decode(self, packet: bytes) -> npt.NDArray[np.float32]:
        pcm = self._decoder.decode_float(packet, self._max_frame)
        return np.frombuffer(pcm, dtype=np.float32).copy()

"""Per-stream encoding of the engine's float audio into wire payloads, segment by segment.

One :class:`Encoder` serves one stream. For each segment (sentence) the server calls
:meth:`Encoder.encode` with the segment's audio as it comes (float32 mono at the source rate,
24 kHz) and then :meth:`Encoder.end_segment`; each returns the payloads to send, in order.

Every payload is one of:

* ``pcm_s16le``: little-endian int16, ``round(x * 32767)``; at most 100 ms per payload.
* ``pcm_f32le``: little-endian float32 in [-1, 1]; at most 100 ms per payload.
* ``mulaw``: G.711 μ-law at 8 kHz, one byte per sample; at most 100 ms per payload.
* ``opus``: one raw Opus packet holding exactly one 20 ms frame (no container).

PCM formats send whatever output is complete at once (lowest latency), so a payload may be
shorter than 100 ms. Opus holds back the samples of an incomplete frame until more audio
comes; :meth:`Encoder.end_segment` pads that last frame with zeros to a full 20 ms. The Opus
codec state carries over from one segment to the next, so a client decodes the whole stream
with one decoder.

Duration accounting: a payload's duration is the audio it carries at the stream's sample
rate, padding included: PCM ``len(payload) / bytes_per_sample`` samples, Opus 20 ms per
packet. :attr:`Encoder.samples_out`, :attr:`Encoder.segment` and :attr:`Encoder.last_segment`
count exactly these, so a segment's ``audio_ms`` is ``encoder.last_segment.ms``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..errors import InternalError
from .formats import DEFAULT_SAMPLE_RATE, check_format
from .mulaw import lin2ulaw
from .opus import DEFAULT_BITRATE, FRAME_MS, OpusFrameEncoder
from .resample import Resampler

PCM_CHUNK_MS = 100  # longest PCM payload
BYTES_PER_SAMPLE = {"pcm_s16le": 2, "pcm_f32le": 4, "mulaw": 1}


@dataclass(frozen=True, slots=True)
class AudioCount:
    """Audio carried by some payloads: samples at ``sample_rate`` (Opus: padding included)."""

    sample_rate: int
    samples: int = 0
    payloads: int = 0
    nbytes: int = 0

    @property
    def ms(self) -> float:
        """Duration in milliseconds."""
        return self.samples * 1000 / self.sample_rate

    def plus(self, samples: int, payloads: list[bytes]) -> AudioCount:
        return AudioCount(
            self.sample_rate,
            self.samples + samples,
            self.payloads + len(payloads),
            self.nbytes + sum(len(p) for p in payloads),
        )


class Encoder:
    """Turns one stream's float audio into payloads of ``format`` at ``sample_rate``.

    ``format`` and ``sample_rate`` are checked with :func:`check_format` (``sample_rate=None``
    picks the format's default) and raise :class:`~stream_engine.errors.UnsupportedFormat`;
    ``bitrate`` (bit/s, 6000-510000) and ``complexity`` (0-10, ``None``: libopus's default)
    apply to Opus only and raise :class:`~stream_engine.errors.InvalidOption` when out of
    range.
    """

    def __init__(
        self,
        format: str,
        sample_rate: int | None = None,
        source_rate: int = DEFAULT_SAMPLE_RATE,
        *,
        bitrate: int = DEFAULT_BITRATE,
        complexity: int | None = None,
    ) -> None:
        self.format, self.sample_rate = check_format(format, sample_rate)
        self.source_rate = source_rate
        self._resampler = Resampler(source_rate, self.sample_rate)
        self._opus: OpusFrameEncoder | None = None
        if self.format == "opus":
            self._opus = OpusFrameEncoder(self.sample_rate, bitrate, complexity)
            self.payload_samples = self._opus.frame_samples  # exactly, per packet
            self.bytes_per_sample = 0
        else:
            self.payload_samples = self.sample_rate * PCM_CHUNK_MS // 1000  # at most
            self.bytes_per_sample = BYTES_PER_SAMPLE[self.format]
        self._pending: npt.NDArray[np.float32] = np.zeros(0, np.float32)  # Opus: < 1 frame
        self.total = AudioCount(self.sample_rate)  # the whole stream so far
        self.segment = AudioCount(self.sample_rate)  # the current segment so far
        self.last_segment = AudioCount(self.sample_rate)  # the last ended segment

    @property
    def samples_out(self) -> int:
        """Samples (at ``sample_rate``) in all payloads returned so far, Opus padding included."""
        return self.total.samples

    @property
    def codec_delay(self) -> int:
        """Samples of delay the codec adds before the audio starts (Opus look-ahead; PCM 0).

        A client that wants the decoded audio aligned drops this many samples at the start.
        """
        return self._opus.lookahead if self._opus is not None else 0

    def duration_ms(self, payloads: list[bytes]) -> float:
        """Milliseconds of audio carried by ``payloads`` of this encoder's format and rate."""
        return self._samples_in(payloads) * 1000 / self.sample_rate

    def encode(self, audio: npt.ArrayLike) -> list[bytes]:
        """Payloads for the next piece of the current segment (float mono at ``source_rate``).

        Any length, 0 included. NaN and ±inf become 0; values outside [-1, 1] are clipped.
        """
        x = _sanitize(audio)
        return self._emit(self._resampler.process(x), end=False)

    def end_segment(self) -> list[bytes]:
        """The current segment is complete: payloads for the rest of it.

        Drains the resampler and, for Opus, pads the last partial frame with zeros. The
        segment's totals move to :attr:`last_segment`; the encoder is ready for the next one.
        """
        payloads = self._emit(self._resampler.flush(), end=True)
        self.last_segment = self.segment
        self.segment = AudioCount(self.sample_rate)
        return payloads

    def _emit(self, samples: npt.NDArray[np.float32], *, end: bool) -> list[bytes]:
        y = np.clip(samples, -1.0, 1.0)  # the filter may overshoot a clipped input slightly
        if self._opus is not None:
            payloads = self._opus_packets(y, end)
        else:
            payloads = [
                self._pcm_bytes(y[i : i + self.payload_samples])
                for i in range(0, y.size, self.payload_samples)
            ]
        count = self._samples_in(payloads)
        self.segment = self.segment.plus(count, payloads)
        self.total = self.total.plus(count, payloads)
        return payloads

    def _opus_packets(self, y: npt.NDArray[np.float32], end: bool) -> list[bytes]:
        assert self._opus is not None
        n = self.payload_samples
        buf = np.concatenate((self._pending, y)) if self._pending.size else y
        if end and buf.size % n:
            buf = np.concatenate((buf, np.zeros(n - buf.size % n, np.float32)))
        whole = buf.size - buf.size % n
        self._pending = buf[whole:].copy()
        return [self._opus.encode(buf[i : i + n]) for i in range(0, whole, n)]

    def _pcm_bytes(self, y: npt.NDArray[np.float32]) -> bytes:
        if self.format == "pcm_f32le":
            return y.astype("<f4").tobytes()
        s16 = np.rint(y.astype(np.float64) * 32767.0).astype(np.int16)  # exact rounding
        if self.format == "mulaw":
            return lin2ulaw(s16).tobytes()
        return s16.astype("<i2").tobytes()

    def _samples_in(self, payloads: list[bytes]) -> int:
        if self._opus is not None:
            return len(payloads) * self.payload_samples
        return sum(len(p) for p in payloads) // self.bytes_per_sample


def _sanitize(audio: npt.ArrayLike) -> npt.NDArray[np.float32]:
    x = np.asarray(audio)
    if x.ndim != 1:
        raise InternalError(f"audio must be a 1-D (mono) array, got shape {x.shape}")
    if x.dtype.kind != "f":
        raise InternalError(f"audio must be a float array, got dtype {x.dtype}")
    # in the input's own precision first: a huge float64 is clipped, not turned into inf -> 0
    return np.clip(np.where(np.isfinite(x), x, 0.0), -1.0, 1.0).astype(np.float32)


__all__ = ["BYTES_PER_SAMPLE", "FRAME_MS", "PCM_CHUNK_MS", "AudioCount", "Encoder"]

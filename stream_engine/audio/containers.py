"""Streamed audio files for the OpenAI-compatible ``POST /v1/audio/speech`` endpoint.

That endpoint sends speech as one chunked HTTP body while the engine is still generating it,
in one of OpenAI's ``response_format``\\ s. :class:`ContainerEncoder` turns the engine's float
mono audio, fed piece by piece, into the bytes of one such file, handing back whatever bytes
are complete after each piece so the server can send them at once. It does no I/O itself.

Codecs and containers all come from PyAV (FFmpeg); this module only wires them together:

=========  ==========================  ==============
format     codec in container          Content-Type
=========  ==========================  ==============
``mp3``    MP3 (libmp3lame), raw .mp3  ``audio/mpeg``
``opus``   Opus (libopus) in Ogg       ``audio/ogg``
``aac``    AAC in ADTS                 ``audio/aac``
``flac``   FLAC stream                 ``audio/flac``
``wav``    RIFF/WAVE, PCM s16le        ``audio/wav``
``pcm``    raw PCM s16le, no header    ``audio/pcm``
=========  ==========================  ==============

The output is never seekable, so nothing written is patched afterwards: the WAV header's RIFF
and data sizes stay 0xFFFFFFFF ("unknown", as in OpenAI's streamed WAV), FLAC's STREAMINFO
has no total length or MD5, and MP3 has no Xing/LAME header. Every codec keeps back less
than one frame of audio (plus its look-ahead), and Ogg up to one 100 ms page, until more audio
comes or :meth:`close` flushes it.
"""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import numpy.typing as npt
from av.audio.stream import AudioStream

from ..errors import UnsupportedFormat
from .encoders import _sanitize

RESPONSE_FORMATS: dict[str, str] = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",  # RFC 7845: Ogg Opus files are audio/ogg
    "aac": "audio/aac",  # ADTS stream
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",  # not audio/L16: that one is big-endian
}

# response_format -> (FFmpeg muxer, FFmpeg encoder)
_MUXERS: dict[str, tuple[str, str]] = {
    "mp3": ("mp3", "libmp3lame"),
    "opus": ("ogg", "libopus"),
    "aac": ("adts", "aac"),
    "flac": ("flac", "flac"),
    "wav": ("wav", "pcm_s16le"),
    "pcm": ("s16le", "pcm_s16le"),
}

# flush_packets: write each muxed packet through to the sink at once, never leaving it in
# AVIO's 32 KiB buffer (FFmpeg's default mostly does this too, but only as a side effect of
# its flush-point markers; streaming must not depend on that). bitexact: no "encoder: Lavf..." tag, which keeps the WAV header
# the plain 44 bytes that naive clients skip (FFmpeg would add a LIST/INFO chunk). No header
# padding: it is room for editing tags in place (8 KiB in FLAC), useless in a stream.
_CONTAINER_OPTIONS = {"fflags": "+flush_packets+bitexact", "metadata_header_padding": "0"}
# The Ogg muxer holds packets until a page spans page_duration (default 1 s); 100 ms pages
# cost ~2.5% extra bytes at 64 kbit/s.
_OGG_OPTIONS = {"page_duration": "100000"}  # microseconds


class _Sink:
    """Write-only, non-seekable file object that collects what the muxer writes."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def write(self, data: bytes) -> int:
        self._buf += data
        return len(data)

    def seekable(self) -> bool:
        return False

    def drain(self) -> bytes:
        data = bytes(self._buf)
        self._buf.clear()
        return data


class ContainerEncoder:
    """Float mono audio in, bytes of one streamed file out (sans-I/O: no sockets, no files).

    ``response_format`` is a key of :data:`RESPONSE_FORMATS`; an unknown one, or a
    ``sample_rate`` its codec cannot take, raises
    :class:`~stream_engine.errors.UnsupportedFormat`.
    """

    def __init__(self, response_format: str, sample_rate: int = 24_000) -> None:
        if response_format not in RESPONSE_FORMATS:
            raise UnsupportedFormat(
                f"unknown response_format {response_format!r}; one of {', '.join(RESPONSE_FORMATS)}"
            )
        muxer, codec = _MUXERS[response_format]
        rates = av.Codec(codec, "w").audio_rates
        if rates and sample_rate not in rates:
            raise UnsupportedFormat(f"{response_format} cannot be encoded at {sample_rate} Hz")
        self.content_type = RESPONSE_FORMATS[response_format]
        self._rate = sample_rate
        self._sink = _Sink()
        options = _CONTAINER_OPTIONS | (_OGG_OPTIONS if muxer == "ogg" else {})
        self._container = av.open(self._sink, mode="w", format=muxer, container_options=options)
        stream = self._container.add_stream(codec, rate=sample_rate, layout="mono")
        assert isinstance(stream, AudioStream)  # for mypy: the codec name is a plain str
        self._stream = stream
        self._samples = 0  # fed so far: the next frame's pts
        # Header now: close() with no audio still gives a header-only file (empty WAV/FLAC).
        self._container.start_encoding()

    def encode(self, audio: npt.ArrayLike) -> bytes:
        """The file's bytes completed by this audio (float mono at ``sample_rate``; may be b"").

        NaN and ±inf become 0; values outside [-1, 1] are clipped.
        """
        x = _sanitize(audio)
        if x.size:
            # The project's s16 rule, round(x * 32767), as for pcm_s16le elsewhere; FFmpeg's own
            # float -> s16 scales by 32768. The codec context then converts s16 to its native
            # sample format and cuts frames of its frame size, keeping the remainder for later.
            s16 = np.rint(x.astype(np.float64) * 32767.0).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(s16[np.newaxis, :], format="s16", layout="mono")
            frame.sample_rate = self._rate
            frame.time_base = Fraction(1, self._rate)
            frame.pts = self._samples
            self._samples += x.size
            self._container.mux(self._stream.encode(frame))
        return self._sink.drain()

    def close(self) -> bytes:
        """Flush the codec and write the trailer: the rest of the file."""
        self._container.mux(self._stream.encode(None))
        self._container.close()
        return self._sink.drain()


__all__ = ["RESPONSE_FORMATS", "ContainerEncoder"]

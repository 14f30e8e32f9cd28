"""Streamed files for /v1/audio/speech: every format decodes, streams early, and is exact if lossless.

Decoded duration minus input duration, measured for 0.3-2.3 s inputs at 24 kHz:

* flac, wav, pcm: 0 (every sample comes back, exactly ``round(x * 32767)``);
* opus: 0 (Ogg's granule positions and pre-skip trim the codec's padding);
* mp3: +55 to +60 ms (no Xing/LAME header on a stream, so the decoder keeps LAME's delay and
  last-frame padding); tolerance 0 to +100 ms;
* aac: +44 to +85 ms (1024 samples of priming plus last-frame padding; ADTS has no field to
  trim them); tolerance 0 to +100 ms.
"""

from __future__ import annotations

import io
import itertools
import struct
import wave

import av
import numpy as np
import pytest

from stream_engine.audio.containers import RESPONSE_FORMATS, ContainerEncoder
from stream_engine.errors import UnsupportedFormat

RATE = 24_000
LOSSY = ["mp3", "opus", "aac"]
LOSSLESS = ["flac", "wav", "pcm"]
EXTRA_S = {"mp3": (0.0, 0.1), "aac": (0.0, 0.1), "opus": (0.0, 0.0)}  # decoded - input


def tone(seconds: float, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * RATE)) / RATE
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def decode(fmt: str, data: bytes) -> tuple[np.ndarray, int]:
    """Mono samples (s16 for lossless formats, float for lossy) and their rate."""
    if fmt == "pcm":
        return np.frombuffer(data, "<i2"), RATE
    with av.open(io.BytesIO(data)) as container:
        frames = list(container.decode(audio=0))
    return np.concatenate([f.to_ndarray()[0] for f in frames]), frames[0].sample_rate


def encode_all(fmt: str, x: np.ndarray, cuts: tuple[int, ...] = (12_000, 19_000)) -> bytes:
    enc = ContainerEncoder(fmt)
    bounds = [0, *cuts, x.size]
    return b"".join(enc.encode(x[a:b]) for a, b in itertools.pairwise(bounds)) + enc.close()


def starts_with_magic(fmt: str, data: bytes) -> bool:
    if fmt == "mp3":  # an ID3v2 tag or an MPEG audio frame sync (11 bits set)
        return data[:3] == b"ID3" or (data[0] == 0xFF and data[1] & 0xE0 == 0xE0)
    if fmt == "aac":  # ADTS sync word 0xFFF
        return data[0] == 0xFF and data[1] & 0xF0 == 0xF0
    if fmt == "wav":
        return data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    return data.startswith({"opus": b"OggS", "flac": b"fLaC", "pcm": b""}[fmt])


def test_content_types() -> None:
    assert RESPONSE_FORMATS == {
        "mp3": "audio/mpeg",
        "opus": "audio/ogg",
        "aac": "audio/aac",
        "flac": "audio/flac",
        "wav": "audio/wav",
        "pcm": "audio/pcm",
    }
    assert ContainerEncoder("mp3").content_type == "audio/mpeg"


@pytest.mark.parametrize("fmt", LOSSY)
def test_lossy_decodes_to_the_tone(fmt: str) -> None:
    x = tone(1.5)
    y, rate = decode(fmt, encode_all(fmt, x))
    assert rate == (48_000 if fmt == "opus" else RATE)  # FFmpeg decodes Opus at 48 kHz
    lo, hi = EXTRA_S[fmt]
    assert lo - 1e-9 <= y.size / rate - x.size / RATE <= hi + 1e-9
    peak_hz = np.argmax(np.abs(np.fft.rfft(y))) * rate / y.size
    assert abs(peak_hz - 440) < 2


@pytest.mark.parametrize("fmt", LOSSLESS)
def test_lossless_is_exact(fmt: str) -> None:
    x = tone(1.5, amp=1.2)  # clipped to [-1, 1] first
    y, rate = decode(fmt, encode_all(fmt, x))
    assert rate == RATE
    np.testing.assert_array_equal(y, np.rint(np.clip(x, -1, 1).astype(np.float64) * 32767))


@pytest.mark.parametrize("fmt", LOSSY + LOSSLESS)
def test_first_half_second_streams_at_once(fmt: str) -> None:
    first = ContainerEncoder(fmt).encode(tone(0.5))
    assert first and starts_with_magic(fmt, first)
    y, rate = decode(fmt, first)  # audio, not just a header
    assert y.size / rate >= 0.3


def test_opus_head_keeps_the_input_rate() -> None:
    data = encode_all("opus", tone(0.5), cuts=())
    head = data.index(b"OpusHead")
    assert struct.unpack_from("<I", data, head + 12)[0] == RATE


def test_wav_sizes_are_unknown_and_it_still_reads() -> None:
    x = tone(1.0)
    data = encode_all("wav", x)
    assert data[36:40] == b"data"  # the plain 44-byte header
    assert struct.unpack_from("<I", data, 4)[0] == 0xFFFFFFFF  # RIFF size
    assert struct.unpack_from("<I", data, 40)[0] == 0xFFFFFFFF  # data size
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, RATE)
        y = np.frombuffer(w.readframes(x.size + 1), "<i2")
    np.testing.assert_array_equal(y, np.rint(x.astype(np.float64) * 32767))


def test_unknown_format_or_rate() -> None:
    with pytest.raises(UnsupportedFormat):
        ContainerEncoder("ogg")
    with pytest.raises(UnsupportedFormat):
        ContainerEncoder("opus", sample_rate=44_100)


@pytest.mark.parametrize("fmt", LOSSY + LOSSLESS)
def test_nan_and_inf_become_silence(fmt: str) -> None:
    x = np.array([np.nan, np.inf, -np.inf, 1e300, -1e300, 0.25] * 800)
    data = encode_all(fmt, x, cuts=(1000,))
    if fmt in LOSSLESS:
        y, _ = decode(fmt, data)
        np.testing.assert_array_equal(y[:6], [0, 0, 0, 32767, -32767, 8192])


@pytest.mark.parametrize("fmt", LOSSY + LOSSLESS)
def test_close_without_audio(fmt: str) -> None:
    enc = ContainerEncoder(fmt)
    data = enc.encode(np.zeros(0, np.float32)) + enc.close()
    assert not data or starts_with_magic(fmt, data)
    if fmt in ("flac", "wav"):  # FFmpeg cannot probe a header-only MP3 or Ogg stream
        with av.open(io.BytesIO(data)) as container:
            assert not list(container.decode(audio=0))

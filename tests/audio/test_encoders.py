"""Per-stream encoders: payload framing, PCM/μ-law exactness, Opus packets, duration counts."""

from __future__ import annotations

import warnings

import numpy as np
import opuslib
import opuslib.api.decoder
import pytest

from stream_engine.audio import Encoder, Resampler
from stream_engine.audio.formats import SAMPLE_RATES
from stream_engine.audio.mulaw import lin2ulaw, ulaw2lin
from stream_engine.errors import InternalError, InvalidOption, UnsupportedFormat

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop  # the stdlib's G.711 codec (removed in 3.13): the μ-law reference

SOURCE = 24_000
PCM = [(f, r) for f in ("pcm_s16le", "pcm_f32le", "mulaw") for r in SAMPLE_RATES[f]]
OPUS_RATES = SAMPLE_RATES["opus"]


def tone(freq: float, seconds: float, amp: float = 0.5, rate: int = SOURCE) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def encode_segment(enc: Encoder, x: np.ndarray, chunk: int = 0) -> list[bytes]:
    """The segment's payloads, fed in pieces of ``chunk`` samples (0: all at once)."""
    chunk = chunk or max(x.size, 1)
    payloads: list[bytes] = []
    for i in range(0, x.size, chunk):
        payloads += enc.encode(x[i : i + chunk])
    return payloads + enc.end_segment()


def decode_pcm(fmt: str, payloads: list[bytes]) -> np.ndarray:
    data = b"".join(payloads)
    if fmt == "pcm_s16le":
        return np.frombuffer(data, "<i2").astype(np.float64) / 32767
    if fmt == "pcm_f32le":
        return np.frombuffer(data, "<f4").astype(np.float64)
    return np.frombuffer(audioop.ulaw2lin(data, 2), "<i2").astype(np.float64) / 32767


def decode_opus(rate: int, packets: list[bytes]) -> list[np.ndarray]:
    decoder = opuslib.Decoder(rate, 1)
    most = rate * 120 // 1000  # the longest an Opus packet can be
    return [np.frombuffer(decoder.decode(p, most), "<i2") / 32768 for p in packets]


# ---- formats and options ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "rate"),
    [
        ("wav", 24_000),
        ("PCM_S16LE", 24_000),
        (None, 24_000),
        ("mulaw", 16_000),
        ("opus", 22_050),
        ("opus", 44_100),
        ("pcm_s16le", 44_100),
        ("pcm_s16le", "24000"),
        ("pcm_f32le", 24_000.0),
        ("pcm_f32le", True),
    ],
)
def test_invalid_format_or_rate_is_unsupported(fmt, rate):
    with pytest.raises(UnsupportedFormat):
        Encoder(fmt, rate)


@pytest.mark.parametrize(("fmt", "rate"), [("pcm_s16le", 24_000), ("mulaw", 8_000)])
def test_sample_rate_none_picks_the_default(fmt, rate):
    assert Encoder(fmt, None).sample_rate == rate


@pytest.mark.parametrize("bitrate", [0, 5_999, 510_001, 32_000.0, "32k", True])
def test_bad_opus_bitrate_is_an_invalid_option(bitrate):
    with pytest.raises(InvalidOption):
        Encoder("opus", 24_000, bitrate=bitrate)


@pytest.mark.parametrize("complexity", [-1, 11, 5.0, "5"])
def test_bad_opus_complexity_is_an_invalid_option(complexity):
    with pytest.raises(InvalidOption):
        Encoder("opus", 24_000, complexity=complexity)


@pytest.mark.parametrize(
    "audio", [np.zeros((2, 10), np.float32), np.zeros(10, np.int16), np.array(["a"])]
)
def test_audio_must_be_mono_float(audio):
    with pytest.raises(InternalError):
        Encoder("pcm_s16le", 24_000).encode(audio)


# ---- PCM and μ-law ------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "rate"), PCM)
@pytest.mark.parametrize("chunk", [0, 333, 5_000])
def test_pcm_payloads_are_at_most_100_ms_and_carry_the_whole_segment(fmt, rate, chunk):
    enc = Encoder(fmt, rate)
    width = {"pcm_s16le": 2, "pcm_f32le": 4, "mulaw": 1}[fmt]
    x = tone(300, 1.37)
    payloads = encode_segment(enc, x, chunk)
    assert all(0 < len(p) <= width * rate // 10 and len(p) % width == 0 for p in payloads)
    samples = Resampler(SOURCE, rate).output_length(x.size)
    assert sum(len(p) for p in payloads) == samples * width
    assert enc.last_segment.samples == enc.samples_out == samples
    assert enc.last_segment.payloads == len(payloads)
    assert enc.last_segment.nbytes == samples * width
    assert enc.last_segment.ms == enc.duration_ms(payloads) == samples * 1000 / rate
    assert enc.last_segment.ms == pytest.approx(1370.0, abs=1000 / rate)  # rounded up
    assert enc.segment.samples == 0  # the next segment has not started


@pytest.mark.parametrize(("fmt", "rate"), PCM)
def test_pcm_round_trip_matches_the_resampled_audio(fmt, rate):
    x = tone(440, 0.5, amp=0.8)
    expected = Resampler(SOURCE, rate)
    y = np.concatenate((expected.process(x), expected.flush())).astype(np.float64)
    got = decode_pcm(fmt, encode_segment(Encoder(fmt, rate), x, chunk=1000))
    assert got.shape == y.shape
    if fmt == "pcm_s16le":
        # within quantisation (the chunked resampler may differ from the whole by 1e-6)
        np.testing.assert_allclose(got, y, rtol=0, atol=0.5 / 32767 + 1e-6)
    elif fmt == "pcm_f32le":
        np.testing.assert_allclose(got, y, rtol=0, atol=1e-6)
    else:  # μ-law: relative error of at most half a step of its 4-bit mantissa
        np.testing.assert_allclose(got, y, rtol=1 / 16, atol=8 / 32767)


def test_s16_at_24k_is_the_input_quantised():
    x = np.random.default_rng(2).uniform(-1, 1, 4_801).astype(np.float32)
    data = b"".join(encode_segment(Encoder("pcm_s16le", 24_000), x))
    s16 = np.rint(x.astype(np.float64) * 32767).astype(np.int16)
    np.testing.assert_array_equal(np.frombuffer(data, "<i2"), s16)
    assert np.abs(np.frombuffer(data, "<i2") / 32767 - x).max() <= 0.5 / 32767 + 1e-7


def test_f32_at_24k_is_the_input_exactly():
    x = np.random.default_rng(3).uniform(-1, 1, 4_801).astype(np.float32)
    enc = Encoder("pcm_f32le", 24_000)
    first = enc.encode(x)  # nothing is held back at the source rate
    assert b"".join(first) == x.astype("<f4").tobytes()
    assert enc.end_segment() == []


def test_lin2ulaw_is_bit_exact_on_every_int16():
    every = np.arange(-32768, 32768, dtype=np.int16)
    reference = audioop.lin2ulaw(every.astype("<i2").tobytes(), 2)
    assert lin2ulaw(every).tobytes() == reference


def test_ulaw2lin_is_bit_exact_on_every_code():
    codes = np.arange(256, dtype=np.uint8)
    reference = np.frombuffer(audioop.ulaw2lin(codes.tobytes(), 2), "<i2")
    np.testing.assert_array_equal(ulaw2lin(codes), reference)


def test_mulaw_payload_is_the_g711_code_of_the_s16_samples():
    x = np.random.default_rng(4).uniform(-1, 1, 24_000).astype(np.float32)
    r = Resampler(SOURCE, 8_000)
    y = np.clip(np.concatenate((r.process(x), r.flush())), -1, 1).astype(np.float64)
    s16 = np.rint(y * 32767)
    reference = audioop.lin2ulaw(s16.astype("<i2").tobytes(), 2)
    assert b"".join(encode_segment(Encoder("mulaw", 8_000), x)) == reference


# ---- edge inputs ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["pcm_s16le", "pcm_f32le", "mulaw", "opus"])
def test_empty_input_and_empty_segment(fmt):
    enc = Encoder(fmt, None)
    assert enc.encode(np.zeros(0, np.float32)) == []
    assert enc.encode([]) == []
    assert enc.end_segment() == []
    assert enc.last_segment.samples == enc.samples_out == 0


def test_nan_and_inf_become_zero_and_the_rest_is_clipped():
    x = np.array([np.nan, np.inf, -np.inf, 0.5, 2.0, -3.0, 1.0, -1.0], np.float32)
    s16 = b"".join(encode_segment(Encoder("pcm_s16le", 24_000), x))
    np.testing.assert_array_equal(
        np.frombuffer(s16, "<i2"), [0, 0, 0, 16384, 32767, -32767, 32767, -32767]
    )
    f32 = b"".join(encode_segment(Encoder("pcm_f32le", 24_000), x))
    np.testing.assert_array_equal(np.frombuffer(f32, "<f4"), [0, 0, 0, 0.5, 1.0, -1.0, 1.0, -1.0])


def test_huge_float64_is_clipped_not_zeroed():
    x = np.array([1e300, -1e300, 1e39, 0.25], np.float64)  # beyond float32's range
    s16 = b"".join(encode_segment(Encoder("pcm_s16le", 24_000), x))
    np.testing.assert_array_equal(np.frombuffer(s16, "<i2"), [32767, -32767, 32767, 8192])


@pytest.mark.parametrize(("fmt", "rate"), [*PCM, *(("opus", r) for r in OPUS_RATES)])
def test_nan_and_loud_input_stay_in_range_after_resampling(fmt, rate):
    x = np.sign(tone(2_000, 0.2)) * 4  # a square wave far beyond full scale: ringing
    x[::97] = np.nan
    enc = Encoder(fmt, rate)
    payloads = encode_segment(enc, x)
    if fmt == "opus":
        decoded = np.concatenate(decode_opus(rate, payloads))
        assert np.isfinite(decoded).all()
        assert np.abs(decoded).max() > 0.5
    else:
        y = decode_pcm(fmt, payloads)
        assert np.isfinite(y).all()
        assert np.abs(y).max() <= 1.0
        # clipped to full scale, not scaled down (μ-law's largest code is 32124 / 32767)
        assert np.abs(y).max() > (0.98 if fmt == "mulaw" else 0.999)


# ---- Opus -----------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", OPUS_RATES)
def test_every_opus_packet_is_one_20ms_frame(rate):
    enc = Encoder("opus", rate)
    packets = encode_segment(enc, tone(440, 0.53), chunk=777)
    assert len(packets) == -(-530 // 20)  # the last frame is padded to 20 ms
    for packet in packets:
        assert opuslib.api.decoder.packet_get_nb_frames(packet) == 1
    assert all(f.size == rate // 50 for f in decode_opus(rate, packets))
    assert enc.last_segment.samples == len(packets) * rate // 50
    assert enc.last_segment.ms == enc.duration_ms(packets) == 20.0 * len(packets)


@pytest.mark.parametrize("rate", OPUS_RATES)
def test_opus_holds_back_only_an_incomplete_frame(rate):
    enc = Encoder("opus", rate)
    frame_in = SOURCE // 50  # one 20 ms frame of source samples
    produced = sum(len(enc.encode(np.zeros(frame_in, np.float32))) for _ in range(10))
    # at most the resampler's look-ahead plus one partial frame is held back
    held_ms = (Resampler(SOURCE, rate).latency / SOURCE + 0.02) * 1000
    assert produced >= 10 - np.ceil(held_ms / 20)
    assert produced + len(enc.end_segment()) == 10


@pytest.mark.parametrize("rate", OPUS_RATES)
def test_a_440hz_sine_survives_opus(rate):
    enc = Encoder("opus", rate)
    decoded = np.concatenate(decode_opus(rate, encode_segment(enc, tone(440, 1.0))))
    aligned = decoded[enc.codec_delay :][:rate]  # Opus delays by its look-ahead
    reference = tone(440, 1.0, rate=rate)[: aligned.size]
    core = slice(rate // 10, -rate // 10)
    spectrum = np.abs(np.fft.rfft(aligned[core] * np.hanning(aligned[core].size)))
    assert np.argmax(spectrum) * rate / aligned[core].size == pytest.approx(440, abs=2)
    assert np.corrcoef(aligned[core], reference[core])[0, 1] > 0.99
    rms = np.sqrt(np.mean(aligned[core] ** 2))
    assert rms == pytest.approx(0.5 / np.sqrt(2), rel=0.1)


def test_opus_segments_continue_one_codec_stream():
    """Two segments give the packets one segment would: the codec state carries over."""
    x = tone(440, 1.0)
    first, second = x[:12_000], x[12_000:]  # 0.5 s each: whole frames, no padding
    enc = Encoder("opus", 24_000)
    two = encode_segment(enc, first, chunk=1_000) + encode_segment(enc, second, chunk=1_000)
    assert enc.last_segment.payloads == 25
    assert enc.samples_out == 24_000
    one = encode_segment(Encoder("opus", 24_000), x)
    assert two == one
    # and one decoder plays them as one continuous sine, across the boundary
    decoded = np.concatenate(decode_opus(24_000, two))[enc.codec_delay :]
    around = slice(11_000, 13_000)
    assert np.corrcoef(decoded[around], x[around])[0, 1] > 0.99


@pytest.mark.parametrize("rate", OPUS_RATES)
def test_opus_decodes_continuously_across_padded_segments(rate):
    enc = Encoder("opus", rate)
    first = encode_segment(enc, tone(440, 0.51))  # 25.5 frames: the last one is padded
    assert enc.last_segment.ms == 520.0
    second = encode_segment(enc, tone(440, 0.5))
    frames = decode_opus(rate, first + second)
    assert [f.size for f in frames] == [rate // 50] * (26 + 25)
    decoded = np.concatenate(frames)[enc.codec_delay :]
    # the second segment plays after the first's 520 ms, undisturbed by the boundary
    start = round(0.52 * rate)
    core = decoded[start + rate // 20 : start + rate // 2 - rate // 20]
    reference = tone(440, 0.5, rate=rate)[rate // 20 : rate // 2 - rate // 20]
    assert np.corrcoef(core, reference)[0, 1] > 0.99


def test_opus_bitrate_is_configurable():
    x = tone(440, 1.0) + 0.05 * np.random.default_rng(5).standard_normal(SOURCE).astype(np.float32)
    sizes = {}
    for bitrate in (12_000, 64_000):
        packets = encode_segment(Encoder("opus", 24_000, bitrate=bitrate), x)
        sizes[bitrate] = sum(len(p) for p in packets) * 8  # bits in one second
    assert sizes[12_000] < 20_000 < 40_000 < sizes[64_000]


def test_opus_padding_of_a_one_sample_segment_is_one_frame():
    enc = Encoder("opus", 48_000)
    assert enc.encode(np.full(1, 0.5, np.float32)) == []
    packets = enc.end_segment()
    assert len(packets) == 1
    assert enc.last_segment.samples == 960
    assert enc.end_segment() == []  # nothing is left over for the next segment
    assert enc.last_segment.samples == 0
    assert enc.samples_out == 960


def test_opus_complexity_is_applied():
    x = tone(440, 0.5) + 0.05 * np.random.default_rng(6).standard_normal(12_000).astype(np.float32)
    low = encode_segment(Encoder("opus", 16_000, complexity=0), x)
    high = encode_segment(Encoder("opus", 16_000, complexity=10), x)
    assert len(low) == len(high) == 25
    assert low != high
    assert all(f.size == 320 for f in decode_opus(16_000, low))

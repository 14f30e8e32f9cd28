"""The streaming resampler: chunking invariance, alignment, passband, anti-aliasing, flush."""

from __future__ import annotations

import numpy as np
import pytest

from stream_engine.audio.resample import Resampler
from stream_engine.errors import UnsupportedFormat

SOURCE = 24_000
TARGETS = (8_000, 12_000, 16_000, 22_050, 24_000, 48_000)
RESAMPLED = tuple(r for r in TARGETS if r != SOURCE)


def tone(freq: float, seconds: float = 1.0, amp: float = 0.5, rate: int = SOURCE) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def resample_whole(x: np.ndarray, target: int) -> np.ndarray:
    r = Resampler(SOURCE, target)
    return np.concatenate((r.process(x), r.flush()))


def resample_chunked(r: Resampler, x: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    parts, i = [], 0
    for size in sizes:
        parts.append(r.process(x[i : i + size]))
        i += size
    parts.append(r.process(x[i:]))
    parts.append(r.flush())
    return np.concatenate(parts)


def interior(y: np.ndarray, rate: int) -> np.ndarray:
    """``y`` without its first and last 50 ms (where the segment's zero padding shows)."""
    edge = rate // 20
    return y[edge:-edge]


def rms_db(y: np.ndarray, reference_amp: float) -> float:
    rms = np.sqrt(np.mean(y.astype(np.float64) ** 2))
    return 20 * np.log10(max(rms, 1e-30) / (reference_amp / np.sqrt(2)))


def peak_hz(y: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(y * np.hanning(y.size)))
    return float(np.argmax(spectrum) * rate / y.size)


@pytest.mark.parametrize("target", TARGETS)
def test_chunked_equals_whole(target):
    rng = np.random.default_rng(target)
    x = (0.3 * rng.standard_normal(SOURCE)).astype(np.float32)
    whole = resample_whole(x, target)
    assert whole.dtype == np.float32
    # tiny, empty, odd and large chunks, twice over with the same resampler (flush resets it)
    r = Resampler(SOURCE, target)
    for sizes in (rng.integers(0, 40, 400), np.array([0, 1, 1, 2, 3, 1000, 0, 7, 5000, 480])):
        chunked = resample_chunked(r, x, sizes)
        assert chunked.shape == whole.shape
        np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-6)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("n", [0, 1, 2, 159, 160, 161, 2399, 24_001])
def test_segment_length_is_its_duration(target, n):
    r = Resampler(SOURCE, target)
    y = np.concatenate((r.process(np.ones(n, np.float32)), r.flush()))
    assert y.size == -(-n * target // SOURCE) == r.output_length(n)


def test_identity_passes_samples_unchanged():
    x = np.random.default_rng(1).standard_normal(1001).astype(np.float32) * 3  # not clipped
    r = Resampler(SOURCE, SOURCE)
    assert r.latency == 0
    np.testing.assert_array_equal(r.process(x[:500]), x[:500])  # nothing is held back
    np.testing.assert_array_equal(r.process(x[500:]), x[500:])
    assert r.flush().size == 0


@pytest.mark.parametrize("target", RESAMPLED)
def test_holds_back_no_more_than_its_latency(target):
    r = Resampler(SOURCE, target)
    n = 10 * r.latency
    y = r.process(np.zeros(n, np.float32))
    # every output sample whose input (at time n * SOURCE / target) is older than `latency`
    assert y.size >= r.output_length(n - r.latency)


@pytest.mark.parametrize("target", RESAMPLED)
def test_dc_gain_is_one_in_every_phase(target):
    y = resample_whole(np.full(SOURCE, 0.5, np.float32), target)
    np.testing.assert_allclose(interior(y, target), 0.5, rtol=0, atol=1e-6)


@pytest.mark.parametrize("target", RESAMPLED)
@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.85])
def test_passband_sine_keeps_frequency_amplitude_and_phase(target, fraction):
    nyquist = min(SOURCE, target) / 2
    freq = round(fraction * nyquist / 10) * 10  # a whole number of periods per second
    y = resample_whole(tone(freq), target)
    core = interior(y, target)
    assert peak_hz(core, target) == pytest.approx(freq, abs=1.0)
    assert rms_db(core, 0.5) == pytest.approx(0.0, abs=0.01)
    # zero-phase: output n lies at input time n * SOURCE / target
    expected = interior(tone(freq, rate=target), target)
    np.testing.assert_allclose(core, expected, rtol=0, atol=2e-4)


ABOVE_NYQUIST = [
    (target, freq)
    for target in RESAMPLED
    if target < SOURCE
    for freq in (round(1.02 * target / 2), round(1.3 * target / 2), 11_900)
    if freq < SOURCE / 2
]


@pytest.mark.parametrize(("target", "freq"), ABOVE_NYQUIST)
def test_tone_above_new_nyquist_is_removed(target, freq):
    assert freq > target / 2
    y = resample_whole(tone(freq), target)
    attenuation = -rms_db(interior(y, target), 0.5)
    assert attenuation > 80.0  # designed for STOPBAND_DB (90 dB); the brief asks > 40 dB


def test_upsampling_leaves_no_image():
    """24k -> 48k: a 10 kHz tone must not bring its image at 14 kHz along."""
    y = interior(resample_whole(tone(10_000), 48_000), 48_000)
    spectrum = np.abs(np.fft.rfft(y * np.blackman(y.size)))
    hz = np.fft.rfftfreq(y.size, 1 / 48_000)
    signal = spectrum[np.abs(hz - 10_000) < 50].max()
    image = spectrum[np.abs(hz - 14_000) < 50].max()
    assert 20 * np.log10(image / signal) < -80.0


@pytest.mark.parametrize("target", RESAMPLED)
def test_flush_drains_the_filter_and_resets(target):
    x = tone(1000, seconds=0.25)
    r = Resampler(SOURCE, target)
    held = r.process(x)
    tail = r.flush()
    assert tail.size > 0  # the look-ahead was held back until the flush
    assert held.size + tail.size == r.output_length(x.size)
    # the end of the segment comes out, not zeros: the last 10 ms before the final 1 ms
    ms = target // 1000
    assert np.abs(tail[-11 * ms : -ms]).max() > 0.4
    # after a flush the next segment starts from silence, as a fresh resampler would
    again = np.concatenate((r.process(x), r.flush()))
    np.testing.assert_array_equal(again, np.concatenate((held, tail)))


@pytest.mark.parametrize(
    ("source", "target"),
    [(24_000, 0), (0, 8000), (24_000, -8000), (24_000, 8000.0), (24_000, True), (24_000, 22_051)],
)
def test_invalid_rates_are_unsupported(source, target):
    with pytest.raises(UnsupportedFormat):
        Resampler(source, target)

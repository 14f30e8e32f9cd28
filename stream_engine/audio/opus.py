"""A thin typed wrapper of libopus (through ``opuslib``): one 20 ms mono frame in, one packet out.

Settings, chosen for streamed TTS speech:

* application ``AUDIO``: the input is already clean, finished audio, so the encoder should
  reproduce it as faithfully as it can. ``VOIP`` is tuned for intelligibility of microphone
  speech (a variable high-pass filter instead of a DC filter, and a strong prior that the
  signal is speech), which helps nothing here and hurts Bark's non-speech output (laughter,
  music, breaths). At 16 kHz and up (complexity >= 7) libopus's signal analysis still finds
  the speech and codes it with SILK/hybrid; at 8/12 kHz, 32 kbit/s of CELT codes the narrow
  band well.
* 32 kbit/s by default: transparent-to-good for mono speech at 16-24 kHz, and plenty at
  8-12 kHz (libopus spends less where the band is narrower).
* complexity: libopus's default (9 in libopus 1.3) unless asked. At 16 kHz and above,
  complexity 7 and up also runs libopus's signal analysis (speech/music, bandwidth), which
  makes it several times slower than complexity 5 (still ~2 % of a core per real-time
  stream); a busy server can trade that for a little quality.
* variable bitrate (libopus's default), no DTX, no in-band FEC: the transport is a reliable
  WebSocket, so nothing is lost and no packet may be left out (every 20 ms has its packet).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import numpy as np
import numpy.typing as npt

from ..errors import InternalError, InvalidOption

FRAME_MS = 20
DEFAULT_BITRATE = 32_000
MIN_BITRATE, MAX_BITRATE = 6_000, 510_000  # what libopus accepts
_MAX_PACKET = 4_000  # bytes; libopus's recommended output buffer size
_APPLICATION = "audio"  # OPUS_APPLICATION_AUDIO


def _opuslib() -> ModuleType:
    """``opuslib`` with its encoder API; imported on first use (it loads libopus, ~40 ms)."""
    importlib.import_module("opuslib.api.encoder")
    return importlib.import_module("opuslib")


class OpusFrameEncoder:
    """Encodes consecutive 20 ms frames of one mono stream; the codec state carries over."""

    def __init__(
        self, sample_rate: int, bitrate: int = DEFAULT_BITRATE, complexity: int | None = None
    ) -> None:
        _check_int("opus bitrate", bitrate, MIN_BITRATE, MAX_BITRATE)
        if complexity is not None:
            _check_int("opus complexity", complexity, 0, 10)
        self.sample_rate = sample_rate
        self.bitrate = bitrate
        self.frame_samples = sample_rate * FRAME_MS // 1000
        self._lib = opuslib = _opuslib()
        try:
            self._encoder = opuslib.Encoder(sample_rate, 1, _APPLICATION)
            self._encoder.bitrate = bitrate
            if complexity is not None:
                self._encoder.complexity = complexity
            self.complexity: int = int(self._encoder.complexity)
            self.lookahead: int = int(self._encoder.lookahead)
        except opuslib.OpusError as e:
            raise InternalError(f"libopus could not make an encoder: {e}") from e

    def encode(self, frame: npt.NDArray[np.float32]) -> bytes:
        """One packet for exactly one frame of ``frame_samples`` float samples in [-1, 1]."""
        if frame.shape != (self.frame_samples,):
            raise InternalError(f"an Opus frame is {self.frame_samples} samples, got {frame.shape}")
        pcm = np.ascontiguousarray(frame, dtype="<f4").tobytes()
        try:
            packet = self._lib.api.encoder.encode_float(
                self._encoder.encoder_state, pcm, self.frame_samples, _MAX_PACKET
            )
        except self._lib.OpusError as e:
            raise InternalError(f"libopus failed to encode a frame: {e}") from e
        return bytes(packet)


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidOption(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")

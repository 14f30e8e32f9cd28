"""Joining a segment's audio from successive decodes (early audio, ``Job`` in the server).

With early audio a segment goes out in pieces: the audio of a preview (Bark's result had the
segment ended after the frames generated so far), then audio from a later preview or the whole
segment, which says the already-sent part slightly differently. :class:`Splicer` sends each new
decode only from where the last one stopped, keeps back the last ``hold`` samples of every
piece, and fades them into the next decode over that many samples, so the seam has no click.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

DEFAULT_HOLD = 480  # samples at 24 kHz: a 20 ms crossfade


class Splicer:
    """The audio of one segment, sent piece by piece from successive decodes of it."""

    def __init__(self, hold: int = DEFAULT_HOLD) -> None:
        if hold < 0:
            raise ValueError(f"hold must be >= 0, got {hold}")
        self.hold = hold
        self.sent = 0  # samples of the segment sent so far
        self._tail = np.zeros(0, np.float32)  # the last decode's next samples, not yet sent

    def piece(self, audio: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """What to send from a partial decode ``audio`` (the segment's start, any length).

        Returns samples from :attr:`sent` up to ``hold`` short of the end (nothing if the
        decode is not longer than what was sent plus ``hold``).
        """
        x = np.asarray(audio, dtype=np.float32)
        end = x.size - self.hold
        if end <= self.sent:
            return np.zeros(0, np.float32)
        out = self._join(x[self.sent : end])
        self._tail = x[end:].copy()
        self.sent = end
        return out

    def last(self, audio: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """The rest of the segment from its final decode ``audio`` (everything after ``sent``)."""
        x = np.asarray(audio, dtype=np.float32)
        out = self._join(x[self.sent :])
        self._tail = np.zeros(0, np.float32)
        self.sent = max(self.sent, x.size)
        return out

    def _join(self, new: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """``new`` with its start faded in from the held tail of the previous decode."""
        n = min(self._tail.size, new.size)
        if n == 0:
            return new.copy()
        fade_in = (np.arange(1, n + 1, dtype=np.float32) / (n + 1)).astype(np.float32)
        out = new.copy()
        out[:n] = self._tail[:n] * (1 - fade_in) + new[:n] * fade_in
        return out

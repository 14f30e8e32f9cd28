"""A request's life in the runtime: its status, its state per stage, and what it produces."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from ..bark.prompts import VoicePrompt
from ..config import GenerationOptions
from .scheduler import StageName

MAX_PREVIEWS = 255  # per request: a preview's id is -(id * 256 + k), k in [1, 255]


class Status(IntEnum):
    """How a request stands in :attr:`Request.stage`; the last three are final."""

    WAITING = 0  # in the stage's queue
    RUNNING = 1  # inside the stage
    FINISHED = 2  # out of the last stage, with its audio
    CANCELLED = 3
    FAILED = 4

    @property
    def final(self) -> bool:
        return self >= Status.FINISHED


@dataclass
class Speech:
    """What one request produces."""

    semantic: np.ndarray  # (N,) int64 semantic tokens, EOS excluded
    coarse: np.ndarray  # (2, T) int64 EnCodec codes of the first two codebooks
    fine: np.ndarray  # (8, T) int64 EnCodec codes
    audio: np.ndarray  # (T * 320,) float32 at ``sample_rate``
    sample_rate: int = 24_000

    @property
    def duration_s(self) -> float:
        return len(self.audio) / self.sample_rate


@dataclass
class Request:
    """One text to speak, with everything the stages keep about it."""

    id: int
    text: str
    text_ids: list[int]  # tokenizer output, at most 256 ids
    options: GenerationOptions  # resolved: seed set
    voice: VoicePrompt | None  # what the stages read: the preset, continued by ``after``
    max_semantic_tokens: int  # cap on generated semantic tokens (EOS included)
    # voice continuity: the previous segment of the same stream, whose tokens this one is
    # conditioned on (stage by stage); dropped once the last stage that needs it has started
    after: Request | None = None
    preset: VoicePrompt | None = None  # the stream's voice preset (``voice`` before continuing)
    # streaming within the segment: a preview (a request of its own, through fine and codec)
    # whenever the coarse stage has this many new frames at a window's end; 0 is off
    preview_frames: int = 0
    preview_of: Request | None = None  # on a preview: the segment it previews
    previews: int = 0  # previews made of this request so far
    previewed_frames: int = 0  # coarse frames the last of them covers
    # the stage the request waits for or is in (the last one once final); it only moves forward
    stage: StageName = StageName.SEMANTIC
    solo: bool = False  # retried alone in its current stage after its batch failed
    retries: int = 0
    status: Status = Status.WAITING
    error: BaseException | None = None
    # outputs, filled stage by stage
    semantic: list[int] = field(default_factory=list)
    coarse: np.ndarray | None = None
    fine: np.ndarray | None = None
    audio: np.ndarray | None = None
    # stage -> (start, end) in time.perf_counter() seconds, for traces and metrics
    trace: dict[str, list[float]] = field(default_factory=dict)
    submitted_at: float = field(default_factory=time.perf_counter)
    # when a listener needs this segment's audio (time.perf_counter() seconds), set by
    # Runtime.due: for a first segment at once, for a later one once the segment before it
    # has its semantic tokens
    due: float | None = None

    def preview(self, coarse: np.ndarray) -> Request:
        """A preview of this segment from its first coarse frames ``coarse`` (2, T).

        It goes through the fine and codec stages like any request; its audio is what Bark
        would say if the segment ended after those frames (see docs/protocol.md,
        ``early_audio``). Its id is negative, so the scheduler admits it before any segment.
        """
        if self.previews >= MAX_PREVIEWS:
            raise ValueError(f"request {self.id} has had {MAX_PREVIEWS} previews already")
        self.previews += 1
        self.previewed_frames = coarse.shape[1]
        return Request(
            id=-(self.id * 256 + self.previews),
            text=self.text,
            text_ids=self.text_ids,
            options=self.options,
            voice=self.voice,
            max_semantic_tokens=self.max_semantic_tokens,
            after=self.after,
            preset=self.preset,
            preview_of=self,
            stage=StageName.FINE,
            semantic=list(self.semantic),
            coarse=coarse,
        )

    def past(self, stage: StageName) -> bool:
        """Whether the request has left ``stage`` (or become final before it got there)."""
        return self.stage > stage or self.status.final

    def restart(self) -> None:
        """Forget what its stage produced so far, to wait for the stage and run it again."""
        if self.stage is StageName.SEMANTIC:
            self.semantic.clear()
        elif self.stage is StageName.COARSE:
            self.coarse = None
        elif self.stage is StageName.FINE:
            self.fine = None
        else:
            self.audio = None
        self.status = Status.WAITING

    def mark(self, stage: str) -> None:
        """Record that ``stage`` did work for this request now (first and last time)."""
        now = time.perf_counter()
        span = self.trace.setdefault(stage, [now, now])
        span[1] = now

    def speech(self, sample_rate: int) -> Speech:
        assert self.coarse is not None and self.fine is not None and self.audio is not None
        return Speech(
            semantic=np.asarray(self.semantic, dtype=np.int64),
            coarse=self.coarse,
            fine=self.fine,
            audio=self.audio,
            sample_rate=sample_rate,
        )

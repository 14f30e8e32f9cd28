"""Bark's bookkeeping between its models: prompts, histories and windows.

Pure functions over token lists and numpy arrays, with Bark's constants in one dataclass. Each
mirrors a step of transformers' ``BarkSemanticModel`` / ``BarkCoarseModel`` / ``BarkFineModel``
``generate`` for one request, including its rounding (Python's ``round``, half to even) and its
quirks (the coarse history loses its last two tokens), so that our runtime reproduces the
reference token for token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class BarkConstants:
    """Token layout and window sizes (transformers' ``BarkGenerationConfig`` defaults)."""

    text_encoding_offset: int = 10_048  # text token t enters the semantic model as t + offset
    text_pad_token: int = 129_595
    semantic_infer_token: int = 129_599
    semantic_vocab_size: int = 10_000
    semantic_pad_token: int = 10_000  # also the semantic EOS
    max_input_semantic_length: int = 256  # text tokens (and semantic history) read at most
    max_new_semantic_tokens: int = 768
    semantic_rate_hz: float = 49.9
    coarse_semantic_pad_token: int = 12_048
    coarse_infer_token: int = 12_050
    coarse_rate_hz: float = 75.0
    n_coarse_codebooks: int = 2
    max_coarse_input_length: int = 256
    max_coarse_history: int = 630
    sliding_window_len: int = 60
    max_fine_history_length: int = 512
    max_fine_input_length: int = 1024
    n_fine_codebooks: int = 8
    codebook_size: int = 1024
    sample_rate: int = 24_000

    @property
    def semantic_to_coarse_ratio(self) -> float:
        # coarse tokens (both codebooks, interleaved) per semantic token
        return self.coarse_rate_hz / self.semantic_rate_hz * self.n_coarse_codebooks

    @property
    def max_semantic_history(self) -> int:
        return int(np.floor(self.max_coarse_history / self.semantic_to_coarse_ratio))

    @property
    def samples_per_frame(self) -> int:
        return int(self.sample_rate / self.coarse_rate_hz)

    @classmethod
    def from_generation_config(cls, gen: Any) -> BarkConstants:
        """Read the constants from a transformers ``BarkGenerationConfig`` (dicts or objects)."""

        def get(sub: Any, key: str, default: Any) -> Any:
            if isinstance(sub, dict):
                return sub.get(key, default)
            return getattr(sub, key, default)

        d = cls()
        sem, coarse, fine = (
            gen.semantic_config,
            gen.coarse_acoustics_config,
            gen.fine_acoustics_config,
        )
        return cls(
            text_encoding_offset=get(sem, "text_encoding_offset", d.text_encoding_offset),
            text_pad_token=get(sem, "text_pad_token", d.text_pad_token),
            semantic_infer_token=get(sem, "semantic_infer_token", d.semantic_infer_token),
            semantic_vocab_size=get(sem, "semantic_vocab_size", d.semantic_vocab_size),
            semantic_pad_token=get(sem, "eos_token_id", d.semantic_pad_token),
            max_input_semantic_length=get(
                sem, "max_input_semantic_length", d.max_input_semantic_length
            ),
            max_new_semantic_tokens=get(sem, "max_new_tokens", d.max_new_semantic_tokens),
            semantic_rate_hz=get(sem, "semantic_rate_hz", d.semantic_rate_hz),
            coarse_semantic_pad_token=get(
                coarse, "coarse_semantic_pad_token", d.coarse_semantic_pad_token
            ),
            coarse_infer_token=get(coarse, "coarse_infer_token", d.coarse_infer_token),
            coarse_rate_hz=get(coarse, "coarse_rate_hz", d.coarse_rate_hz),
            n_coarse_codebooks=get(coarse, "n_coarse_codebooks", d.n_coarse_codebooks),
            max_coarse_input_length=get(
                coarse, "max_coarse_input_length", d.max_coarse_input_length
            ),
            max_coarse_history=get(coarse, "max_coarse_history", d.max_coarse_history),
            sliding_window_len=get(coarse, "sliding_window_len", d.sliding_window_len),
            max_fine_history_length=get(fine, "max_fine_history_length", d.max_fine_history_length),
            max_fine_input_length=get(fine, "max_fine_input_length", d.max_fine_input_length),
            n_fine_codebooks=get(fine, "n_fine_codebooks", d.n_fine_codebooks),
            codebook_size=getattr(gen, "codebook_size", d.codebook_size),
            sample_rate=getattr(gen, "sample_rate", d.sample_rate),
        )


@dataclass(frozen=True)
class VoicePrompt:
    """A voice preset, as Bark's models read it (int64 arrays)."""

    semantic: np.ndarray  # (N,) semantic tokens in [0, 10000)
    coarse: np.ndarray  # (2, M) codes in [0, 1024)
    fine: np.ndarray  # (8, M) codes in [0, 1024)

    @classmethod
    def from_preset(cls, preset: dict[str, np.ndarray]) -> VoicePrompt:
        return cls(
            semantic=np.asarray(preset["semantic_prompt"], dtype=np.int64),
            coarse=np.asarray(preset["coarse_prompt"], dtype=np.int64),
            fine=np.asarray(preset["fine_prompt"], dtype=np.int64),
        )


def continue_voice(
    preset: VoicePrompt | None,
    semantic: np.ndarray | None,
    coarse: np.ndarray | None = None,
    fine: np.ndarray | None = None,
) -> VoicePrompt | None:
    """The prompt for a stream's next segment: the preset followed by the previous segment.

    Bark's long-form generation conditions each sentence on the previous one's tokens so that
    the voice does not drift. Here the history is the preset's tokens followed by the previous
    segment's (each model then keeps only the most recent part it reads). Pieces not yet known
    (``coarse``/``fine`` while the previous segment is still in those stages) are the preset's
    alone; each stage reads only its own pieces, taken when the request enters that stage.
    """
    if semantic is None:
        return preset
    empty2 = np.zeros((2, 0), dtype=np.int64)
    empty8 = np.zeros((8, 0), dtype=np.int64)
    base = preset or VoicePrompt(np.zeros(0, dtype=np.int64), empty2, empty8)

    def join(a: np.ndarray, b: np.ndarray | None, axis: int) -> np.ndarray:
        return a if b is None else np.concatenate([a, np.asarray(b, dtype=np.int64)], axis=axis)

    return VoicePrompt(
        semantic=join(base.semantic, np.asarray(semantic, dtype=np.int64), 0),
        coarse=join(base.coarse, coarse, 1),
        fine=join(base.fine, fine, 1),
    )


# -- semantic -------------------------------------------------------------------------------


def semantic_prompt(
    text_ids: list[int], voice: VoicePrompt | None, c: BarkConstants
) -> tuple[list[int], list[int]]:
    """The two 256-token rows whose embeddings Bark sums, then appends the infer token to.

    Returns (text row, history row): text ids shifted by the offset and padded with the text
    pad token; the voice's last 256 semantic tokens padded with the semantic pad token.
    """
    n = c.max_input_semantic_length
    text = [t + c.text_encoding_offset for t in text_ids[:n]]
    text += [c.text_pad_token] * (n - len(text))
    hist = [] if voice is None else [int(t) for t in voice.semantic[-n:]]
    hist += [c.semantic_pad_token] * (n - len(hist))
    return text, hist


# -- coarse ---------------------------------------------------------------------------------


def coarse_histories(voice: VoicePrompt | None, c: BarkConstants) -> tuple[list[int], list[int]]:
    """The voice's semantic and (flattened, offset) coarse histories, trimmed as Bark trims them."""
    if voice is None:
        return [], []
    ratio = c.semantic_to_coarse_ratio
    sem = [int(t) for t in voice.semantic]
    coarse = voice.coarse.copy()
    for n in range(1, coarse.shape[0]):
        coarse[n, :] += c.codebook_size * n
    flat = [int(t) + c.semantic_vocab_size for t in coarse.T.reshape(-1)]
    n_sem = min(
        c.max_semantic_history,
        len(sem) - len(sem) % 2,
        int(np.floor(len(flat) / ratio)),
    )
    n_coarse = int(round(n_sem * ratio))
    # Python slicing as in the reference, including x[-0:] == x
    sem = sem[-n_sem:]
    flat = flat[-n_coarse:]
    return sem, flat[:-2]  # "a bit of a hack for time alignment" (Bark)


def coarse_length(n_semantic: int, c: BarkConstants) -> int:
    """Coarse tokens (two per frame, interleaved) Bark generates for ``n_semantic`` tokens."""
    ratio = c.semantic_to_coarse_ratio
    frames = math.floor(
        np.float32(n_semantic) * np.float32(ratio) / np.float32(c.n_coarse_codebooks)
    )
    return int(round(frames * c.n_coarse_codebooks))


def coarse_window_prompt(
    semantic: list[int], base: int, coarse: list[int], generated: int, c: BarkConstants
) -> list[int]:
    """Input of the coarse model for the window that starts after ``generated`` tokens.

    ``semantic`` is the voice history followed by the request's semantic tokens, ``base`` the
    history's length, ``coarse`` the coarse history followed by the tokens generated so far.
    """
    idx = base + int(round(generated / c.semantic_to_coarse_ratio))
    window = semantic[max(0, idx - c.max_semantic_history) :][: c.max_coarse_input_length]
    window = window + [c.coarse_semantic_pad_token] * (c.max_coarse_input_length - len(window))
    return window + [c.coarse_infer_token] + coarse[-c.max_coarse_history :]


# -- fine -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinePlan:
    """Where the fine model's windows fall in a request's frame buffer."""

    n_history: int  # voice frames before the request's own
    n_pad: int  # frames of padding after them (short inputs)
    windows: list[tuple[int, int]]  # per window: (start, first frame it fills)


def fine_plan(n_frames: int, n_history: int, c: BarkConstants) -> FinePlan:
    L, H = c.max_fine_input_length, c.max_fine_history_length
    total = n_history + n_frames
    n_pad = max(0, L - total)
    total += n_pad
    n_loops = max(0, int(np.ceil((n_frames - (L - n_history)) / H))) + 1
    windows = []
    for n in range(n_loops):
        start = min(n * H, total - L)
        fill = min(n_history + n * H, total - H)
        windows.append((start, fill))
    return FinePlan(n_history, n_pad, windows)


def fine_input(coarse_codes: np.ndarray, voice: VoicePrompt | None, c: BarkConstants) -> np.ndarray:
    """Frame buffer (frames, 8): voice history, the coarse codes, the unknown codebooks padded."""
    T = coarse_codes.shape[1]
    x = np.full((T, c.n_fine_codebooks), c.codebook_size, dtype=np.int64)
    x[:, : c.n_coarse_codebooks] = coarse_codes.T
    if voice is not None:
        hist = voice.fine.T[-c.max_fine_history_length :]
        x = np.concatenate([hist.astype(np.int64), x], axis=0)
    if x.shape[0] < c.max_fine_input_length:
        pad = np.full((c.max_fine_input_length - x.shape[0], c.n_fine_codebooks), c.codebook_size)
        x = np.concatenate([x, pad], axis=0)
    return x

"""Typed settings, each with its default and what it does.

:class:`GenerationOptions` are per request (what a client may choose); :class:`EngineConfig` is
per engine (what an operator chooses). Both validate themselves and raise
:class:`~stream_engine.errors.InvalidOption` with a message that names the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

from .errors import InvalidOption


def _number(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidOption(f"{name} must be a finite number, got {value!r}")
    if isinstance(value, int) and abs(value) > 2**53:  # math.isfinite overflows on huge ints
        raise InvalidOption(
            f"{name} must be in [{lo}, {hi}], got a {value.bit_length()}-bit integer"
        )
    if not math.isfinite(value):
        raise InvalidOption(f"{name} must be a finite number, got {value!r}")
    if value < lo or value > hi or (lo_open and value == lo):
        bracket = "(" if lo_open else "["
        raise InvalidOption(f"{name} must be in {bracket}{lo}, {hi}], got {value!r}")
    return float(value)


def _integer(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidOption(f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise InvalidOption(f"{name} must be in [{lo}, {hi}], got {value!r}")
    return value


@dataclass(frozen=True)
class GenerationOptions:
    """How one request is generated. Defaults are Bark's own (``generate_audio``)."""

    text_temp: float = 0.7  # semantic model temperature (Bark's text_temp)
    coarse_temp: float = 0.7  # coarse model temperature (Bark's waveform_temp)
    fine_temp: float = 0.5  # fine model temperature; 1.0 means argmax, as in transformers
    top_k: int | None = None  # keep the k likeliest tokens (semantic and coarse); None is off
    top_p: float | None = None  # nucleus sampling (semantic and coarse); None is off
    min_eos_p: float | None = None  # end when P(EOS) exceeds this (Bark suggests 0.05-0.2)
    max_semantic_tokens: int | None = None  # cap on semantic tokens; None: 768 (rule for random:*)
    seed: int | None = None  # makes sampling reproducible; None draws one
    greedy: bool = False  # argmax everywhere (semantic, coarse and fine): the exactness mode

    def __post_init__(self) -> None:
        _number("text_temp", self.text_temp, 0.0, 5.0, lo_open=True)
        _number("coarse_temp", self.coarse_temp, 0.0, 5.0, lo_open=True)
        _number("fine_temp", self.fine_temp, 0.0, 5.0, lo_open=True)
        if self.top_k is not None:
            _integer("top_k", self.top_k, 1, 1_000_000)
        if self.top_p is not None:
            _number("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        if self.min_eos_p is not None:
            _number("min_eos_p", self.min_eos_p, 0.0, 1.0, lo_open=True)
        if self.max_semantic_tokens is not None:
            _integer("max_semantic_tokens", self.max_semantic_tokens, 1, 768)
        if self.seed is not None:
            _integer("seed", self.seed, 0, 2**31 - 1)
        if not isinstance(self.greedy, bool):
            raise InvalidOption(f"greedy must be true or false, got {self.greedy!r}")

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> GenerationOptions:
        """Build from keyword options, accepting Bark's ``waveform_temp`` for ``coarse_temp``."""
        options = dict(options)
        if "waveform_temp" in options:
            options["coarse_temp"] = options.pop("waveform_temp")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise InvalidOption(f"unknown option(s) {unknown}; known: {sorted(known)}")
        return cls(**options)

    def with_seed(self, seed: int) -> GenerationOptions:
        return replace(self, seed=seed)


CPU_DECODE_KERNELS = ("auto", "avx2", "onednn", "mkl")  # see stream_engine.bark.cpu_kernels


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs. Sizes are fixed at start: caches and buffers are allocated once."""

    semantic_slots: int = 8  # requests the semantic stage decodes together
    coarse_slots: int = 8  # requests the coarse stage decodes together
    fine_batch: int = 8  # requests whose fine windows run in one forward pass
    codec_batch: int = 4  # requests decoded by EnCodec per step
    attn: str = "sdpa"  # "sdpa", "eager" or "flash_attention_2" (CUDA + flash-attn only)
    cuda_graphs: bool = True  # on CUDA: capture decode steps per batch-size bucket
    # on CPU in float32, the kernels of decode steps (stream_engine.bark.cpu_kernels): "avx2"
    # (linears near the memory bandwidth and a per-slot attention; built on first use),
    # "onednn" (a packed copy of the weights), "mkl" (plain F.linear) or "auto" (avx2 if it
    # builds here, else onednn)
    cpu_decode_kernel: str = "auto"
    max_queue: int = 256  # requests waiting for a stage before submit() raises Busy

    def __post_init__(self) -> None:
        for name in ("semantic_slots", "coarse_slots", "fine_batch", "codec_batch", "max_queue"):
            _integer(name, getattr(self, name), 1, 4096)
        if self.attn not in ("sdpa", "eager", "flash_attention_2"):
            raise InvalidOption(f"attn must be sdpa, eager or flash_attention_2, got {self.attn!r}")
        if self.cpu_decode_kernel not in CPU_DECODE_KERNELS:
            raise InvalidOption(
                f"cpu_decode_kernel must be one of {CPU_DECODE_KERNELS}, "
                f"got {self.cpu_decode_kernel!r}"
            )


@dataclass(frozen=True)
class ServerConfig:
    """How the server listens and what it allows each client (see docs/protocol.md)."""

    host: str = "127.0.0.1"
    port: int = 8765  # 0 picks a free port (tests)
    max_connections: int = 64  # WebSocket connections and speech requests open at once, in all
    # open WebSocket connections from one client address (None: no limit; a game server or a
    # proxy carries many players' connections from one address)
    max_connections_per_ip: int | None = None
    # proxies whose X-Forwarded-For / X-Forwarded-Proto are believed (uvicorn's
    # forwarded_allow_ips: addresses, networks, or "*"); empty: none, the peer is the client
    forwarded_allow_ips: tuple[str, ...] = ()
    max_message_bytes: int = 64 * 1024  # larger client frames close the connection with 1009
    max_unsent_bytes: int = 8 * 1024 * 1024  # audio queued for a client that does not read
    token: str | None = None  # bearer token for /v1/* (Authorization header; /v1/tts: ?token=)
    allowed_origins: tuple[str, ...] | None = None  # browser Origins allowed; None: any
    shutdown_timeout_s: float = 10.0  # on SIGTERM: time streams get to finish
    continuity: bool = True  # condition each segment on the previous one's tokens
    # early audio (streams that ask for it): a preview at the first coarse window's end, then
    # one per this many new coarse frames (75 = 1 s of audio); each costs a fine and a codec pass
    early_audio_frames: int = 75
    voices_dir: str | None = None  # users' voices (NAME.npz), loaded, added and deleted here
    # other names for voices, for the speech endpoint: (("alloy", "v2/en_speaker_6"), ...)
    voice_aliases: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        _integer("port", self.port, 0, 65535)
        _integer("max_connections", self.max_connections, 1, 1_000_000)
        if self.max_connections_per_ip is not None:
            _integer("max_connections_per_ip", self.max_connections_per_ip, 1, 1_000_000)
        _integer("max_message_bytes", self.max_message_bytes, 1024, 64 * 1024 * 1024)
        _integer("max_unsent_bytes", self.max_unsent_bytes, 64 * 1024, 1024 * 1024 * 1024)
        _number("shutdown_timeout_s", self.shutdown_timeout_s, 0.0, 3600.0)
        _integer("early_audio_frames", self.early_audio_frames, 1, 100_000)
        if self.token is not None and (not isinstance(self.token, str) or not self.token):
            raise InvalidOption("token must be a non-empty string")

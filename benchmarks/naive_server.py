"""A naive streaming TTS server: what wrapping ``BarkModel.generate`` in a WebSocket looks like.

The baseline for ``benchmarks/load.py``. It speaks the subset of protocol v1
(``docs/protocol.md``) that the load generator uses, so the same client drives it and our
server: ``hello`` on connect; ``speak`` (``id``, ``text``, ``final``, and on the opening
message ``voice``, ``format`` = ``pcm_s16le``, ``sample_rate`` = the model's rate) answered by
``started``; then per sentence ``segment``, binary audio frames (the v1 header, 100 ms of
samples each), ``segment_end``; ``done`` after the last sentence; ``cancel`` answered by
``cancelled``. Anything else is an ``error`` with code ``bad_request`` or
``unsupported_format``.

What makes it naive is how it synthesizes, the way a thin wrapper around transformers does:

* text is cut into sentences (after ``.``, ``!`` or ``?`` and whitespace); each sentence is
  synthesized as soon as it is complete, the rest of the paragraph when ``final`` comes;
* each sentence is one ``BarkModel.generate`` call on the engine's loaded HF model (the same
  weights and processor as our engine), with the engine's default sampling settings and, for
  ``random:*`` models, the same semantic cap per text as our engine
  (``random_model_semantic_tokens``, passed as ``semantic_max_new_tokens``);
* calls run one at a time, in arrival order, on a single worker thread (the lock every naive
  wrapper has: one model, one request), and a sentence's audio is sent when its call returns.

Run on its own (``python benchmarks/naive_server.py --model random:tiny --port 8766``) or
started in-process with :class:`NaiveServer` (what ``load.py`` does).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import itertools
import json
import logging
import re
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from end_to_end import quiet_known_transformers_logs, reference_sampling_kwargs, to_device
from websockets.asyncio.server import Server as WsServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from stream_engine import Engine
from stream_engine.engine import random_model_semantic_tokens

HEADER = struct.Struct("<III")  # stream, segment index, sequence number (as protocol v1)
FRAME_S = 0.1  # audio per binary frame
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> tuple[list[str], str]:
    """Complete sentences in ``text`` (each ended by . ! or ? and whitespace), and the rest."""
    parts = _SENTENCE_END.split(text)
    rest = parts.pop()
    return [p.strip() for p in parts if p.strip()], rest


class Synthesizer:
    """One ``BarkModel.generate`` call per text, one call at a time (a one-thread executor)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.hf = engine.loaded.model
        self.processor = engine.loaded.processor
        self.kwargs = reference_sampling_kwargs()
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="naive")
        self.calls = 0
        quiet_known_transformers_logs()

    def semantic_cap(self, text: str) -> int | None:
        """The engine's cap for this text (random models never end by themselves)."""
        if self.engine.is_random:
            return random_model_semantic_tokens(text, self.engine.consts)
        return None

    def generate(self, text: str, voice: str | None) -> np.ndarray:
        """Blocking: float32 audio at the model's rate."""
        inputs = self.processor(text, voice_preset=voice) if voice else self.processor(text)
        kwargs = dict(self.kwargs)
        cap = self.semantic_cap(text)
        if cap is not None:
            kwargs["semantic_max_new_tokens"] = cap
        with torch.inference_mode():
            out = self.hf.generate(**to_device(dict(inputs), self.engine.device), **kwargs)
        self.calls += 1
        return out[0].float().cpu().numpy()

    async def __call__(self, text: str, voice: str | None) -> np.ndarray:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self.generate, text, voice)

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


@dataclass
class _Stream:
    id: str | int
    number: int
    voice: str | None
    started_at: float = field(default_factory=time.perf_counter)
    buffer: str = ""
    final: bool = False
    sentences: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None


class NaiveServer:
    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 0) -> None:
        self.engine = engine
        self.host, self._port = host, port
        self.synth = Synthesizer(engine)
        self._ws: WsServer | None = None

    async def start(self) -> None:
        self._ws = await serve(self._handle, self.host, self._port, max_size=2**20)

    @property
    def port(self) -> int:
        assert self._ws is not None
        return int(next(iter(self._ws.sockets)).getsockname()[1])

    async def stop(self) -> None:
        if self._ws is not None:
            self._ws.close()
            await self._ws.wait_closed()
        await asyncio.to_thread(self.synth.close)

    def hello(self) -> dict[str, Any]:
        rate = self.engine.sample_rate
        return {
            "type": "hello",
            "protocol": 1,
            "model": self.engine.name,
            "sample_rate": rate,
            "voices": sorted(self.engine.voices),
            "formats": ["pcm_s16le"],
            "sample_rates": {"pcm_s16le": [rate]},
            "limits": {},
        }

    async def _handle(self, ws: ServerConnection) -> None:
        streams: dict[str | int, _Stream] = {}
        numbers = itertools.count(1)
        send_lock = asyncio.Lock()  # one stream's frames are not split by another's message

        async def send(msg: dict[str, Any]) -> None:
            async with send_lock:
                await ws.send(json.dumps(msg))

        async def error(id: Any, code: str, message: str) -> None:
            s = streams.pop(id, None) if id is not None else None
            if s is not None and s.task is not None:
                s.task.cancel()
            await send({"type": "error", "id": id, "code": code, "message": message})

        async def speak_stream(s: _Stream) -> None:
            rate, index, seq, audio_ms = self.engine.sample_rate, 0, 0, 0.0
            first_audio: float | None = None
            while (sentence := await s.sentences.get()) is not None:
                try:
                    audio = await self.synth(sentence, s.voice)
                except Exception:
                    logging.exception("generate failed")
                    streams.pop(s.id, None)
                    await send({"type": "error", "id": s.id, "code": "internal", "message": ""})
                    return
                pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes()
                step = int(rate * FRAME_S) * 2
                async with send_lock:
                    seg = {"type": "segment", "id": s.id, "index": index, "text": sentence}
                    await ws.send(json.dumps(seg))
                    for i in range(0, len(pcm), step):
                        await ws.send(HEADER.pack(s.number, index, seq) + pcm[i : i + step])
                        seq += 1
                        if first_audio is None:
                            first_audio = time.perf_counter()
                    ms = len(audio) / rate * 1000
                    audio_ms += ms
                    end = {"type": "segment_end", "id": s.id, "index": index, "audio_ms": ms}
                    await ws.send(json.dumps(end))
                index += 1
            wall = time.perf_counter() - s.started_at
            ttfa = None if first_audio is None else (first_audio - s.started_at) * 1000
            rtf = wall / (audio_ms / 1000) if audio_ms > 0 else None
            streams.pop(s.id, None)
            done = {"type": "done", "id": s.id, "audio_ms": audio_ms, "ttfa_ms": ttfa, "rtf": rtf}
            await send(done)

        def push(s: _Stream, text: str, final: bool) -> None:
            sentences, s.buffer = split_sentences(s.buffer + text)
            if final:
                s.final = True
                if s.buffer.strip():
                    sentences.append(s.buffer.strip())
                s.buffer = ""
            for sentence in sentences:
                s.sentences.put_nowait(sentence)
            if final:
                s.sentences.put_nowait(None)

        try:
            await send(self.hello())
            async for frame in ws:
                if not isinstance(frame, str):
                    await error(None, "bad_request", "binary frames are not accepted")
                    continue
                try:
                    msg = json.loads(frame)
                    kind, id = msg["type"], msg["id"]
                    assert isinstance(id, str | int) and not isinstance(id, bool)
                except (ValueError, KeyError, TypeError, AssertionError):
                    await error(None, "bad_request", "not a message this server understands")
                    continue
                s = streams.get(id)
                if kind == "cancel":
                    if s is not None:
                        del streams[id]
                        if s.task is not None:
                            s.task.cancel()
                        await send({"type": "cancelled", "id": id})
                elif kind != "speak":
                    await error(id, "bad_request", f"this server does not do {kind!r}")
                elif s is None:
                    voice = msg.get("voice")
                    if msg.get("format") not in (None, "pcm_s16le") or msg.get(
                        "sample_rate"
                    ) not in (None, self.engine.sample_rate):
                        await error(id, "unsupported_format", "pcm_s16le at the model's rate")
                        continue
                    if voice is not None and voice not in self.engine.voices:
                        await error(id, "unknown_voice", "see hello.voices")
                        continue
                    s = streams[id] = _Stream(id, next(numbers), voice)
                    rate = self.engine.sample_rate
                    await send(
                        {
                            "type": "started",
                            "id": id,
                            "stream": s.number,
                            "voice": voice,
                            "format": "pcm_s16le",
                            "sample_rate": rate,
                        }
                    )
                    s.task = asyncio.create_task(speak_stream(s))
                    push(s, str(msg.get("text", "")), bool(msg.get("final", False)))
                elif s.final:
                    await error(id, "bad_request", "speak after final")
                else:
                    push(s, str(msg.get("text", "")), bool(msg.get("final", False)))
        except ConnectionClosed:
            pass
        finally:
            for s in streams.values():
                if s.task is not None:
                    s.task.cancel()


async def _serve(args: argparse.Namespace) -> None:
    engine = Engine.load(args.model, device=args.device, dtype=args.dtype)
    server = NaiveServer(engine, args.host, args.port)
    await server.start()
    logging.info("naive server for %s on ws://%s:%d", args.model, args.host, server.port)
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="random:small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8766)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()

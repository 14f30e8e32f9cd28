"""A LiveKit Agents (1.x) TTS plugin for a stream-engine server, over protocol v1.

    from livekit.agents import AgentSession
    from stream_engine.integrations.livekit import TTS

    session = AgentSession(tts=TTS(url="ws://127.0.0.1:8765", voice="v2/en_speaker_6"), ...)

:meth:`TTS.stream` gives a :class:`SynthesizeStream`: one protocol stream (``docs/protocol.md``)
on a pooled connection. ``push_text`` sends ``speak`` (the first one opens the stream with the
voice, ``pcm_s16le`` at the TTS's sample rate, Bark's ``options`` and ``early_audio``),
``flush`` sends ``flush``, ``end_input`` sends ``speak`` with ``final``, and ``aclose`` (or
any failure) sends ``cancel``. :meth:`TTS.synthesize` gives a :class:`ChunkedStream`: one
stream whose text is all in its first ``speak``. All protocol parsing and building is
:class:`~stream_engine.protocol.ClientSession`'s; this module only moves frames.

Timed transcripts are sentence level, as Bark gives them: each server ``segment`` becomes one
``TimedString`` (its text, ``start_time`` = seconds of this stream's audio before it), pushed
just before its audio. No word timings are invented. A LiveKit stream carries one LiveKit
segment (1.8 drops text pushed after a flush into a second one), so the server's sentences
are not LiveKit segments.

Pooling: ``livekit.agents.utils.ConnectionPool`` with one WebSocket per active stream; a
connection goes back to the pool, for the next stream to reuse, only once its stream has
ended (``done`` or a stream ``error``). A stream closed early is cancelled in the background:
``cancel`` is sent, and the connection is returned when ``cancelled`` arrives (or dropped if
it does not within ``CANCEL_TIMEOUT``), so ``aclose`` never waits on the server and the next
stream never sees frames of an old one. Why not one multiplexed connection: the pool is the
framework's own (prewarm, reuse metrics, discarding a failed connection), a connection that
fails ends one stream rather than all of them, one slow stream cannot hold up the others'
frames, and the server's per-connection ``max_streams`` does not cap how many streams an
agent runs at once. The cost is one WebSocket per concurrent stream.

Errors surface as LiveKit's: a server ``error`` as ``APIStatusError`` (``status_code`` as the
HTTP API maps the protocol's code: 400 for ``bad_request``, ``unknown_voice``,
``unsupported_format``, ``text_too_long``, not retried; 429 ``limit``, 503 ``busy``, 500
``internal``, retried; ``body`` = the code), transport failures as ``APIConnectionError`` /
``APITimeoutError``. Every retry is a new protocol stream with a new id.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator
from typing import Any

from livekit.agents import (
    APIConnectionError,
    APIConnectOptions,
    APIStatusError,
    APITimeoutError,
    tts,
    utils,
)
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS, NOT_GIVEN, NotGivenOr, TimedString
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from ..errors import HTTP_STATUS, ServerError
from ..protocol import (
    AudioReceived,
    ClientSession,
    SegmentStarted,
    StreamCancelled,
    StreamDone,
    StreamError,
    Violation,
    endpoint,
)

__all__ = ["TTS", "ChunkedStream", "SynthesizeStream"]

FORMAT = "pcm_s16le"
CANCEL_TIMEOUT = 5.0  # seconds to wait for ``cancelled`` before dropping the connection


def _status_error(error: StreamError) -> APIStatusError:
    return APIStatusError(
        f"{error.code}: {error.message}",
        status_code=HTTP_STATUS.get(error.code, 500),
        request_id=None if error.id is None else str(error.id),
        body=error.code,
    )


class _Connection:
    """One WebSocket and its protocol session; the pool lends it to one stream at a time."""

    def __init__(self, ws: ClientConnection, session: ClientSession) -> None:
        self.ws = ws
        self.session = session
        self.broken = False  # not to be reused

    async def send(self) -> None:
        try:
            for frame in self.session.data_to_send():
                await self.ws.send(frame)
        except (ConnectionClosed, OSError) as e:
            self.broken = True
            raise APIConnectionError("the connection to the server was lost") from e

    async def receive(self) -> list[Any]:
        """The protocol events of the next frame."""
        try:
            frame = await self.ws.recv()
        except (ConnectionClosed, OSError) as e:
            self.broken = True
            self.session.connection_lost()
            raise APIConnectionError("the connection to the server was lost") from e
        if isinstance(frame, bytes):
            return self.session.receive_bytes(frame)
        return self.session.receive_text(frame)


class _Utterance:
    """One protocol stream on a connection: one attempt of a LiveKit stream."""

    def __init__(self, tts: TTS, conn: _Connection) -> None:
        self.tts = tts
        self.conn = conn
        self.id = utils.shortuuid("lk_")  # fresh for every attempt
        self.opened = False
        self.ended = False
        self.audio_bytes = 0  # audio pushed so far: the time base of the transcripts
        # for LiveKit's TTS metrics
        self.acquire_time = tts._pool.last_acquire_time
        self.connection_reused = tts._pool.last_connection_reused

    def speak(self, text: str, *, final: bool = False) -> None:
        session = self.conn.session
        if self.opened:
            if session.is_open(self.id):  # else it has ended: its error is on its way up
                session.speak(self.id, text, final=final)
            return
        o = self.tts._opts
        session.speak(
            self.id,
            text,
            final=final,
            voice=o["voice"],
            format=FORMAT,
            sample_rate=self.tts.sample_rate,
            options=o["options"],
            early_audio=o["early_audio"],
        )
        self.opened = True

    def flush(self) -> None:
        self.conn.session.flush(self.id)

    async def receive(self, emitter: tts.AudioEmitter) -> None:
        """Pass the stream's audio and transcripts to ``emitter`` until ``done``."""
        while not self.ended:
            for event in await self.conn.receive():
                self._on(event, emitter)
            await self.conn.send()  # e.g. the cancel of a stream the server opened unasked

    def _on(self, event: Any, emitter: tts.AudioEmitter) -> None:
        if isinstance(event, Violation):
            self.conn.broken = True
            raise APIConnectionError(f"the server broke the protocol: {event.what}")
        if isinstance(event, StreamError) and event.id is None:  # about the connection
            self.conn.broken = True
            raise _status_error(event)
        if getattr(event, "id", None) != self.id:
            return
        if isinstance(event, SegmentStarted):
            start = self.audio_bytes / 2 / self.tts.sample_rate
            emitter.push_timed_transcript(TimedString(event.text + " ", start_time=start))
        elif isinstance(event, AudioReceived):
            emitter.push(event.payload)
            self.audio_bytes += len(event.payload)
        elif isinstance(event, StreamDone):
            self.ended = True
        elif isinstance(event, StreamError):
            self.ended = True
            raise _status_error(event)
        elif isinstance(event, StreamCancelled):  # the server's own, e.g. shutting down
            self.ended = self.conn.broken = True
            raise APIConnectionError("the server cancelled the stream")


class TTS(tts.TTS):
    """Bark on a stream-engine server (``url``: ``ws://HOST:PORT``, or the full endpoint).

    ``voice``: a name from the server's ``hello.voices`` (None: no voice prompt); ``token``:
    the server's bearer token; ``sample_rate``: one the server offers for ``pcm_s16le``;
    ``options``: Bark's generation options (``seed``, ``text_temp``, ...); ``early_audio``:
    a sentence's audio may start before it is generated whole.
    """

    def __init__(
        self,
        *,
        url: str = "ws://127.0.0.1:8765",
        voice: str | None = None,
        token: str | None = None,
        sample_rate: int = 24000,
        options: dict[str, Any] | None = None,
        early_audio: bool = False,
    ) -> None:
        super().__init__(
            capabilities=tts.TTSCapabilities(streaming=True, aligned_transcript=True),
            sample_rate=sample_rate,
            num_channels=1,
        )
        self._url = endpoint(url)
        self._token = token
        self._opts: dict[str, Any] = {
            "voice": voice,
            "options": dict(options) if options else None,
            "early_audio": early_audio,
        }
        self._model = "bark"
        self._pool = utils.ConnectionPool[_Connection](
            connect_cb=self._connect, close_cb=self._disconnect
        )
        self._cancelling: set[asyncio.Task[None]] = set()
        self._streams: weakref.WeakSet[ChunkedStream | SynthesizeStream] = weakref.WeakSet()

    @property
    def model(self) -> str:
        return self._model  # the server's model, once a connection has said it

    @property
    def provider(self) -> str:
        return "stream-engine"

    def update_options(
        self,
        *,
        voice: NotGivenOr[str | None] = NOT_GIVEN,
        options: NotGivenOr[dict[str, Any] | None] = NOT_GIVEN,
        early_audio: NotGivenOr[bool] = NOT_GIVEN,
    ) -> None:
        """Change what streams opened from now on use."""
        for key, value in (("voice", voice), ("options", options), ("early_audio", early_audio)):
            if utils.is_given(value):
                self._opts[key] = value

    def synthesize(
        self, text: str, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> ChunkedStream:
        stream = ChunkedStream(tts=self, input_text=text, conn_options=conn_options)
        self._streams.add(stream)
        return stream

    def stream(
        self, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> SynthesizeStream:
        stream = SynthesizeStream(tts=self, conn_options=conn_options)
        self._streams.add(stream)
        return stream

    def prewarm(self) -> None:
        self._pool.prewarm()

    async def aclose(self) -> None:
        """Close the streams still open, let their cancels finish (each within
        ``CANCEL_TIMEOUT``), then close the connections."""
        for stream in list(self._streams):
            await stream.aclose()
        await asyncio.gather(*self._cancelling, return_exceptions=True)
        await self._pool.aclose()

    # -- connections ---------------------------------------------------------------------

    async def _connect(self, timeout: float) -> _Connection:
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else None
        ws: ClientConnection | None = None
        try:
            async with asyncio.timeout(timeout):
                ws = await ws_connect(self._url, additional_headers=headers, max_size=None)
                session = ClientSession()
                first = await ws.recv()
            try:
                hello = session.expect_hello(first)
            except ServerError as e:  # turned away (e.g. too many connections), or no hello
                raise _status_error(StreamError(None, e.code, e.message)) from None
            if self.sample_rate not in hello.sample_rates.get(FORMAT, ()):
                raise APIStatusError(
                    f"the server offers {FORMAT} at {hello.sample_rates.get(FORMAT)} Hz, "
                    f"not at {self.sample_rate}",
                    status_code=400,
                    body="unsupported_format",
                )
            self._model = hello.model
            return _Connection(ws, session)
        except BaseException as e:
            if ws is not None:
                await ws.close()
            if isinstance(e, TimeoutError):
                raise APITimeoutError("connecting to the server timed out") from e
            if isinstance(e, InvalidStatus):
                raise APIStatusError(
                    "the server refused the connection",
                    status_code=e.response.status_code,
                    body=e.response.body,
                ) from e
            if isinstance(e, OSError | WebSocketException):
                raise APIConnectionError("could not connect to the server") from e
            raise

    async def _disconnect(self, conn: _Connection) -> None:
        await conn.ws.close()

    @contextlib.asynccontextmanager
    async def _utterance(self, conn_options: APIConnectOptions) -> AsyncIterator[_Utterance]:
        """A new protocol stream on a pooled connection; the connection goes back to the pool
        when the stream has ended, after a background cancel if it has not."""
        conn = await self._pool.get(timeout=conn_options.timeout)
        utterance = _Utterance(self, conn)
        try:
            yield utterance
        finally:
            if conn.broken:
                self._pool.remove(conn)
            elif utterance.ended or not utterance.opened:
                self._pool.put(conn)
            else:
                task = asyncio.create_task(self._cancel(utterance))
                self._cancelling.add(task)
                task.add_done_callback(self._cancelling.discard)

    async def _cancel(self, utterance: _Utterance) -> None:
        """Cancel a stream that is still open, and return its connection once it has ended."""
        conn = utterance.conn
        answered = False
        try:
            with contextlib.suppress(Exception):  # lost, or no answer in time: drop it
                conn.session.cancel(utterance.id)
                async with asyncio.timeout(CANCEL_TIMEOUT):
                    await conn.send()
                    while conn.session.is_open(utterance.id):
                        if any(isinstance(e, Violation) for e in await conn.receive()):
                            conn.broken = True
                        await conn.send()
                answered = True
        finally:
            if answered and not conn.broken:
                self._pool.put(conn)
            else:
                self._pool.remove(conn)


class ChunkedStream(tts.ChunkedStream):
    """``synthesize(text)``: one protocol stream, all its text in its opening ``speak``."""

    def __init__(self, *, tts: TTS, input_text: str, conn_options: APIConnectOptions) -> None:
        super().__init__(tts=tts, input_text=input_text, conn_options=conn_options)
        self._tts: TTS = tts

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        async with self._tts._utterance(self._conn_options) as utterance:
            output_emitter.initialize(
                request_id=utterance.id,
                sample_rate=self._tts.sample_rate,
                num_channels=1,
                mime_type="audio/pcm",
            )
            self._acquire_time = utterance.acquire_time
            self._connection_reused = utterance.connection_reused
            utterance.speak(self._input_text, final=True)
            await utterance.conn.send()
            await utterance.receive(output_emitter)


class SynthesizeStream(tts.SynthesizeStream):
    """``stream()``: one protocol stream, its text sent as it is pushed."""

    def __init__(self, *, tts: TTS, conn_options: APIConnectOptions) -> None:
        super().__init__(tts=tts, conn_options=conn_options)
        self._tts: TTS = tts

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        async with self._tts._utterance(self._conn_options) as utterance:
            output_emitter.initialize(
                request_id=utterance.id,
                sample_rate=self._tts.sample_rate,
                num_channels=1,
                mime_type="audio/pcm",
                stream=True,
            )
            self._acquire_time = utterance.acquire_time
            self._connection_reused = utterance.connection_reused

            async def send_input() -> None:
                async for data in self._input_ch:
                    if isinstance(data, self._FlushSentinel):
                        utterance.flush()
                    else:
                        if not utterance.opened:
                            output_emitter.start_segment(segment_id=utterance.id)
                            self._mark_started()
                        utterance.speak(data)
                    await utterance.conn.send()
                if utterance.opened:
                    utterance.speak("", final=True)
                    await utterance.conn.send()

            sender = asyncio.create_task(send_input())
            receiver = asyncio.create_task(utterance.receive(output_emitter))
            try:
                await asyncio.wait((sender, receiver), return_when=asyncio.FIRST_COMPLETED)
                if receiver.done():
                    receiver.result()  # the server's error, before all the text is in
                await sender
                if utterance.opened:  # else: no text, no stream, nothing to wait for
                    await receiver
            finally:
                await utils.aio.cancel_and_wait(sender, receiver)

"""Pipecat (``pipecat-ai`` 1.x) text-to-speech that speaks through a stream-engine server.

::

    from stream_engine.integrations.pipecat import StreamEngineTTSService

    tts = StreamEngineTTSService(url="ws://127.0.0.1:8765", voice="v2/en_speaker_6")
    pipeline = Pipeline([transport.input(), stt, user_agg, llm, tts, transport.output(), ...])

One WebSocket connection (protocol v1, ``docs/protocol.md``) per service; one protocol stream
per Pipecat audio context, i.e. per LLM turn or ``TTSSpeakFrame``, with the context id as the
stream id. The turn's text goes to the server as it is written (Pipecat's token mode: the
server cuts it into sentences, so Pipecat aggregates none), the end of the turn sends
``final``, an interruption sends ``cancel``. Audio comes back as 16-bit PCM at the pipeline's
output rate (the server resamples) and goes out as ``TTSAudioRawFrame`` between the turn's
``TTSStartedFrame`` and ``TTSStoppedFrame``. Pipecat's base class does the rest: audio
contexts played in order, TTFB, reconnecting after a lost connection.

Every protocol message is built and read by :class:`~stream_engine.protocol.ClientSession`
(a new one per connection); this module only moves its frames and maps its events to frames.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from loguru import logger
from websockets.protocol import State

with warnings.catch_warnings():
    # Pipecat 1.14 warns about itself on import: pipecat.audio.utils imports audioop
    # (deprecated since Python 3.11), and tts_service subclasses its own deprecated
    # AudioContextTTSService. Nothing a user of this module can act on.
    warnings.filterwarnings("ignore", "'audioop' is deprecated", DeprecationWarning)
    warnings.filterwarnings("ignore", "`AudioContextTTSService` is deprecated", DeprecationWarning)
    from pipecat.frames.frames import ErrorFrame, Frame, TTSAudioRawFrame, TTSStoppedFrame
    from pipecat.processors.frame_processor import FrameProcessorSetup
    from pipecat.services.settings import TTSSettings
    from pipecat.services.tts_service import TextAggregationMode, WebsocketTTSService
    from pipecat.utils.errors import ErrorCategory

from ..errors import ServerError
from ..protocol import (
    AudioReceived,
    ClientSession,
    StreamCancelled,
    StreamDone,
    StreamError,
    Violation,
    endpoint,
)
from ..protocol.client import Event

FORMAT = "pcm_s16le"  # what Pipecat's audio frames carry

# The protocol's error codes as Pipecat error categories. A permanent category (INVALID_REQUEST)
# makes the service unusable until its settings change (a TTSUpdateSettingsFrame with another
# voice, say): every stream would fail the same way until then.
CATEGORIES: dict[str, ErrorCategory] = {
    "bad_request": ErrorCategory.INVALID_REQUEST,
    "unknown_voice": ErrorCategory.INVALID_REQUEST,
    "unsupported_format": ErrorCategory.INVALID_REQUEST,
    "text_too_long": ErrorCategory.APPLICATION,  # this text; the next turn may be fine
    "busy": ErrorCategory.RATE_LIMIT,
    "limit": ErrorCategory.RATE_LIMIT,
    "internal": ErrorCategory.SERVER,
}


class StreamEngineTTSService(WebsocketTTSService):
    """Pipecat TTS service for a stream-engine server (see the module docstring)."""

    def __init__(
        self,
        *,
        url: str,
        voice: str | None = None,
        token: str | None = None,
        sample_rate: int | None = None,
        options: Mapping[str, Any] | None = None,
        early_audio: bool | None = None,
        stop_frame_timeout_s: float = 60.0,
        hello_timeout_s: float = 10.0,
        **kwargs: Any,
    ) -> None:
        """Create the service; it connects when the pipeline sets it up.

        Args:
            url: the server, ``ws://HOST:PORT`` (``/v1/tts`` is added) or the endpoint's URL.
            voice: a name from the server's ``hello.voices``; None: no voice preset. Changed
                with ``TTSUpdateSettingsFrame(delta=TTSSettings(voice=...))``, it applies from
                the next turn on (a stream keeps the voice it opened with).
            token: the server's ``--token``, sent as ``Authorization: Bearer``.
            sample_rate: the audio's rate; None: the pipeline's ``audio_out_sample_rate``.
                It must be one the server offers for PCM (``hello.sample_rates``; 8000, 16000,
                22050, 24000 and 48000 by default), or connecting fails with an ErrorFrame.
            options: Bark's generation options for every stream (``docs/protocol.md``:
                ``text_temp``, ``waveform_temp``, ``top_k``, ``top_p``, ``min_eos_p``,
                ``seed``); the server checks them.
            early_audio: the server may send a segment's audio before the whole segment is
                generated (sooner first audio, close to but not exactly Bark's audio).
            stop_frame_timeout_s: how long Pipecat waits for a turn's next audio before it
                ends the turn and drops what comes later (Pipecat's default is 3 s). Bark
                makes a sentence's audio in one piece, which on a CPU can take longer than
                that; the server always ends a stream (``done``, ``cancelled`` or
                ``error``), so a generous value only matters if the server goes silent.
            hello_timeout_s: how long to wait for the server's ``hello`` after connecting.
            **kwargs: for Pipecat's ``WebsocketTTSService`` (``reconnect_on_error``,
                ``push_silence_after_stop``, ``text_transforms``, ...).
        """
        super().__init__(
            text_aggregation_mode=TextAggregationMode.TOKEN,  # the server segments
            push_start_frame=True,  # the base opens each audio context with TTSStartedFrame
            push_stop_frames=True,  # ours come on done; the base's only if ours did not
            stop_frame_timeout_s=stop_frame_timeout_s,
            sample_rate=sample_rate,
            settings=TTSSettings(model=None, voice=voice, language=None),
            **kwargs,
        )
        self._url = endpoint(url)
        self._token = token
        self._options = dict(options) if options is not None else None
        self._early_audio = early_audio
        self._hello_timeout_s = hello_timeout_s
        self._receive_task: asyncio.Task[None] | None = None
        self._send_lock = asyncio.Lock()  # frames leave in the order the session made them
        # per connection:
        self._session: ClientSession | None = None
        self._writing: set[str] = set()  # contexts with a stream open and final not yet sent
        # contexts whose text has nowhere to go (their stream ended early, or could not be
        # opened): the rest of their text is dropped and they end with their turn
        self._failed: set[str] = set()

    def can_generate_metrics(self) -> bool:
        return True

    # -- connection ---------------------------------------------------------------------------

    # FrameProcessor.setup narrows BaseObject.setup's argument; mypy flags every re-declaration
    async def setup(self, setup: FrameProcessorSetup) -> None:  # type: ignore[override]
        await super().setup(setup)  # sets self.sample_rate: ours, or the pipeline's
        await self._connect()

    async def _connect(self) -> None:
        await super()._connect()
        await self._connect_websocket()
        if self._websocket is not None and (
            self._receive_task is None or self._receive_task.done()
        ):
            self._receive_task = self.create_task(self._receive_task_handler(self._report_error))

    async def _disconnect(self) -> None:
        await super()._disconnect()  # ends the open audio contexts
        if self._receive_task is not None:
            await self.cancel_task(self._receive_task)
            self._receive_task = None
        await self._disconnect_websocket()

    async def _connect_websocket(self) -> None:
        """Connect, read the ``hello`` and check that it offers our rate; a failure is an
        ErrorFrame (permanent for a rate the server does not offer or a rejected token)."""
        if self._websocket is not None and self._websocket.state is State.OPEN:
            return
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else None
        session = ClientSession()
        websocket = None
        try:
            websocket = await self._websocket_connect(self._url, additional_headers=headers)
            first = await asyncio.wait_for(websocket.recv(), self._hello_timeout_s)
            problem = self._check_hello(session, first)
        except Exception as e:
            problem = ErrorFrame(f"cannot connect to {self._url}: {e}", exception=e)
        if problem is None:
            self._websocket, self._session = websocket, session
            self._writing.clear()
            self._failed.clear()
            await self._call_event_handler("on_connected")
            return
        if websocket is not None:
            try:
                await websocket.close()
            except Exception as e:
                logger.debug(f"{self}: closing a refused connection: {e}")
        await self.push_error_frame(problem)
        await self._call_event_handler("on_connection_error", problem.error)

    def _check_hello(self, session: ClientSession, first: str | bytes) -> ErrorFrame | None:
        try:
            hello = session.expect_hello(first)
        except ServerError as e:  # turned away (e.g. too many connections), or no hello
            return ErrorFrame(
                f"{self._url} refused the connection: {e}", category=CATEGORIES.get(e.code)
            )
        offered = hello.sample_rates.get(FORMAT, ())
        if self.sample_rate not in offered:
            return ErrorFrame(
                f"{self._url} does not offer {FORMAT} at {self.sample_rate} Hz (it offers "
                f"{', '.join(map(str, offered)) or 'none'}); set the pipeline's "
                "audio_out_sample_rate, or the service's sample_rate, to one of those",
                category=ErrorCategory.INVALID_REQUEST,
            )
        return None

    async def _disconnect_websocket(self) -> None:
        websocket, session = self._websocket, self._session
        self._websocket, self._session = None, None
        self._writing.clear()
        self._failed.clear()
        try:
            await self.cancel_ttfb_metrics()  # no first audio is coming on this connection
            if session is not None:
                session.connection_lost()
            if websocket is not None:
                await websocket.close()
        except Exception as e:
            logger.warning(f"{self}: closing the connection: {e}")
        finally:
            await self._call_event_handler("on_disconnected")

    async def _send(self) -> None:
        """Send what the session has to send."""
        async with self._send_lock:
            if self._session is None or self._websocket is None:
                return
            for frame in self._session.data_to_send():
                await self._websocket.send(frame)

    # -- the server's frames ------------------------------------------------------------------

    async def _receive_messages(self) -> None:
        websocket, session = self._websocket, self._session
        if websocket is None or session is None:
            raise ConnectionError(f"not connected to {self._url}")
        async for frame in websocket:
            if isinstance(frame, bytes):
                events = session.receive_bytes(frame)
            else:
                events = session.receive_text(frame)
            for event in events:
                await self._handle_event(event)
            # e.g. the cancel of a stream that a speak crossing its stream's end opened
            await self._send()

    async def _handle_event(self, event: Event) -> None:
        if isinstance(event, AudioReceived):
            context_id = str(event.id)
            # the base drops it if the context is gone (interrupted) and not the turn's
            frame = TTSAudioRawFrame(event.payload, self.sample_rate, 1, context_id=context_id)
            await self.append_to_audio_context(context_id, frame)
        elif isinstance(event, StreamDone | StreamCancelled):
            await self._stream_ended(str(event.id))
        elif isinstance(event, StreamError):
            await self.cancel_ttfb_metrics()
            # first the error (a permanent one makes the service unusable, so the base does
            # not add its own "context completed with no audio" error), then the context ends
            await self.push_error_frame(
                ErrorFrame(
                    f"stream-engine {event.code}: {event.message}",
                    category=CATEGORIES.get(event.code),
                )
            )
            if event.id is not None:
                await self._stream_ended(str(event.id))
        elif isinstance(event, Violation):
            logger.warning(f"{self}: the server broke protocol v1: {event.what} (id {event.id})")

    async def _stream_ended(self, context_id: str) -> None:
        if context_id in self._writing:  # its turn is still being written: it ends with it
            self._writing.discard(context_id)
            self._failed.add(context_id)
        else:
            await self._end_context(context_id)

    async def _end_context(self, context_id: str) -> None:
        """End the audio context (after the audio already in it)."""
        if self.audio_context_available(context_id):
            await self.append_to_audio_context(context_id, TTSStoppedFrame(context_id=context_id))
            await self.remove_audio_context(context_id)

    # -- Pipecat's side -----------------------------------------------------------------------

    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame | None, None]:
        """Send ``text`` on the context's stream (opening it on the context's first text);
        its audio arrives on the receive task."""
        if context_id in self._failed:  # its stream has ended (and said why): nowhere to go
            yield None
            return
        if self._session is None and not self._reconnect_in_progress:
            await self._connect()
        session = self._session
        if session is None:
            self._failed.add(context_id)
            await self.push_error(
                f"not connected to {self._url}", category=ErrorCategory.CONNECTIVITY
            )
            yield None
            return
        try:
            if session.is_open(context_id):
                session.speak(context_id, text)
            else:
                voice = self._settings.voice
                session.speak(
                    context_id,
                    text,
                    voice=voice if isinstance(voice, str) else None,
                    format=FORMAT,
                    sample_rate=self.sample_rate,
                    options=self._options,
                    early_audio=self._early_audio,
                )
                self._writing.add(context_id)
            await self._send()
        except Exception as e:
            self._writing.discard(context_id)
            self._failed.add(context_id)
            await self.push_error(f"sending text to {self._url}: {e}", exception=e)
        else:
            await self.start_tts_usage_metrics(text)
        yield None

    async def flush_audio(self, context_id: str | None = None) -> None:
        """The turn's text is all in: ``final`` (the server speaks what it still holds, then
        ends the stream with ``done``). A context with no stream open ends here."""
        context_id = context_id or self.get_active_audio_context_id()
        if context_id is None:
            return
        session = self._session
        if context_id in self._writing and session is not None:
            self._writing.discard(context_id)
            try:
                session.speak(context_id, "", final=True)
                await self._send()
                return
            except Exception as e:
                await self.push_error(f"sending final to {self._url}: {e}", exception=e)
        self._failed.discard(context_id)
        await self._end_context(context_id)

    async def on_audio_context_interrupted(self, context_id: str) -> None:
        """Cancel the context's stream: the server frees its slots at once and sends nothing
        more of it; audio already on the way is dropped by the session."""
        self._writing.discard(context_id)
        self._failed.discard(context_id)
        await self._cancel_stream(context_id)
        await super().on_audio_context_interrupted(context_id)

    async def on_audio_context_completed(self, context_id: str) -> None:
        """The context has played out. If its stream is still open (Pipecat gave up on it
        after ``stop_frame_timeout_s`` without audio) and its turn is over, its audio has
        nowhere to go (the base keeps only the current turn's), so the stream is cancelled."""
        if context_id != self._turn_context_id:
            self._writing.discard(context_id)
            self._failed.discard(context_id)
            await self._cancel_stream(context_id)
        await super().on_audio_context_completed(context_id)

    async def _cancel_stream(self, context_id: str) -> None:
        if self._session is not None and self._session.cancel(context_id):
            try:
                await self._send()
            except Exception as e:  # the receive loop sees the lost connection
                logger.warning(f"{self}: sending cancel: {e}")

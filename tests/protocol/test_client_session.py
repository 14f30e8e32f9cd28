"""The client side of protocol v1 (stream_engine/protocol/client.py), against the server side.

Most tests wire a ClientSession to a server Session directly (no sockets): what one sends, the
other receives. Others feed the client frames a broken server would send.
"""

from __future__ import annotations

import json

import pytest

from stream_engine.errors import InvalidRequest, LimitExceeded, ServerError
from stream_engine.protocol import (
    HEADER,
    AudioReceived,
    ClientSession,
    Hello,
    OpenStream,
    SegmentEnded,
    SegmentStarted,
    Session,
    Started,
    StreamCancelled,
    StreamDone,
    StreamError,
    Violation,
    endpoint,
)

VOICES = ["v2/en_speaker_0", "v2/en_speaker_1"]


class Pair:
    """A client session and a server session, wired together."""

    def __init__(self) -> None:
        self.server = Session(model="random:tiny", voices=VOICES)
        self.client = ClientSession()
        self.opened: list[OpenStream] = []
        self.events: list[object] = []
        self.to_client()

    def to_server(self) -> None:
        for frame in self.client.data_to_send():
            for event in self.server.receive_text(frame, 0.0):
                if isinstance(event, OpenStream):
                    self.opened.append(event)

    def to_client(self) -> list[object]:
        events: list[object] = []
        for frame in self.server.data_to_send():
            if isinstance(frame, bytes):
                events += self.client.receive_bytes(frame)
            else:
                events += self.client.receive_text(frame)
        self.events += events
        return events


def test_hello_opens_the_session():
    pair = Pair()
    (hello,) = pair.events
    assert isinstance(hello, Hello) and hello.model == "random:tiny"
    assert hello.voices == tuple(VOICES) and "opus" in hello.formats
    assert hello.sample_rates["mulaw"] == (8000,) and hello.limits["max_streams"] == 8


def test_a_whole_stream_as_typed_events():
    pair = Pair()
    pair.client.speak("a", "Hello there.", voice="v2/en_speaker_1", format="pcm_s16le")
    pair.client.speak("a", " Bye.", final=True)
    pair.to_server()
    (opened,) = pair.opened
    number = opened.spec.stream
    server = pair.server
    server.segment(number, 0, "Hello there.")
    server.audio(number, 0, b"\x01\x00" * 480)
    server.audio(number, 0, b"\x02\x00" * 240)
    server.segment_end(number, 0, 30.0)
    server.done(number, 30.0, 12.5, 0.4)
    events = pair.to_client()
    assert events == [
        Started("a", number, "v2/en_speaker_1", "pcm_s16le", 24000, False),
        SegmentStarted("a", 0, "Hello there."),
        AudioReceived("a", number, 0, 0, b"\x01\x00" * 480),
        AudioReceived("a", number, 0, 1, b"\x02\x00" * 240),
        SegmentEnded("a", 0, "Hello there.", 30.0),
        StreamDone("a", 30.0, 12.5, 0.4),
    ]
    assert not pair.client.is_open("a")


def test_the_clients_rules():
    client = ClientSession()
    client.speak(1, "Hi.")
    with pytest.raises(InvalidRequest):
        client.speak(1, "More.", voice="v2/en_speaker_0")  # opening fields: first speak only
    client.speak(1, "", final=True)
    with pytest.raises(InvalidRequest):
        client.speak(1, "After final.")
    client.flush(1)  # final: nothing to flush
    for bad in (True, 1.5, None, "", 2**60):
        with pytest.raises(InvalidRequest):
            client.speak(bad, "x")  # type: ignore[arg-type]
    frames = [json.loads(f) for f in client.data_to_send()]
    assert frames == [
        {"type": "speak", "id": 1, "text": "Hi.", "final": False},
        {"type": "speak", "id": 1, "text": "", "final": True},
    ]
    assert client.cancel(1) and not client.cancel(1)  # once
    assert not client.cancel("never")
    assert [json.loads(f) for f in client.data_to_send()] == [{"type": "cancel", "id": 1}]


def test_no_audio_passes_after_a_cancel():
    pair = Pair()
    pair.client.speak("a", "Hello.")
    pair.to_server()
    number = pair.opened[0].spec.stream
    pair.server.segment(number, 0, "Hello.")
    pair.server.audio(number, 0, b"\0\0" * 10)
    before = pair.to_client()
    assert any(isinstance(e, AudioReceived) for e in before)
    pair.client.cancel("a")
    pair.server.audio(number, 0, b"\0\0" * 10)  # was already on its way
    late = pair.to_client()
    assert not any(isinstance(e, AudioReceived) for e in late) and late == []
    pair.to_server()  # the server answers the cancel
    assert pair.to_client() == [StreamCancelled("a")]


def test_a_speak_that_crossed_its_streams_error_is_cancelled_unseen():
    pair = Pair()
    pair.client.speak("a", "Hello.")
    pair.to_server()
    assert isinstance(pair.to_client()[0], Started)
    pair.server.fail(pair.opened[0].spec.stream, LimitExceeded("too much"))
    pair.client.speak("a", " more text")  # sent before the error arrived
    pair.to_server()  # the server opens a new stream "a" with it
    events = pair.to_client()
    assert events == [StreamError("a", "limit", "too much")]  # the new one is not seen
    assert [json.loads(f) for f in pair.client.data_to_send()] == [{"type": "cancel", "id": "a"}]
    assert not pair.client.is_open("a")


def test_connection_errors_and_refusals():
    client = ClientSession()
    refusal = {"type": "error", "id": None, "code": "limit", "message": "too many connections"}
    assert client.receive_text(json.dumps(refusal)) == [
        StreamError(None, "limit", "too many connections")
    ]
    assert client.hello is None


@pytest.mark.parametrize(
    ("frames", "what"),
    [
        (["not json"], "not JSON"),
        ([{"type": "nonsense", "id": "a"}], "unknown message"),
        ([{"type": "hello", "protocol": 1, "model": "m", "sample_rate": 24000}], "second hello"),
        ([{"type": "segment", "id": "zzz", "index": 0, "text": ""}], "no open stream"),
        (
            [{"type": "started", "id": "a", "stream": 1, "format": "mulaw", "sample_rate": 8000}],
            "format",
        ),
        ([{"type": "segment", "id": "a", "index": 1, "text": "x"}], "expected 0"),
        ([HEADER.pack(1, 0, 0) + b"\0\0"], "segment 0; open: None"),
        (
            [
                {"type": "segment", "id": "a", "index": 0, "text": "x"},
                HEADER.pack(1, 0, 3) + b"\0\0",
            ],
            "sequence number 3",
        ),
        (
            [{"type": "segment", "id": "a", "index": 0, "text": "x"}, HEADER.pack(1, 0, 0) + b"\0"],
            "payload of 1 bytes",
        ),
        (
            [
                {"type": "segment", "id": "a", "index": 0, "text": "x"},
                HEADER.pack(1, 0, 0) + b"\0\0",
                {"type": "segment_end", "id": "a", "index": 0, "audio_ms": 500.0},
            ],
            "audio received",
        ),
        ([{"type": "done", "id": "a", "audio_ms": 0.0}], "before the client sent final"),
        ([HEADER.pack(9, 0, 0) + b"\0\0"], "never started"),
        ([b"\0\0"], "no header"),
    ],
)
def test_a_broken_server_is_a_violation(frames, what):
    client = ClientSession()
    hello = {"type": "hello", "protocol": 1, "model": "m", "sample_rate": 24000}
    client.receive_text(json.dumps(hello))
    client.speak("a", "Hi.", format="pcm_s16le")
    client.receive_text(
        json.dumps(
            {
                "type": "started",
                "id": "a",
                "stream": 1,
                "voice": None,
                "format": "pcm_s16le",
                "sample_rate": 24000,
                "early_audio": False,
            }
        )
    )
    events: list[object] = []
    for frame in frames:
        if isinstance(frame, bytes):
            events += client.receive_bytes(frame)
        elif isinstance(frame, dict):
            if frame["type"] == "started":  # a second stream, asked for as pcm_s16le
                client.speak("b", "x", format="pcm_s16le")
                frame = {**frame, "id": "b", "stream": 2}
            events += client.receive_text(json.dumps(frame))
        else:
            events += client.receive_text(frame)
    violations = [e for e in events if isinstance(e, Violation)]
    assert violations and any(what in v.what for v in violations), events


def test_connection_lost_ends_every_open_stream():
    client = ClientSession()
    client.speak("a", "x")
    client.speak(2, "y")
    assert client.connection_lost() == ["a", 2]
    with pytest.raises(InvalidRequest):
        client.speak("c", "z")


def test_expect_hello():
    session = ClientSession()
    hello = {"type": "hello", "protocol": 1, "model": "m", "sample_rate": 24000}
    assert session.expect_hello(json.dumps(hello)).model == "m"
    refused = ClientSession()
    with pytest.raises(ServerError) as info:
        refused.expect_hello(
            json.dumps({"type": "error", "id": None, "code": "limit", "message": "too many"})
        )
    assert info.value.code == "limit"
    for first in (b"\0" * 20, json.dumps({"type": "started", "id": 1}), "junk"):
        with pytest.raises(ServerError) as info:
            ClientSession().expect_hello(first)
        assert info.value.code == "protocol_error"


def test_endpoint():
    assert endpoint("ws://h:1") == endpoint("ws://h:1/") == "ws://h:1/v1/tts"
    assert endpoint("wss://h/v1/tts") == "wss://h/v1/tts"


def test_the_hello_names_the_server_when_it_is_given():
    named = ClientSession()
    (hello,) = named.receive_text(
        Session(model="m", voices=VOICES, server="replica-7").data_to_send()[0]
    )
    assert hello.server == "replica-7" and hello.message["server"] == "replica-7"
    (anonymous,) = ClientSession().receive_text(Session(model="m", voices=VOICES).data_to_send()[0])
    assert anonymous.server is None and "server" not in anonymous.message

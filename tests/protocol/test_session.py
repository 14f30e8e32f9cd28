"""The WebSocket protocol v1 state machine (stream_engine/protocol.py), without sockets.

Each test feeds frames into a Session and reads what it queued for the client; the rules
checked are those of docs/protocol.md.
"""

from __future__ import annotations

import collections
import json
import math
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_engine.audio.formats import FORMATS
from stream_engine.config import GenerationOptions
from stream_engine.errors import (
    Busy,
    Cancelled,
    EmptyText,
    InternalError,
    InvalidOption,
    LimitExceeded,
    ModelLoadError,
    TextTooLong,
    UnknownVoice,
)
from stream_engine.protocol import (
    ERROR_CODES,
    MAX_MESSAGE_CHARS,
    OPTION_KEYS,
    AppendText,
    CancelStream,
    FlushStream,
    OpenStream,
    ProtocolLimits,
    Session,
    StreamSpec,
)

VOICES = ["v2/en_speaker_0", "v2/en_speaker_1"]
SERVER_TYPES = {
    "hello",
    "started",
    "segment",
    "segment_end",
    "done",
    "cancelled",
    "error",
}


def make(**kw: Any) -> Session:
    session = Session(model="random:tiny", voices=VOICES, **kw)
    session.data_to_send()  # the hello
    return session


def send(session: Session, msg: Any, now: float = 0.0) -> list[Any]:
    return session.receive_text(json.dumps(msg), now)


def speak(session: Session, id: Any = "a", text: str = "Hello.", final: bool = False, **kw: Any):
    return send(session, {"type": "speak", "id": id, "text": text, "final": final, **kw})


def out(session: Session) -> list[Any]:
    """The outbox, decoded: dicts for text frames, (stream, segment, seq, payload) for binary."""
    frames = []
    for frame in session.data_to_send():
        if isinstance(frame, bytes):
            frames.append((*struct.unpack_from("<III", frame), frame[12:]))
        else:
            assert isinstance(frame, str)
            frames.append(json.loads(frame))
    return frames


def one_error(session: Session) -> dict[str, Any]:
    frames = out(session)
    assert len(frames) == 1, frames
    (err,) = frames
    assert err["type"] == "error"
    assert set(err) == {"type", "id", "code", "message"}
    assert err["code"] in ERROR_CODES
    assert 0 < len(err["message"]) <= MAX_MESSAGE_CHARS
    return err


def open_stream(session: Session, id: Any = "a", **kw: Any) -> StreamSpec:
    (event,) = speak(session, id, **kw)
    assert isinstance(event, OpenStream)
    (started,) = out(session)
    assert started["type"] == "started"
    assert started["id"] == id and started["stream"] == event.spec.stream
    return event.spec


def assert_still_works(session: Session) -> None:
    """The connection goes on after an error: a fresh stream opens normally."""
    before = {s.id for s in session.open_streams}
    fresh = "still-works"
    assert fresh not in before
    spec = open_stream(session, fresh)
    assert spec.id == fresh
    assert {s.id for s in session.open_streams} == before | {fresh}


# ------------------------------------------------------------------------------------ hello


def test_hello_is_the_first_and_only_message_on_connect():
    session = Session(model="random:tiny", voices=VOICES)
    (hello,) = out(session)
    assert hello["type"] == "hello"
    assert hello["protocol"] == 1
    assert hello["model"] == "random:tiny"
    assert hello["sample_rate"] == 24000
    assert hello["voices"] == VOICES
    assert hello["formats"] == ["pcm_s16le", "pcm_f32le", "mulaw", "opus"]
    assert hello["sample_rates"]["mulaw"] == [8000]
    assert hello["sample_rates"]["opus"] == [8000, 12000, 16000, 24000, 48000]
    assert hello["limits"]["max_streams"] == 8
    assert hello["limits"]["max_text_chars"] == 20000
    assert out(session) == []  # drained


def test_hello_lists_only_offered_formats_and_others_are_unsupported():
    session = Session(model="m", voices=[], formats=["pcm_s16le", "mulaw"])
    (hello,) = out(session)
    assert hello["formats"] == ["pcm_s16le", "mulaw"]
    assert set(hello["sample_rates"]) == {"pcm_s16le", "mulaw"}
    assert speak(session, "a", format="opus") == []
    err = one_error(session)
    assert (err["id"], err["code"]) == ("a", "unsupported_format")


def test_session_rejects_unknown_formats_and_bad_limits():
    with pytest.raises(InvalidOption):
        Session(model="m", voices=[], formats=["wav"])
    with pytest.raises(InvalidOption):
        ProtocolLimits(max_streams=0)
    with pytest.raises(InvalidOption):
        ProtocolLimits(max_chars_per_second=math.inf)
    with pytest.raises(InvalidOption):
        ProtocolLimits(max_id_chars=True)


# ------------------------------------------------------------------------------- open/append


def test_open_stream_defaults():
    session = make()
    (event,) = speak(session, "a", "Hello there. ")
    assert event == OpenStream(
        StreamSpec("a", 1, None, "pcm_s16le", 24000, GenerationOptions()), "Hello there. ", False
    )
    (started,) = out(session)
    assert started == {
        "type": "started",
        "id": "a",
        "stream": 1,
        "voice": None,
        "format": "pcm_s16le",
        "sample_rate": 24000,
        "early_audio": False,
    }
    assert session.open_streams == (event.spec,)
    assert session.is_open(1)


def test_open_stream_with_every_field():
    session = make()
    options = {
        "text_temp": 0.6,
        "waveform_temp": 0.5,
        "top_k": 50,
        "top_p": 0.9,
        "min_eos_p": 0.05,
        "seed": 7,
    }
    (event,) = speak(
        session,
        42,
        "Hi.",
        True,
        voice="v2/en_speaker_1",
        format="opus",
        sample_rate=48000,
        options=options,
    )
    spec = event.spec
    assert (spec.id, spec.voice, spec.format, spec.sample_rate) == (
        42,
        "v2/en_speaker_1",
        "opus",
        48000,
    )
    assert spec.options == GenerationOptions(
        text_temp=0.6, coarse_temp=0.5, top_k=50, top_p=0.9, min_eos_p=0.05, seed=7
    )
    assert event.final is True
    assert out(session)[0]["id"] == 42


@pytest.mark.parametrize(
    ("fmt", "rate"),
    [("pcm_s16le", 24000), ("pcm_f32le", 24000), ("mulaw", 8000), ("opus", 24000)],
)
def test_default_sample_rate_per_format(fmt, rate):
    session = make()
    spec = open_stream(session, "a", format=fmt)
    assert spec.sample_rate == rate


def test_null_opening_fields_mean_defaults():
    session = make()
    spec = open_stream(session, "a", voice=None, format=None, sample_rate=None, options=None)
    assert (spec.voice, spec.format, spec.sample_rate, spec.options) == (
        None,
        "pcm_s16le",
        24000,
        GenerationOptions(),
    )


def test_text_and_final_may_be_omitted():
    session = make()
    (event,) = send(session, {"type": "speak", "id": "a"})
    assert isinstance(event, OpenStream)
    assert (event.text, event.final) == ("", False)


def test_append_text_and_final():
    session = make()
    spec = open_stream(session, "a", text="Hello ")
    assert speak(session, "a", "there. ") == [AppendText("a", spec.stream, "there. ", False)]
    assert speak(session, "a", "") == []  # nothing new
    assert speak(session, "a", "", True) == [AppendText("a", spec.stream, "", True)]
    assert out(session) == []  # appends are not answered


def test_stream_numbers_are_unique_and_never_reused():
    session = make()
    a = open_stream(session, "a")
    b = open_stream(session, "b")
    assert (a.stream, b.stream) == (1, 2)
    speak(session, "a", "", True)
    assert session.done(a.stream, 10.0, 5.0, 0.5)
    out(session)
    again = open_stream(session, "a")  # id reused after close: new number
    assert again.stream == 3


def test_same_id_as_int_and_str_are_different_streams():
    session = make()
    assert open_stream(session, 1).id == 1
    assert open_stream(session, "1").id == "1"
    assert len(session.open_streams) == 2


# ------------------------------------------------------------------------ flush and cancel


def test_flush():
    session = make()
    spec = open_stream(session, "a")
    assert send(session, {"type": "flush", "id": "a"}) == [FlushStream("a", spec.stream)]
    assert out(session) == []
    speak(session, "a", "", True)
    assert send(session, {"type": "flush", "id": "a"}) == []  # final already: nothing to do
    assert out(session) == []
    assert session.is_open(spec.stream)


def test_flush_of_unknown_id_is_bad_request():
    session = make()
    assert send(session, {"type": "flush", "id": "nope"}) == []
    err = one_error(session)
    assert (err["id"], err["code"]) == ("nope", "bad_request")
    assert_still_works(session)


def test_cancel_answers_at_once_and_no_audio_follows():
    session = make()
    spec = open_stream(session, "a")
    other = open_stream(session, "b")
    assert session.segment(spec.stream, 0, "Hello.")
    assert session.audio(spec.stream, 0, b"\x01\x00")
    assert send(session, {"type": "cancel", "id": "a"}) == [CancelStream("a", spec.stream)]
    # the engine is still running: every later call for the stream is dropped
    assert session.audio(spec.stream, 0, b"\x02\x00") is False
    assert session.segment_end(spec.stream, 0, 10.0) is False
    assert session.segment(spec.stream, 1, "More.") is False
    assert session.done(spec.stream, 10.0, 1.0, 0.1) is False
    assert session.fail(spec.stream, RuntimeError("late")) is False
    assert session.cancelled(spec.stream) is False
    frames = out(session)
    assert [f["type"] if isinstance(f, dict) else "audio" for f in frames] == [
        "segment",
        "audio",
        "cancelled",
    ]
    assert frames[-1] == {"type": "cancelled", "id": "a"}
    # the other stream goes on
    assert session.open_streams == (other,)
    assert session.segment(other.stream, 0, "x")


def test_cancel_of_unknown_or_closed_id_is_ignored():
    session = make()
    assert send(session, {"type": "cancel", "id": "never"}) == []
    spec = open_stream(session, "a", final=True)
    session.done(spec.stream, 0.0, None, None)
    out(session)
    assert send(session, {"type": "cancel", "id": "a"}) == []  # crossed the done on the wire
    assert out(session) == []


def test_id_reused_while_old_job_winds_down_gets_no_old_audio():
    session = make()
    old = open_stream(session, "a")
    send(session, {"type": "cancel", "id": "a"})
    out(session)
    new = open_stream(session, "a")
    assert session.segment(old.stream, 0, "old") is False
    assert session.segment(new.stream, 0, "new")
    assert session.audio(new.stream, 0, b"\x00\x00")
    frames = out(session)
    assert frames[0] == {"type": "segment", "id": "a", "index": 0, "text": "new"}
    assert frames[1][:3] == (new.stream, 0, 0)


# ----------------------------------------------------------------------- validation errors

BAD_IDS = [
    None,
    1.0,
    True,
    False,
    [],
    ["a"],
    {},
    {"a": 1},
    "",
    "x" * 129,
    "x" * 100_000,
    "a\x00b",
    "tab\there",
    "\x9f",
    "\ud800",
    2**53,
    -(2**53),
    10**100,
]


@pytest.mark.parametrize("bad_id", BAD_IDS)
@pytest.mark.parametrize("kind", ["speak", "flush", "cancel"])
def test_invalid_id_is_bad_request_with_null_id(kind, bad_id):
    session = make()
    assert (
        send(
            session,
            {"type": kind, "id": bad_id, "text": "Hi."}
            if kind == "speak"
            else {"type": kind, "id": bad_id},
        )
        == []
    )
    err = one_error(session)
    assert (err["id"], err["code"]) == (None, "bad_request")
    assert session.open_streams == ()
    assert_still_works(session)


def test_missing_id_is_bad_request():
    session = make()
    assert send(session, {"type": "speak", "text": "Hi."}) == []
    err = one_error(session)
    assert (err["id"], err["code"]) == (None, "bad_request")


@pytest.mark.parametrize("good_id", ["a", "x" * 128, "ünïcödé 🙂", 0, -5, 2**53 - 1, -(2**53 - 1)])
def test_valid_ids_are_echoed_exactly(good_id):
    session = make()
    spec = open_stream(session, good_id, final=True)
    assert spec.id == good_id
    session.done(spec.stream, 1.0, 1.0, 1.0)
    (done,) = out(session)
    assert done["id"] == good_id and type(done["id"]) is type(good_id)


WRONG_TYPES = [None, True, 1, 1.5, "x", [], ["x"], {}, {"a": 1}]

# (field, value, code) for an opening speak; every value of a wrong JSON type is bad_request
OPEN_ERRORS = [
    *[("text", v, "bad_request") for v in WRONG_TYPES if not isinstance(v, str)],
    *[("final", v, "bad_request") for v in WRONG_TYPES if not isinstance(v, bool)],
    *[("voice", v, "bad_request") for v in WRONG_TYPES if not isinstance(v, str) and v is not None],
    *[
        ("format", v, "bad_request")
        for v in WRONG_TYPES
        if not isinstance(v, str) and v is not None
    ],
    *[
        ("sample_rate", v, "bad_request")
        for v in WRONG_TYPES
        if v is not None and (isinstance(v, bool) or not isinstance(v, int))
    ],
    ("sample_rate", 24000.0, "bad_request"),
    *[
        ("options", v, "bad_request")
        for v in WRONG_TYPES
        if not isinstance(v, dict) and v is not None
    ],
    ("voice", "nope", "unknown_voice"),
    ("voice", "", "unknown_voice"),
    ("voice", "../../etc/passwd", "unknown_voice"),
    ("voice", "/etc/passwd", "unknown_voice"),
    ("voice", "https://example.com/voice.npz", "unknown_voice"),
    ("voice", "v2/en_speaker_0\x00", "unknown_voice"),
    ("voice", "V2/EN_SPEAKER_0", "unknown_voice"),
    ("voice", "x" * 100_000, "unknown_voice"),
    ("format", "wav", "unsupported_format"),
    ("format", "PCM_S16LE", "unsupported_format"),
    ("format", "", "unsupported_format"),
    ("sample_rate", 44100, "unsupported_format"),
    ("sample_rate", 0, "unsupported_format"),
    ("sample_rate", -24000, "unsupported_format"),
    ("sample_rate", 10**100, "unsupported_format"),
    ("options", {"bogus": 1}, "bad_request"),
    ("options", {"greedy": True}, "bad_request"),  # an engine option, not a protocol one
    ("options", {"max_semantic_tokens": 10}, "bad_request"),
    ("options", {"text_temp": 0}, "bad_request"),
    ("options", {"text_temp": 6}, "bad_request"),
    ("options", {"text_temp": "0.7"}, "bad_request"),
    ("options", {"text_temp": [0.7]}, "bad_request"),
    ("options", {"text_temp": None}, "bad_request"),
    ("options", {"waveform_temp": -1}, "bad_request"),
    ("options", {"top_k": 0}, "bad_request"),
    ("options", {"top_k": 1.5}, "bad_request"),
    ("options", {"top_k": True}, "bad_request"),
    ("options", {"top_p": 1.5}, "bad_request"),
    ("options", {"min_eos_p": 0}, "bad_request"),
    ("options", {"seed": -1}, "bad_request"),
    ("options", {"seed": 2**31}, "bad_request"),
    ("options", {"seed": 1e300}, "bad_request"),
    ("options", {"seed": 10**100}, "bad_request"),
    ("options", {"seed": {"deep": [1, 2]}}, "bad_request"),
    *[("options", {key: 10**400}, "bad_request") for key in OPTION_KEYS],  # float() overflows
    *[("options", {key: -(10**400)}, "bad_request") for key in OPTION_KEYS],
    *[("options", {key: 1e308}, "bad_request") for key in OPTION_KEYS],
]


@pytest.mark.parametrize(("field", "value", "code"), OPEN_ERRORS)
def test_invalid_opening_speak(field, value, code):
    session = make()
    msg = {"type": "speak", "id": "a", "text": "Hello.", "final": False, field: value}
    assert send(session, msg) == []
    err = one_error(session)
    assert (err["id"], err["code"]) == ("a", code)
    assert session.open_streams == ()  # a failed open creates no stream
    assert "Traceback" not in err["message"]
    assert_still_works(session)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("text", 1),
        ("text", None),
        ("final", "true"),
        ("final", 1),
        ("voice", "v2/en_speaker_0"),  # opening fields are not allowed on later speaks
        ("format", "pcm_s16le"),
        ("sample_rate", 24000),
        ("options", {}),
        ("bogus", 1),
    ],
)
def test_invalid_later_speak_closes_the_stream(field, value):
    session = make()
    spec = open_stream(session, "a", text="Hello ")
    other = open_stream(session, "b")
    msg = {"type": "speak", "id": "a", "text": "there.", field: value}
    assert send(session, msg) == [CancelStream("a", spec.stream)]
    err = one_error(session)
    assert (err["id"], err["code"]) == ("a", "bad_request")
    assert session.open_streams == (other,)
    assert session.audio(spec.stream, 0, b"") is False  # the old job's output is dropped
    assert out(session) == []
    assert open_stream(session, "a").stream == 3  # the id is free again


def test_speak_after_final_is_bad_request_and_closes_the_stream():
    session = make()
    spec = open_stream(session, "a", final=True)
    assert speak(session, "a", "more") == [CancelStream("a", spec.stream)]
    err = one_error(session)
    assert (err["id"], err["code"]) == ("a", "bad_request")
    assert "final" in err["message"]
    assert not session.is_open(spec.stream)


@pytest.mark.parametrize(
    "msg",
    [
        {"type": "speak", "id": "a", "txt": "typo"},
        {"type": "flush", "id": "a", "text": "x"},
        {"type": "cancel", "id": "a", "now": True},
    ],
)
def test_unknown_fields_are_bad_request(msg):
    session = make()
    send(session, msg)
    err = one_error(session)
    assert (err["id"], err["code"]) == ("a", "bad_request")
    assert "unknown field" in err["message"]


def test_validation_order_on_open():
    # id, then text, voice, format and rate, options, and the stream limit last
    session = make(limits=ProtocolLimits(max_streams=1))
    open_stream(session, "first")
    everything_wrong = {
        "type": "speak",
        "id": "a",
        "text": 5,
        "voice": "nope",
        "format": "wav",
        "options": {"bogus": 1},
    }
    steps = [("text", "bad_request"), ("voice", "unknown_voice"), ("format", "unsupported_format")]
    steps += [("options", "bad_request"), (None, "limit")]
    for field, code in steps:
        send(session, everything_wrong)
        assert one_error(session)["code"] == code
        if field is not None:
            del everything_wrong[field]
    send(session, {**everything_wrong, "id": None})
    assert one_error(session)["id"] is None  # the id comes first of all


# ---------------------------------------------------------------- malformed frames from clients

DEEP = 10_000
MALFORMED = [
    "",
    " ",
    "not json",
    "{",
    '{"type": "speak"',
    "[1, 2]",
    "null",
    "1",
    '"speak"',
    "[" * DEEP + "]" * DEEP,
    '{"a":' * DEEP + "1" + "}" * DEEP,
    "[" * 100_000,
    '{"type": "speak", "id": "a", "options": ' + '{"x":' * DEEP + "1" + "}" * DEEP + "}",
    '{"type": "speak", "id": "a", "text": NaN}',
    '{"type": "speak", "id": "a", "options": {"text_temp": Infinity}}',
    '{"type": "speak", "id": "a", "options": {"seed": -Infinity}}',
    '{"type": "speak", "id": ' + "9" * 5000 + "}",
    '{"type": "speak", "id": "a", "id": "b"}',
    '{"type": "speak", "id": "a", "options": {"seed": 1, "seed": 2}}',
    '{"type": "speak", "id": "a", "text": "raw \x07 control"}',
    '{"type": "speak", "id": "a"} trailing',
    "\x00",
    "\ufeff{}",
    '{"id": "a"}',
    '{"type": null, "id": "a"}',
    '{"type": 1, "id": "a"}',
    '{"type": ["speak"], "id": "a"}',
    '{"type": "SPEAK", "id": "a"}',
    '{"type": "hello", "id": "a"}',
    '{"type": "done", "id": "a"}',
    '{"type": "speak\\u0000", "id": "a"}',
]


@pytest.mark.parametrize("frame", MALFORMED, ids=lambda f: repr(f[:30]))
def test_malformed_frames_are_bad_request_with_null_id(frame):
    session = make()
    assert session.receive_text(frame, 0.0) == []
    err = one_error(session)
    assert (err["id"], err["code"]) == (None, "bad_request")
    assert_still_works(session)


@pytest.mark.parametrize(
    "data", [b"", b"\x00" * 12, b'{"type":"speak","id":"a"}', b"\xff" * 10_000]
)
def test_binary_frames_from_client_are_bad_request(data):
    session = make()
    spec = open_stream(session, "a")
    assert session.receive_bytes(data, 0.0) == []
    err = one_error(session)
    assert (err["id"], err["code"]) == (None, "bad_request")
    assert session.open_streams == (spec,)  # the open stream is untouched


def test_a_bug_in_handling_becomes_internal_error_not_a_crash(monkeypatch):
    session = make()

    def broken(*args: Any) -> Any:
        raise RuntimeError("secret detail /home/server/path.py line 12")

    monkeypatch.setattr(session, "_speak", broken)
    assert speak(session, "a") == []
    err = one_error(session)
    assert (err["id"], err["code"], err["message"]) == (None, "internal", "internal error")


# --------------------------------------------------------------------------------- text


def test_text_of_only_punctuation_emoji_and_newlines_is_accepted():
    session = make()
    for i, text in enumerate(["...!?", "🙂🙂", "\n\n", "   ", "—", "a\tb\r\nc"]):
        (event,) = speak(session, i, text, True)
        assert event.text == text


def test_control_characters_become_spaces():
    session = make()
    (event,) = speak(session, "a", "Hi\x00there\x07.\x1b[31m\x7f\x85ok\tnew\nline")
    assert event.text == "Hi there . [31m  ok\tnew\nline"
    (event,) = speak(session, "a", "\x01\x02")
    assert event.text == "  "


def test_lone_surrogates_in_text_are_bad_request():
    session = make()
    send(session, {"type": "speak", "id": "a", "text": "ab\ud800"})
    err = one_error(session)
    assert (err["id"], err["code"]) == ("a", "bad_request")


def test_segment_text_with_odd_characters_is_valid_json():
    session = make()
    spec = open_stream(session, "a")
    session.segment(spec.stream, 0, 'x\ud800\x00"\\ 🙂')
    (frame,) = session.data_to_send()
    assert isinstance(frame, str)
    frame.encode("utf-8")  # would raise on a lone surrogate written raw
    assert json.loads(frame)["text"] == 'x\ud800\x00"\\ 🙂'


# --------------------------------------------------------------------------------- audio


def test_binary_frame_header_layout_and_sequence_numbers():
    session = make()
    open_stream(session, "first")
    spec = open_stream(session, "a")
    assert spec.stream == 2
    session.segment(spec.stream, 0, "One.")
    session.audio(spec.stream, 0, b"\x01\x00\x02\x00")
    session.audio(spec.stream, 0, b"\x03\x00")
    session.segment_end(spec.stream, 0, 0.123456)
    session.segment(spec.stream, 1, "Two.")
    session.audio(spec.stream, 1, bytearray(b"\x04\x00"))
    session.segment_end(spec.stream, 1, 41.66)
    raw = [f for f in session.data_to_send() if isinstance(f, bytes)]
    assert (
        raw[0]
        == b"\x02\x00\x00\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00" + b"\x01\x00\x02\x00"
    )
    assert [struct.unpack("<III", f[:12]) for f in raw] == [(2, 0, 0), (2, 0, 1), (2, 1, 2)]
    assert [f[12:] for f in raw] == [b"\x01\x00\x02\x00", b"\x03\x00", b"\x04\x00"]


def test_message_order_of_a_whole_stream():
    session = make()
    spec = open_stream(session, "a", text="One. Two.", final=True)
    session.segment(spec.stream, 0, "One.")
    session.audio(spec.stream, 0, b"\x00\x00")
    session.segment_end(spec.stream, 0, 500.04)
    session.segment(spec.stream, 1, "Two.")
    session.audio(spec.stream, 1, b"\x00\x00")
    session.audio(spec.stream, 1, b"\x00\x00")
    session.segment_end(spec.stream, 1, 250)
    assert session.done(spec.stream, 750.04, 123.456, 0.123456)
    assert out(session) == [
        {"type": "segment", "id": "a", "index": 0, "text": "One."},
        (spec.stream, 0, 0, b"\x00\x00"),
        {"type": "segment_end", "id": "a", "index": 0, "audio_ms": 500.0},
        {"type": "segment", "id": "a", "index": 1, "text": "Two."},
        (spec.stream, 1, 1, b"\x00\x00"),
        (spec.stream, 1, 2, b"\x00\x00"),
        {"type": "segment_end", "id": "a", "index": 1, "audio_ms": 250.0},
        {"type": "done", "id": "a", "audio_ms": 750.0, "ttfa_ms": 123.5, "rtf": 0.1235},
    ]
    assert session.open_streams == ()


def test_done_with_no_audio_has_null_ttfa():
    session = make()
    spec = open_stream(session, "a", text="...", final=True)
    assert session.done(spec.stream, 0, None, None)
    assert out(session) == [
        {"type": "done", "id": "a", "audio_ms": 0.0, "ttfa_ms": None, "rtf": None}
    ]


def test_sequence_numbers_are_per_stream():
    session = make()
    a = open_stream(session, "a")
    b = open_stream(session, "b")
    for spec in (a, b):
        session.segment(spec.stream, 0, "x")
    session.audio(a.stream, 0, b"\x00\x00")
    session.audio(b.stream, 0, b"\x00\x00")
    session.audio(a.stream, 0, b"\x00\x00")
    frames = [f for f in out(session) if isinstance(f, tuple)]
    assert [f[:3] for f in frames] == [(a.stream, 0, 0), (b.stream, 0, 0), (a.stream, 0, 1)]


def test_empty_payload_sends_nothing():
    session = make()
    spec = open_stream(session, "a", format="opus")
    session.segment(spec.stream, 0, "x")
    out(session)
    assert session.audio(spec.stream, 0, b"")
    assert out(session) == []
    session.audio(spec.stream, 0, b"\xfc")
    assert out(session) == [(spec.stream, 0, 0, b"\xfc")]


@pytest.mark.parametrize(("fmt", "bad", "good"), [("pcm_s16le", 3, 4), ("pcm_f32le", 6, 8)])
def test_pcm_frames_hold_whole_samples(fmt, bad, good):
    session = make()
    spec = open_stream(session, "a", format=fmt)
    session.segment(spec.stream, 0, "x")
    with pytest.raises(InternalError):
        session.audio(spec.stream, 0, b"\x00" * bad)
    assert session.audio(spec.stream, 0, b"\x00" * good)


# ----------------------------------------------------------------------- driver contract


def test_driver_contract_violations_raise_internal_error_and_change_nothing():
    session = make()
    spec = open_stream(session, "a")
    n = spec.stream
    with pytest.raises(InternalError):
        session.audio(n, 0, b"\x00\x00")  # before segment()
    with pytest.raises(InternalError):
        session.segment_end(n, 0, 1.0)  # no open segment
    with pytest.raises(InternalError):
        session.segment(n, 1, "x")  # must start at 0
    with pytest.raises(InternalError):
        session.done(n, 1.0, 1.0, 1.0)  # not final yet
    session.segment(n, 0, "x")
    with pytest.raises(InternalError):
        session.segment(n, 1, "y")  # segment 0 not ended
    with pytest.raises(InternalError):
        session.audio(n, 1, b"\x00\x00")  # not the open segment
    with pytest.raises(InternalError):
        session.audio(n, 0, "text")  # type: ignore[arg-type]
    with pytest.raises(InternalError):
        session.segment_end(n, 0, math.nan)
    with pytest.raises(InternalError):
        session.segment_end(n, 0, -1.0)
    speak(session, "a", "", True)
    with pytest.raises(InternalError):
        session.done(n, 1.0, 1.0, 1.0)  # segment 0 still open
    with pytest.raises(InternalError):
        session.audio(99, 0, b"\x00\x00")  # never opened
    with pytest.raises(InternalError):
        session.done(0, 1.0, None, None)
    # nothing above was sent; the stream goes on normally
    assert [f["type"] for f in out(session)] == ["segment"]
    assert session.audio(n, 0, b"\x00\x00")
    assert session.segment_end(n, 0, 1.0)
    with pytest.raises(InternalError):
        session.done(n, math.inf, None, None)
    with pytest.raises(InternalError):
        session.done(n, 1.0, -5.0, None)
    with pytest.raises(InternalError):
        session.done(n, 10**400, None, None)
    with pytest.raises(InternalError):
        session.done(n, 1.0, None, "fast")  # type: ignore[arg-type]
    assert session.is_open(n)
    assert session.done(n, 1.0, 0.5, 2.0)
    assert [f if isinstance(f, tuple) else f["type"] for f in out(session)] == [
        (n, 0, 0, b"\x00\x00"),
        "segment_end",
        "done",
    ]


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (Busy("the engine is full; try again later"), "busy"),
        (TextTooLong("a sentence needs more than 256 tokens"), "text_too_long"),
        (UnknownVoice("unknown voice"), "unknown_voice"),
        (EmptyText("nothing to say"), "bad_request"),
        (LimitExceeded("too much"), "limit"),
    ],
)
def test_fail_sends_the_exceptions_code_and_closes_the_stream(exc, code):
    session = make()
    spec = open_stream(session, "a")
    assert session.fail(spec.stream, exc)
    err = one_error(session)
    assert (err["id"], err["code"], err["message"]) == ("a", code, str(exc))
    assert not session.is_open(spec.stream)
    assert session.audio(spec.stream, 0, b"\x00\x00") is False
    assert out(session) == []


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("CUDA error at /home/build/torch/aten/src/foo.cu:12"),
        ValueError("x"),
        KeyError("secret"),
        InternalError("stage crashed: details for the log"),
        ModelLoadError("could not read /models/secret"),
    ],
)
def test_fail_with_unexpected_or_internal_errors_sends_a_generic_message(exc):
    session = make()
    spec = open_stream(session, "a")
    session.fail(spec.stream, exc)
    err = one_error(session)
    assert (err["id"], err["code"], err["message"]) == ("a", "internal", "internal error")


def test_fail_with_cancelled_and_server_side_cancel_send_cancelled():
    session = make()
    a = open_stream(session, "a")
    b = open_stream(session, "b")
    assert session.fail(a.stream, Cancelled("shutting down"))
    assert session.cancelled(b.stream)
    assert out(session) == [{"type": "cancelled", "id": "a"}, {"type": "cancelled", "id": "b"}]
    assert session.open_streams == ()


def test_connection_error_has_null_id():
    session = make()
    spec = open_stream(session, "a")
    session.connection_error(Busy("server is shutting down"))
    err = one_error(session)
    assert (err["id"], err["code"]) == (None, "busy")
    assert session.is_open(spec.stream)


def test_long_error_messages_are_cut():
    session = make()
    spec = open_stream(session, "a")
    session.fail(spec.stream, UnknownVoice("x" * 10_000))
    err = one_error(session)
    assert len(err["message"]) == MAX_MESSAGE_CHARS and err["message"].endswith("...")


def test_close_cancels_every_open_stream_and_silences_the_session():
    session = make()
    a = open_stream(session, "a")
    b = open_stream(session, "b")
    session.segment(a.stream, 0, "x")
    events = session.close()
    assert events == [CancelStream("a", a.stream), CancelStream("b", b.stream)]
    assert session.closed
    assert session.data_to_send() == []
    assert session.audio(a.stream, 0, b"\x00\x00") is False
    assert session.done(b.stream, 0, None, None) is False
    assert speak(session, "c") == []
    assert session.receive_bytes(b"x", 0.0) == []
    assert session.data_to_send() == []


# --------------------------------------------------------------------------------- limits


def test_stream_limit():
    session = make(limits=ProtocolLimits(max_streams=2))
    a = open_stream(session, "a", final=True)
    open_stream(session, "b")
    assert speak(session, "c") == []
    err = one_error(session)
    assert (err["id"], err["code"]) == ("c", "limit")
    assert len(session.open_streams) == 2
    session.done(a.stream, 0, None, None)  # a closed stream frees its place
    out(session)
    open_stream(session, "c")


def test_text_per_stream_limit_on_open_and_on_append():
    session = make(limits=ProtocolLimits(max_text_chars=100))
    assert speak(session, "a", "x" * 101) == []
    assert (one_error(session)["code"], session.open_streams) == ("limit", ())
    spec = open_stream(session, "a", text="x" * 60)
    assert speak(session, "a", "x" * 40) == [AppendText("a", spec.stream, "x" * 40, False)]
    assert speak(session, "a", "x") == [CancelStream("a", spec.stream)]
    err = one_error(session)
    assert (err["id"], err["code"]) == ("a", "limit")
    assert session.open_streams == ()


def test_100_kb_of_text_is_a_limit_error():
    session = make()
    assert speak(session, "a", "word " * 20_000) == []
    err = one_error(session)
    assert (err["id"], err["code"]) == ("a", "limit")
    assert_still_works(session)


def test_text_rate_limit_refills_with_time():
    limits = ProtocolLimits(max_chars_per_second=100.0, char_burst=200, max_text_chars=10_000)
    session = make(limits=limits)
    spec = open_stream(session, "a", text="x" * 150)  # t=0: 50 left in the bucket
    assert send(session, {"type": "speak", "id": "b", "text": "y" * 60}, now=0.0) == []
    err = one_error(session)
    assert (err["id"], err["code"]) == ("b", "limit")  # rejected text costs nothing
    msg = {"type": "speak", "id": "a", "text": "x" * 60}
    assert send(session, msg, now=0.05) == [CancelStream("a", spec.stream)]  # 55 < 60
    assert one_error(session)["code"] == "limit"
    assert send(session, {**msg, "id": "c"}, now=0.15) != []  # 65 >= 60
    assert out(session)[0]["type"] == "started"
    assert send(session, {**msg, "id": "d"}, now=10.0) != []  # refilled (to at most 200)
    assert out(session)[0]["type"] == "started"
    assert send(session, {**msg, "id": "e", "text": "x" * 150}, now=10.0) == []
    assert one_error(session)["code"] == "limit"


def test_time_going_backwards_refills_nothing():
    session = make(limits=ProtocolLimits(max_chars_per_second=100.0, char_burst=100))
    assert send(session, {"type": "speak", "id": "a", "text": "x" * 100}, now=50.0) != []
    out(session)
    assert send(session, {"type": "speak", "id": "b", "text": "x"}, now=0.0) == []
    assert one_error(session)["code"] == "limit"
    assert send(session, {"type": "speak", "id": "b", "text": "x"}, now=50.5) != []


def test_message_rate_limit():
    limits = ProtocolLimits(max_messages_per_second=10.0, message_burst=3)
    session = make(limits=limits)
    spec = open_stream(session, "a")
    assert send(session, {"type": "flush", "id": "a"}) == [FlushStream("a", spec.stream)]
    session.receive_bytes(b"x", 0.0)  # every frame counts
    assert one_error(session)["code"] == "bad_request"
    assert send(session, {"type": "flush", "id": "a"}) == [CancelStream("a", spec.stream)]
    err = one_error(session)
    assert (err["id"], err["code"]) == ("a", "limit")
    session.receive_bytes(b"x", 0.0)
    assert one_error(session)["code"] == "limit"
    assert send(session, {"type": "speak", "id": "b"}, now=0.1) != []  # one more after 0.1 s


def test_limits_do_not_end_other_streams():
    session = make(limits=ProtocolLimits(max_text_chars=10))
    a = open_stream(session, "a")
    b = open_stream(session, "b")
    speak(session, "a", "x" * 11)
    assert one_error(session)["id"] == "a"
    assert session.open_streams == (b,)
    assert not session.is_open(a.stream)
    assert speak(session, "b", "ok") == [AppendText("b", b.stream, "ok", False)]


# ------------------------------------------------------------------------------ fuzzing

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
KEYS = ["type", "id", "text", "final", "voice", "format", "sample_rate", "options"]
field_values = {
    "type": st.sampled_from(["speak", "flush", "cancel", "hello"]) | json_values,
    "id": st.sampled_from(["a", "b", 1, 2]) | json_values,
    "text": st.text(max_size=30) | json_values,
    "final": st.booleans() | json_values,
    "voice": st.sampled_from([*VOICES, "../../etc/passwd"]) | json_values,
    "format": st.sampled_from(["pcm_s16le", "mulaw", "opus", "wav"]) | json_values,
    "sample_rate": st.sampled_from([8000, 24000, 44100]) | json_values,
    "options": st.dictionaries(
        st.sampled_from([*OPTION_KEYS, "x"]),
        st.integers() | st.floats() | st.integers(-(10**400), 10**400) | json_values,
        max_size=3,
    )
    | json_values,
}
messages = st.fixed_dictionaries({}, optional=field_values) | st.dictionaries(
    st.sampled_from(KEYS) | st.text(max_size=5), json_values, max_size=5
)


def check_frames(frames: list[str | bytes]) -> list[dict[str, Any]]:
    """Every outgoing text frame is a JSON object of a known type; errors are well formed."""
    decoded = []
    for frame in frames:
        if isinstance(frame, bytes):
            continue
        frame.encode("utf-8")
        msg = json.loads(frame, parse_constant=lambda c: pytest.fail(f"{c} sent"))
        assert isinstance(msg, dict)
        assert msg["type"] in SERVER_TYPES
        if msg["type"] == "error":
            assert msg["code"] in ERROR_CODES
            assert msg["code"] != "internal", msg  # internal here means a bug in protocol.py
            assert isinstance(msg["message"], str) and len(msg["message"]) <= MAX_MESSAGE_CHARS
        decoded.append(msg)
    return decoded


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


@fuzz(300)
@given(st.lists(st.text(max_size=200), max_size=8))
def test_fuzz_random_strings_never_raise(frames):
    session = make()
    for frame in frames:
        session.receive_text(frame, 0.0)
        check_frames(session.data_to_send())


@fuzz(150)
@given(st.lists(messages, min_size=1, max_size=8))
def test_fuzz_json_messages_never_raise(msgs):
    session = make()
    for msg in msgs:
        events = session.receive_text(json.dumps(msg), 0.0)
        assert all(
            isinstance(e, OpenStream | AppendText | FlushStream | CancelStream) for e in events
        )
        check_frames(session.data_to_send())
    assert len(session.open_streams) <= session.limits.max_streams


numbers = st.integers() | st.floats() | st.integers(-(10**400), 10**400)
opening_speaks = st.fixed_dictionaries(
    {"type": st.just("speak"), "id": st.just("a")},
    optional={
        "text": st.text(max_size=30) | json_scalars,
        "final": st.booleans() | json_scalars,
        "voice": st.sampled_from(VOICES) | json_values,
        "format": st.sampled_from(FORMATS) | json_scalars,
        "sample_rate": st.sampled_from([8000, 24000]) | numbers | json_scalars,
        "options": st.dictionaries(st.sampled_from(OPTION_KEYS), numbers | json_values, max_size=2)
        | json_values,
    },
)


@fuzz(500)
@given(opening_speaks)
def test_fuzz_opening_speak_is_started_or_an_error_for_its_id(msg):
    """Every field valid or not: the answer is ``started`` or one error for id "a", never internal."""
    session = make()
    events = session.receive_text(json.dumps(msg), 0.0)
    (answer,) = check_frames(session.data_to_send())
    assert answer["type"] in ("started", "error")
    # NaN or Infinity anywhere make the frame malformed JSON: bad_request with a null id
    assert answer["id"] == "a" or (answer["id"], answer["code"]) == (None, "bad_request")
    if answer["type"] == "started":
        (event,) = events
        assert isinstance(event, OpenStream) and event.spec.stream == answer["stream"]
    else:
        assert events == [] and session.open_streams == ()


IDS = ["a", "b", 7]
speak_ops = st.tuples(
    st.just("speak"),
    st.sampled_from(IDS),
    st.sampled_from(["", "Hi. ", "x" * 40]),
    st.booleans(),
    st.sampled_from([{}] * 6 + [{"format": "pcm_f32le"}, {"voice": "nope"}, {"bogus": 1}]),
)
other_client_ops = st.one_of(
    st.tuples(st.just("flush"), st.sampled_from(IDS)),
    st.tuples(st.just("cancel"), st.sampled_from(IDS)),
    st.tuples(st.just("binary")),
)
driver_ops = st.tuples(
    st.just("engine"),
    st.integers(0, 3),
    st.sampled_from(["next"] * 12 + ["end"] * 3 + ["done"] * 3 + ["fail", "cancel"]),
)


class FakeDriver:
    """A driver that keeps the contract: it mirrors the session's streams from the events."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.jobs: dict[int, dict[str, Any]] = {}
        self.calls: collections.Counter[str] = collections.Counter()

    def perform(self, events: list[Any]) -> None:
        for event in events:
            if isinstance(event, OpenStream):
                width = 4 if event.spec.format == "pcm_f32le" else 2
                job = {"final": event.final, "segment": None, "next": 0, "width": width}
                self.jobs[event.spec.stream] = job
            elif isinstance(event, AppendText):
                self.jobs[event.stream]["final"] |= event.final
            elif isinstance(event, CancelStream):
                del self.jobs[event.stream]
            else:
                assert event.stream in self.jobs

    def step(self, k: int, action: str) -> None:
        """Do what ``action`` says to the k-th job, or the next thing the contract allows."""
        if not self.jobs:
            return
        n = sorted(self.jobs)[k % len(self.jobs)]
        job, s = self.jobs[n], self.session
        if action in ("end", "done") and job["segment"] is not None:
            assert s.segment_end(n, job["segment"], 60.0)
            job["segment"] = None
            self.calls["segment_end"] += 1
        if action == "next" and job["segment"] is None:
            assert s.segment(n, job["next"], "text")
            job["segment"], job["next"] = job["next"], job["next"] + 1
            self.calls["segment"] += 1
        elif action == "next":
            assert s.audio(n, job["segment"], b"\x00" * job["width"] * 3)
            self.calls["audio"] += 1
        elif action == "done" and job["final"]:
            assert s.done(n, 60.0 * job["next"], 10.0, 0.5)
            del self.jobs[n]
            self.calls["done"] += 1
        elif action == "fail":
            assert s.fail(n, Busy("full"))
            del self.jobs[n]
            self.calls["fail"] += 1
        elif action == "cancel":
            assert s.cancelled(n)
            del self.jobs[n]
            self.calls["cancelled"] += 1


class Client:
    """What a client sees: checks the ordering guarantees of docs/protocol.md."""

    def __init__(self) -> None:
        self.open: dict[Any, int] = {}  # id -> stream number
        self.numbers: set[int] = set()
        self.segment: dict[int, int | None] = {}
        self.next_segment: dict[int, int] = {}
        self.seq: dict[int, int] = {}
        self.cancel_sent: set[Any] = set()

    def read(self, frames: list[str | bytes]) -> None:
        decoded = iter(check_frames(frames))
        for frame in frames:
            if isinstance(frame, bytes):
                n, index, seq = struct.unpack_from("<III", frame)
                assert n in self.open.values(), "audio for a closed stream"
                assert self.segment[n] == index, "audio outside its segment"
                assert seq == self.seq[n]
                self.seq[n] += 1
                continue
            msg = next(decoded)
            kind, sid = msg["type"], msg.get("id")
            if kind == "started":
                assert sid not in self.open and msg["stream"] not in self.numbers
                self.open[sid] = msg["stream"]
                self.numbers.add(msg["stream"])
                self.segment[msg["stream"]], self.next_segment[msg["stream"]] = None, 0
                self.seq[msg["stream"]] = 0
            elif kind in ("segment", "segment_end"):
                n = self.open[sid]
                if kind == "segment":
                    assert self.segment[n] is None and msg["index"] == self.next_segment[n]
                    self.segment[n], self.next_segment[n] = msg["index"], msg["index"] + 1
                else:
                    assert self.segment[n] == msg["index"]
                    self.segment[n] = None
            elif kind in ("done", "cancelled"):
                assert sid in self.open, f"{kind} for a stream that is not open"
                del self.open[sid]
            elif kind == "error" and sid in self.open:
                del self.open[sid]


@fuzz(500)
@given(
    st.lists(
        st.integers(0, 9).flatmap(
            lambda i: speak_ops if i < 3 else other_client_ops if i < 4 else driver_ops
        ),
        min_size=5,
        max_size=80,
    )
)
def test_fuzz_conversation_keeps_every_ordering_guarantee(ops):
    session = make(limits=ProtocolLimits(max_streams=2, max_text_chars=100))
    driver, client = FakeDriver(session), Client()
    now = 0.0
    for op in ops:
        now += 0.01
        if op[0] == "speak":
            _, sid, text, final, extra = op
            msg = {"type": "speak", "id": sid, "text": text, "final": final, **extra}
            driver.perform(session.receive_text(json.dumps(msg), now))
        elif op[0] in ("flush", "cancel"):
            driver.perform(session.receive_text(json.dumps({"type": op[0], "id": op[1]}), now))
        elif op[0] == "binary":
            driver.perform(session.receive_bytes(b"\x00", now))
        else:
            driver.step(op[1], op[2])
        client.read(session.data_to_send())
        assert set(driver.jobs) == {s.stream for s in session.open_streams}
        assert client.open == {s.id: s.stream for s in session.open_streams}
    driver.perform(session.close())
    assert driver.jobs == {}


def test_refuse_replaces_the_hello_with_one_error_and_closes():
    session = Session(model="random:tiny", voices=VOICES)
    session.refuse(LimitExceeded("too many connections"))
    (frame,) = session.data_to_send()
    assert json.loads(frame) == {
        "type": "error",
        "id": None,
        "code": "limit",
        "message": "too many connections",
    }
    assert session.closed and session.take_errors() == ["limit"]
    speak = {"type": "speak", "id": "a", "text": "Hi.", "final": True}
    assert session.receive_text(json.dumps(speak), 0.0) == []
    assert session.data_to_send() == []


def test_refuse_is_only_for_a_new_session():
    session = make()
    session.receive_text(json.dumps({"type": "speak", "id": "a", "text": "Hi."}), 0.0)
    with pytest.raises(InternalError):
        session.refuse(LimitExceeded("too late"))


def test_error_codes_are_counted_once_as_they_are_queued():
    session = make()
    session.receive_text("{bad", 0.0)
    session.receive_text(json.dumps({"type": "speak", "id": "v", "voice": "nobody"}), 0.0)
    assert session.take_errors() == ["bad_request", "unknown_voice"]
    assert session.take_errors() == []


def test_voices_are_checked_against_a_live_collection():
    voices = set(VOICES)
    session = Session(model="random:tiny", voices=voices)
    assert json.loads(session.data_to_send()[0])["voices"] == sorted(VOICES)
    voices.add("narrator")  # a voice added while the connection is open
    (event,) = session.receive_text(
        json.dumps({"type": "speak", "id": "a", "text": "Hi.", "voice": "narrator"}), 0.0
    )
    assert isinstance(event, OpenStream) and event.spec.voice == "narrator"

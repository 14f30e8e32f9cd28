"""A stream's job with early audio, without sockets or models at work.

The job is fed finished requests and previews by hand (as the runtime would hand them over)
and writes into a real protocol session; what the session queues for the client is checked.
"""

import json
import struct

import numpy as np
import pytest

from stream_engine.audio.splice import DEFAULT_HOLD
from stream_engine.protocol import Session
from stream_engine.runtime.request import Request, Status
from stream_engine.server.jobs import Job

TEXT = "The first sentence of the stream is here. And a second sentence follows it."


def outbox(session: Session) -> list:
    """JSON messages as dicts, audio frames as (segment, samples)."""
    frames = []
    for frame in session.data_to_send():
        if isinstance(frame, bytes):
            _, segment, _ = struct.unpack_from("<III", frame)
            frames.append((segment, np.frombuffer(frame[12:], "<i2").size))
        else:
            frames.append(json.loads(frame))
    return frames


def kinds(frames: list) -> list[str]:
    return ["audio" if isinstance(f, tuple) else f["type"] for f in frames]


def samples(frames: list, segment: int) -> int:
    return sum(n for f in frames if isinstance(f, tuple) and f[0] == segment for n in [f[1]])


@pytest.fixture
def job(tiny):
    session = Session(model="random:tiny", voices=list(tiny.voices))
    session.data_to_send()  # hello
    msg = {"type": "speak", "id": "a", "text": TEXT, "final": True, "early_audio": True}
    (event,) = session.receive_text(json.dumps(msg), 0.0)
    session.data_to_send()  # started
    submitted: list[Request] = []
    job = Job(
        event.spec,
        tiny,
        None,
        session,
        submit=lambda j, r: submitted.append(r),
        cancel=lambda i: True,
        preview_frames=30,
    )
    job.add_text(event.text, event.final)
    job.submitted = submitted  # type: ignore[attr-defined]
    return job


def finish(req: Request, frames: int, level: float = 0.25) -> Request:
    req.audio = np.full(frames * 320, level, np.float32)
    req.status = Status.FINISHED
    return req


def preview(req: Request, frames: int, level: float = 0.5) -> Request:
    return finish(req.preview(np.zeros((2, frames), np.int64)), frames, level)


def test_only_the_awaited_segment_asks_for_previews(job):
    first, second = job.submitted
    assert first.preview_frames == 30 and second.preview_frames == 0


def test_previews_go_out_first_then_the_rest_of_the_segment(job):
    first, second = job.submitted
    job.finished(preview(first, 30))
    frames = outbox(job.session)
    assert kinds(frames)[0] == "segment" and "segment_end" not in kinds(frames)
    assert samples(frames, 0) == 30 * 320 - DEFAULT_HOLD
    job.finished(preview(first, 105))
    job.finished(finish(first, 200))
    job.finished(finish(second, 100))
    frames += outbox(job.session)
    assert kinds(frames).count("segment") == 2  # one per segment, previews or not
    assert samples(frames, 0) == 200 * 320 and samples(frames, 1) == 100 * 320
    ends = [f for f in frames if not isinstance(f, tuple) and f["type"] == "segment_end"]
    assert ends[0]["audio_ms"] == pytest.approx(200 * 320 / 24, abs=1)
    assert kinds(frames)[-1] == "done"


def test_a_preview_of_a_later_segment_waits_its_turn(job):
    first, second = job.submitted
    job.finished(preview(second, 30))  # segment 0 has not gone out yet: kept
    assert outbox(job.session) == []
    job.finished(finish(first, 90))
    frames = outbox(job.session)
    # segment 0 whole, then segment 1 starts from its preview (and is not over)
    k = kinds(frames)
    assert k.count("segment") == 2 and k.count("segment_end") == 1
    assert set(k[k.index("segment", 1) + 1 :]) == {"audio"}
    assert samples(frames, 1) == 30 * 320 - DEFAULT_HOLD
    job.finished(finish(second, 60))
    frames += outbox(job.session)
    assert samples(frames, 1) == 60 * 320 and kinds(frames)[-1] == "done"


def test_late_and_failed_previews_change_nothing(job):
    first, second = job.submitted
    late = preview(first, 30)
    failed = preview(first, 60)
    failed.status = Status.FAILED
    job.finished(failed)  # the stream does not fail with it
    assert outbox(job.session) == [] and not job.failed
    job.finished(finish(first, 90))
    job.finished(late)  # its segment went out already
    job.finished(finish(second, 40))
    frames = outbox(job.session)
    assert samples(frames, 0) == 90 * 320 and kinds(frames)[-1] == "done"


def test_previews_after_stop_are_dropped(job):
    first, _ = job.submitted
    job.stop()
    job.finished(preview(first, 30))
    assert outbox(job.session) == []

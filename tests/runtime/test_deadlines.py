"""The order in which stages take requests: earliest due first (``Runtime.due``)."""

import math

import numpy as np
import pytest
import torch

from stream_engine.config import GenerationOptions
from stream_engine.runtime.loop import Runtime
from stream_engine.runtime.request import Request, Status
from stream_engine.runtime.scheduler import STAGES, StageName
from stream_engine.runtime.stages import CodecStage, Stage, _Row

RATE = 50.0  # semantic tokens per audio second, in these tests


class OneStep(Stage):
    """A fake stage: a request leaves after one step; the semantic stage makes ``tokens``."""

    def __init__(self, name: str, slots: int, entered: list, tokens: dict[int, int]) -> None:
        super().__init__(slots)
        self.name, self.entered, self.tokens = name, entered, tokens

    def admit(self, req):
        self.slots.take(_Row(req))
        req.status = Status.RUNNING
        self.entered.append((self.name, req.id))

    def step(self):
        out = []
        for i, row in self.slots.items():
            req = row.req
            if self.name == "semantic":
                req.semantic = [0] * self.tokens[req.id]
            req.coarse, req.fine = np.zeros((2, 1), np.int64), np.zeros((8, 1), np.int64)
            req.audio = np.zeros(320, np.float32)
            self.slots.release(i)
            out.append(req)
        return out


def request(id, at, after=None):
    req = Request(id, f"text {id}", [1], GenerationOptions(seed=1), None, 10, after=after)
    req.submitted_at = at
    return req


def runtime(entered, tokens):
    stages = {n: OneStep(n, 1, entered, tokens) for n in STAGES}
    return Runtime(stages, semantic_rate_hz=RATE)


def test_due_times():
    rt = runtime([], {})
    a0 = request(1, at=100.0)
    a1 = request(2, at=101.0, after=a0)
    a2 = request(3, at=200.0, after=a1)
    assert rt.due(a0) == 100.0  # a stream's first segment: when it arrived
    # the previous segment's length is not known yet: its arrival stands in, nothing is kept
    assert rt.due(a1) == 101.0 and a1.due is None
    a0.semantic, a0.stage = [0] * 500, StageName.COARSE  # 10 s of audio, out of semantic
    assert rt.due(a1) == pytest.approx(110.0)  # when a0's audio ends, had it started on time
    assert a1.due == pytest.approx(110.0)
    a0.semantic = [0] * 5000  # kept: it does not change once computed
    assert rt.due(a1) == pytest.approx(110.0)
    a1.semantic, a1.status = [0] * 50, Status.FINISHED
    assert rt.due(a2) == 200.0  # never before it arrived (111 s < 200 s)
    preview = a0.preview(np.zeros((2, 4), np.int64))
    assert rt.due(preview) == -math.inf  # a listener waits for it


@pytest.mark.parametrize(
    "b_arrives, order",
    [
        (0.5, [1, 3, 2]),  # stream A's second segment is due at 2.0 s: B's first goes before
        (3.0, [1, 2, 3]),  # B arrives after A's first segment would have ended: A goes on
    ],
)
def test_a_new_stream_goes_before_segments_not_yet_due(b_arrives, order):
    entered: list = []
    rt = runtime(entered, tokens={1: 100, 2: 100, 3: 100})  # 2 s of audio each
    a0 = request(1, at=0.0)
    a1 = request(2, at=0.1, after=a0)
    b0 = request(3, at=b_arrives)
    for r in (a0, a1, b0):
        rt.submit(r)
    while rt.busy:
        rt.step()
    assert all(r.status is Status.FINISHED for r in (a0, a1, b0))
    # one slot per stage: every stage takes them in due order
    for name in STAGES:
        assert [i for n, i in entered if n == name] == order, name


def test_codec_decodes_the_request_due_first():
    codec = CodecStage(torch.nn.Linear(1, 1), slots=3)
    codec.decode = lambda fine: np.zeros(320, np.float32)  # the order is under test, not EnCodec
    a1, b0, a0 = request(1, at=0.0), request(2, at=1.0), request(3, at=2.0)
    a1.due, b0.due = 9.0, 1.0  # a1: a stream's later segment, due after b0 (a first segment)
    for r in (a1, b0, a0):
        r.fine = np.zeros((8, 1), np.int64)
        codec.admit(r)
    # a0 has no due time set: its arrival (2.0) stands in
    assert [codec.step()[0].id for _ in range(3)] == [2, 3, 1]

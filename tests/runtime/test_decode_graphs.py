"""What of the decode graphs runs without a GPU: buckets, padding, the whole step, no late capture.

``StepGraphs(capture=False)`` keeps the graphs' bookkeeping and "replays" by running the stage's
step on the bucket's padded shapes, so what the CUDA graphs rely on (padding rows, kv buckets,
static buffers, sampling inside the step, staleness after a cache reallocation) is tested here
on every machine; tests/gpu/test_cuda.py tests the capture itself on a GPU.
"""

import logging

import numpy as np
import pytest
import torch

from stream_engine.bark.model import CausalGPT, from_hf
from stream_engine.config import GenerationOptions
from stream_engine.runtime import cuda
from stream_engine.runtime.cuda import StepGraphs, batch_buckets, bucket_for, kv_buckets, to_device
from stream_engine.runtime.stages import CoarseStage, DecodeStage, SemanticStage


def test_buckets():
    assert batch_buckets(1) == (1,)
    assert batch_buckets(8) == (1, 2, 4, 8)
    assert batch_buckets(6) == (1, 2, 4, 6)
    assert batch_buckets(6, "slots") == (6,) and batch_buckets(1, "slots") == (1,)
    with pytest.raises(ValueError, match="batches"):
        batch_buckets(8, "some")
    assert kv_buckets(1024) == (128, 256, 384, 512, 640, 768, 896, 1024)
    assert kv_buckets(300, 128) == (128, 256, 300)
    assert bucket_for(3, (1, 2, 4, 8)) == 4
    assert bucket_for(4, (1, 2, 4, 8)) == 4
    assert bucket_for(129, kv_buckets(1024)) == 256
    with pytest.raises(ValueError):
        bucket_for(9, (1, 2, 4, 8))
    with pytest.raises(ValueError):
        batch_buckets(0)


def _stage(tiny, kind: type[DecodeStage], slots: int = 6, graphs: bool = True) -> DecodeStage:
    """A stage on the tiny engine's weights with its own cache; graphs emulated (no CUDA)."""
    hf = tiny.loaded.model
    model = from_hf(hf.semantic if kind is SemanticStage else hf.coarse_acoustics)
    assert isinstance(model, CausalGPT)
    return kind(model, tiny.consts, slots, cuda_graphs=graphs)


def test_capture_needs_cuda(tiny):
    stage = _stage(tiny, SemanticStage, graphs=False)
    with pytest.raises(ValueError, match="CUDA"):
        StepGraphs(stage.model, stage.step_fn, capture=True)


@pytest.mark.parametrize("kind", [SemanticStage, CoarseStage])
@torch.inference_mode()
def test_padded_step_equals_the_unpadded_step(tiny, kind):
    """The step on the buckets' shapes (what a graph replays) against the step on the exact
    shapes, rows at their own positions, n and kv_len not buckets: same greedy tokens, logits
    equal to rounding. The step includes sampling: its tokens come back in ``ids``."""
    stage = _stage(tiny, kind)
    graphs = stage.graphs
    assert graphs is not None and not graphs.captures
    lens = [40, 7, 130, 1, 120, 64]

    def run(n: int, padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
        stage.params.p.greedy.fill_(True)
        ids = torch.randint(0, 1000, (6, max(lens)), generator=torch.Generator().manual_seed(3))
        stage.model.prefill(stage.model.embed(ids), torch.arange(6), torch.tensor(lens) - 1)
        stage.ids.copy_(ids[:, 0])
        pos = list(lens[:n])
        tokens, logits = [], []
        for k in range(12):  # rows cross the 128 kv bucket
            b, s, _ = graphs.key(n, max(pos) + 1, False)
            if not padded:
                b, s = n, max(pos) + 1
            meta = [pos + [0] * (b - n), [k] * b, [0] * b]
            stage.meta[:, :b] = to_device(meta, stage.device)
            stage.ids[n:b] = 0
            stage.step_fn(b, s, False)
            tokens.append(stage.ids[:n].clone())
            logits.append(stage.logits[:n].clone())
            pos = [p + 1 for p in pos]
        return torch.stack(tokens), torch.stack(logits)

    for n in (5, 3, 6, 1):
        exact_t, exact_l = run(n, padded=False)
        pad_t, pad_l = run(n, padded=True)
        assert torch.equal(exact_t, pad_t)
        finite = torch.isfinite(exact_l)
        assert torch.equal(finite, torch.isfinite(pad_l))
        torch.testing.assert_close(pad_l[finite], exact_l[finite], atol=1e-5, rtol=1e-5)
    assert int(finite.sum()) > 0


@torch.inference_mode()
def test_trial_leaves_the_stage_as_it_found_it(tiny):
    """The self-check's trial, on 3 of 4 slots, greedy and sampled. (Here the emulated replay
    is the eager step on the same shapes, so the two ways agree by construction; a real
    replay against it is tests/gpu's.)"""
    stage = _stage(tiny, CoarseStage, slots=4)
    stage.capture_graphs()
    p = stage.params.p
    p.greedy.fill_(False)
    p.temperature.fill_(0.7)
    p.top_k.fill_(3)
    before = [t.clone() for t in (p.temperature, p.top_k, p.top_p, p.greedy, p.seed)]
    lens = [120, 30, 200]
    greedy = stage.trial(lens, 10, graphs=False)
    sampled = stage.trial(lens, 10, graphs=False, variant=True)
    replayed = stage.trial(lens, 10, graphs=True, variant=True)
    V = stage.model.cfg.output_vocab_size
    assert greedy[0].shape == (10, 3) and greedy[1].shape == (10, 3, V)
    assert not torch.equal(greedy[0], sampled[0])  # the sampled variant samples
    assert torch.equal(sampled[0], replayed[0]) and torch.equal(sampled[1], replayed[1])
    after = (p.temperature, p.top_k, p.top_p, p.greedy, p.seed)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert int(stage.ids.abs().sum()) == 0 and int(stage.meta.abs().sum()) == 0


def _serve(stage: DecodeStage, reqs) -> None:
    for r in reqs:
        stage.admit(r)
    left = {r.id for r in reqs}
    for _ in range(2000):
        left -= {r.id for r in stage.step()}
        if not left:
            return
    raise AssertionError("the stage did not finish")


def _requests(tiny, n: int, **options):
    texts = ["One, two.", "A somewhat longer sentence for the second row.", "Three.", "Four!"]
    opts = GenerationOptions(max_semantic_tokens=30, **options)
    return [tiny.request(texts[i % 4], None, opts) for i in range(n)]


@torch.inference_mode()
def test_a_stage_serves_from_its_graphs_and_never_captures_late(tiny, monkeypatch, caplog):
    stage = _stage(tiny, SemanticStage, slots=4)
    stage.capture_graphs()
    stage2 = _stage(tiny, SemanticStage, slots=2)
    stage2.capture_graphs()
    assert set(stage.graphs.graphs) == {
        (b, s, v) for b in (1, 2, 4) for s in stage.graphs.kv_lens for v in (False, True)
    }

    def no_capture(*args):
        raise AssertionError("captured while serving")

    monkeypatch.setattr(StepGraphs, "_capture", no_capture)
    monkeypatch.setattr(StepGraphs, "capture_all", no_capture)
    # the stage's own eager calls (replays call the step through the graphs, not this name)
    eager_calls = []
    real_step = stage.step_fn
    monkeypatch.setattr(stage, "step_fn", lambda *key: eager_calls.append(key) or real_step(*key))
    _serve(stage, _requests(tiny, 3))
    _serve(stage, _requests(tiny, 2, top_k=50, top_p=0.9))  # the other variant
    assert stage.graphs.eager_steps == 0 and eager_calls == []
    # a missing bucket runs eagerly, counted: 3 rows from position 257 (while all three live)
    stage.graphs.graphs.pop((4, 384, False))
    _serve(stage, _requests(tiny, 3, greedy=True))
    assert len(eager_calls) > 0 and {k[0] for k in eager_calls} == {3}
    assert stage.graphs.eager_steps == len(eager_calls)
    missed = len(eager_calls)
    _serve(stage, _requests(tiny, 1, greedy=True))  # bucket (1, 384): captured
    assert stage.graphs.eager_steps == missed == len(eager_calls)
    stage.graphs.graphs.clear()  # none captured
    _serve(stage, _requests(tiny, 1, greedy=True))
    assert len(eager_calls) > missed and stage.graphs.eager_steps == len(eager_calls)
    # a reallocated cache makes the graphs stale: eager from then on, with one warning
    stage2.model.setup_cache(2)
    with caplog.at_level(logging.WARNING, logger="stream_engine.runtime.cuda"):
        _serve(stage2, _requests(tiny, 2))
    assert stage2.graphs.eager_steps > 0
    assert sum("decode runs eagerly" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("kind", [SemanticStage, CoarseStage])
@torch.inference_mode()
def test_graphs_give_the_tokens_of_eager_decode(tiny, kind):
    """Whole requests through a stage whose steps replay (emulated) graphs on padded shapes,
    against the same stage decoding eagerly: the same tokens, sampled and greedy, with top-k."""

    def run(graphs: bool) -> list:
        stage = _stage(tiny, kind, slots=4, graphs=graphs)
        if graphs:
            stage.capture_graphs()
        reqs = (
            _requests(tiny, 2, seed=5)
            + _requests(tiny, 1, seed=7, top_k=20, top_p=0.8)  # the filtering variant
            + _requests(tiny, 1, greedy=True)
        )
        if kind is CoarseStage:
            sem = _stage(tiny, SemanticStage, slots=4, graphs=False)
            _serve(sem, reqs)
        _serve(stage, reqs)
        assert graphs == (stage.graphs is not None and stage.graphs.eager_steps == 0)
        return [np.asarray(r.semantic if kind is SemanticStage else r.coarse) for r in reqs]

    for a, b in zip(run(False), run(True), strict=True):
        np.testing.assert_array_equal(a, b)


def test_to_device_on_cpu():
    t = to_device([3, 1, 2], torch.device("cpu"))
    assert t.dtype == torch.long and t.tolist() == [3, 1, 2]


def test_graphs_only_on_cuda():
    assert cuda.on_gpu("cuda:0") and not cuda.on_gpu("cpu")

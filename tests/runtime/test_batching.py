"""Batch invariance: every request of a mixed batch equals the same request run alone."""

import numpy as np
from reference import MIXED_CASES, run_mixed

from stream_engine.config import GenerationOptions

CASES = MIXED_CASES


def test_mixed_batch_equals_alone(tiny):
    alone = [tiny.generate(t, voice=v, **o)[0] for t, v, o in CASES]
    mixed = run_mixed(tiny)  # two join now, two after a few steps
    for a, b in zip(alone, mixed, strict=True):
        np.testing.assert_array_equal(a.semantic, b.semantic)
        np.testing.assert_array_equal(a.coarse, b.coarse)
        np.testing.assert_array_equal(a.fine, b.fine)
        assert np.abs(a.audio - b.audio).max() <= 1e-5
    # and the requests differ from each other (the test could fail)
    assert not np.array_equal(alone[0].semantic[:20], alone[1].semantic[:20])


def test_cancel_frees_every_stage(tiny):
    rt = tiny.runtime
    r = tiny.request("To be cancelled.", None, GenerationOptions(max_semantic_tokens=50))
    rt.submit(r)
    for _ in range(3):
        rt.step()
    assert rt.cancel(r.id)
    assert not rt.busy
    assert r.status.name == "CANCELLED"
    assert rt.stages["semantic"].active == 1  # stages drop it at their next step boundary
    assert rt.step() == []
    assert all(s.active == 0 for s in rt.stages.values())
    assert not rt.cancel(r.id)


def test_stale_nan_keys_in_a_slot_do_not_poison_its_next_request():
    """A batched decode step reads the cache up to its longest row and masks each row's later
    positions, but 0 × NaN is NaN: a slot's K/V are zeroed when a request takes it (the
    masked path: oneDNN decode kernels; rows of different lengths: one has a voice prompt)."""
    from stream_engine import Engine
    from stream_engine.config import EngineConfig

    config = EngineConfig(cpu_decode_kernel="onednn")
    engine = Engine.load("random:tiny", device="cpu", config=config)
    cases = [("Short one, with a voice.", "v2/en_speaker_1"), ("This one has none.", None)]

    def run():
        reqs = [engine.request(t, v, GenerationOptions(greedy=True)) for t, v in cases]
        for r in reqs:
            engine.runtime.submit(r)
        pending = {r.id for r in reqs}
        while pending:
            pending -= {r.id for r in engine.runtime.step()}
        return [r.speech(engine.sample_rate) for r in reqs]

    clean = run()
    for model in (engine.semantic_model, engine.coarse_model):
        for block in model.blocks:
            block.attn.cache.k.fill_(float("nan"))  # what an fp16 overflow could leave
            block.attn.cache.v.fill_(float("nan"))
    for a, c in zip(run(), clean, strict=True):
        np.testing.assert_array_equal(a.semantic, c.semantic)
        np.testing.assert_array_equal(a.coarse, c.coarse)
        assert np.isfinite(a.audio).all()

"""Greedy tokens identical to transformers' BarkModel on the same weights; audio within 1e-4."""

import numpy as np
import pytest
import torch
from reference import reference_generate

from stream_engine import Engine
from stream_engine.config import GenerationOptions

LONG = "This sentence is long enough that Bark needs several coarse windows to say it all."


def _check(engine, text, voice, n):
    ref = reference_generate(engine.loaded.model, engine.loaded.processor, text, voice, n)
    ours = engine.generate(text, voice=voice, greedy=True, max_semantic_tokens=n)[0]
    np.testing.assert_array_equal(ours.semantic, ref.semantic)
    np.testing.assert_array_equal(ours.coarse, ref.coarse)
    np.testing.assert_array_equal(ours.fine, ref.fine)
    assert ours.audio.shape == ref.audio.shape
    assert np.abs(ours.audio - ref.audio).max() <= 1e-4
    return ours


@pytest.mark.parametrize("voice", [None, "v2/en_speaker_1"])
def test_short_text_matches_reference(tiny, voice):
    _check(tiny, "Hello there, how are you today?", voice, 40)


@pytest.mark.parametrize("seed", [1, 2])
def test_seeds_match_reference(seed):
    engine = Engine.load(f"random:tiny@{seed}", device="cpu")
    _check(engine, "Another voice, another seed.", "v2/en_speaker_3", 120)


def test_long_text_several_coarse_windows_and_two_fine_windows(tiny):
    # 768 semantic tokens -> 1154 frames: 20 coarse windows; with 512 voice frames, 3 fine windows
    ours = _check(tiny, LONG, "v2/en_speaker_2", 768)
    assert ours.coarse.shape[1] > 1024


def test_audio_equals_barkmodel_generate(tiny):
    model, proc = tiny.loaded.model, tiny.loaded.processor
    inputs = proc("Short and sweet.", voice_preset="v2/en_speaker_0")
    with torch.no_grad():
        audio = model.generate(**inputs, do_sample=False, semantic_max_new_tokens=30)
    ours = tiny.generate(
        "Short and sweet.", voice="v2/en_speaker_0", greedy=True, max_semantic_tokens=30
    )
    assert np.abs(audio[0].numpy() - ours[0].audio).max() <= 1e-4


def test_teacher_forced_logits_match_reference(tiny):
    """Under sampling: feed the reference's own sequence, our logits equal its logits."""
    torch.manual_seed(0)
    ids = torch.randint(0, 12_000, (1, 300))
    with torch.no_grad():
        ref = tiny.loaded.model.coarse_acoustics(ids).logits[0]
        m = tiny.coarse_model
        m.setup_cache(1)
        try:
            first = m.prefill(m.embed(ids[:, :257]), torch.tensor([0]), torch.tensor([256]))
            assert torch.allclose(first[0], ref[256], atol=1e-4)
            for p in range(257, 300):
                step = m.decode(ids[0, p : p + 1], torch.tensor([p]), p + 1)
                # the coarse stage restricts decode to the ids it can pick (10000 up)
                assert m.head_start == 10_000 and step.shape == (1, ref.size(-1) - 10_000)
                assert torch.allclose(step[0], ref[p, 10_000:], atol=1e-4)
        finally:
            m.setup_cache(tiny.config.coarse_slots)  # the shared engine's coarse stage uses it
        fine_ids = torch.randint(0, 1024, (1, 1024, 8))
        for cb in (2, 5, 7):
            ref_f = tiny.loaded.model.fine_acoustics(cb, fine_ids).logits
            assert torch.allclose(tiny.fine_model(fine_ids, cb), ref_f, atol=1e-4)


def test_deferred_token_readback_is_exact():
    """``sync_every > 1`` (the CUDA setting: tokens read back every 8 steps) gives the same
    tokens, including for caps that are not a multiple of 8, in a batch of two."""
    engine = Engine.load("random:tiny", device="cpu")
    engine.runtime.stages["semantic"].sync_every = 8
    cases = [("Hello there, how are you today?", "v2/en_speaker_1", 37), ("Bye now.", None, 42)]
    ours = [
        engine.generate(text, voice=voice, greedy=True, max_semantic_tokens=n)[0]
        for text, voice, n in cases
    ]
    for (text, voice, n), speech in zip(cases, ours, strict=True):
        ref = reference_generate(engine.loaded.model, engine.loaded.processor, text, voice, n)
        np.testing.assert_array_equal(speech.semantic, ref.semantic)
        np.testing.assert_array_equal(speech.coarse, ref.coarse)
    reqs = [
        engine.request(t, v, GenerationOptions(greedy=True, max_semantic_tokens=n))
        for t, v, n in cases
    ]
    for r in reqs:
        engine.runtime.submit(r)
    pending = {r.id for r in reqs}
    while pending:
        pending -= {r.id for r in engine.runtime.step()}
    for r, speech in zip(reqs, ours, strict=True):  # batched, the same as alone
        np.testing.assert_array_equal(r.speech(engine.sample_rate).semantic, speech.semantic)

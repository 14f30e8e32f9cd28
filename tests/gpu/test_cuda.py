"""On a CUDA device: decode graphs, exactness against transformers, half precision.

Every test here is marked ``gpu`` (tests/conftest.py skips them without CUDA). Run with
``pytest -m gpu tests/gpu -q`` (on the lent GPU machine, with the wheels benchmarks/README.md
says to carry).

What is exact and what is close:

* a graph replay is the eager step (forward pass and sampling) on the same padded shapes, bit
  for bit (same kernels);
* against the unpadded eager step the logits differ by rounding only (the kernels may sum in
  another order for another shape), so they are compared with a tolerance and by argmax;
* greedy tokens of the CUDA engine equal transformers' on the same device and weights (the
  CPU claim of tests/test_exactness.py, on CUDA), with graphs on and with graphs off.
"""

from __future__ import annotations

import copy
import importlib.util
import threading

import numpy as np
import pytest
import torch
from reference import reference_generate, run_mixed

from stream_engine import Engine, EngineConfig
from stream_engine.bark.model import CausalGPT, from_hf
from stream_engine.config import GenerationOptions
from stream_engine.runtime.pipeline import Pipeline
from stream_engine.runtime.self_check import check_graphs
from stream_engine.runtime.stages import CoarseStage, DecodeStage, SemanticStage

pytestmark = pytest.mark.gpu

LONG = "This sentence is long enough that Bark needs several coarse windows to say it all."
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.fixture(scope="module")
def engines():
    """Engines on CUDA by (dtype, cuda_graphs), loaded on first use and kept for the module."""
    cache: dict[tuple[str, bool], Engine] = {}

    def get(dtype: str = "float32", graphs: bool = True) -> Engine:
        key = (dtype, graphs)
        if key not in cache:
            config = EngineConfig(cuda_graphs=graphs)
            cache[key] = Engine.load("random:tiny", device="cuda", dtype=dtype, config=config)
        return cache[key]

    return get


# -- decode graphs against eager decode -------------------------------------------------------


def _own_model(engine: Engine, name: str, slots: int) -> CausalGPT:
    """A copy of one of the engine's causal models with its own cache (the stages keep theirs)."""
    model = copy.deepcopy(getattr(engine, name))
    model.setup_cache(slots)
    return model


def _stage(engine: Engine, name: str, slots: int) -> DecodeStage:
    """A stage of one of the engine's models with its own cache, its graphs captured."""
    hf = engine.loaded.model
    model = from_hf(hf.semantic if name == "semantic" else hf.coarse_acoustics)
    assert isinstance(model, CausalGPT)
    model.set_attn(engine.config.attn)
    kind = SemanticStage if name == "semantic" else CoarseStage
    stage = kind(model, engine.consts, slots, cuda_graphs=True)
    stage.capture_graphs()
    return stage


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("name", ["semantic", "coarse"])
def test_graph_replay_equals_the_eager_step_bit_for_bit(engines, name, dtype):
    stage = _stage(engines(dtype), name, 8)
    assert stage.graphs is not None and stage.graphs.captures
    assert len(stage.graphs.graphs) == 2 * len(stage.graphs.batch_sizes) * len(stage.graphs.kv_lens)
    check = check_graphs(stage, steps=40)  # every batch bucket, greedy and sampled
    assert check.trials == 2 * len(stage.graphs.batch_sizes)
    assert check.tokens_equal and check.finite, check
    assert check.max_abs_diff == 0.0, check


@pytest.mark.parametrize("name", ["semantic", "coarse"])
@torch.inference_mode()
def test_padded_replay_close_to_the_unpadded_step(engines, name):
    """Rows at their own positions, n and kv_len not buckets: the replay's logits against the
    eager step on the exact shapes (rounding only) and the same greedy tokens in float32."""
    stage = _stage(engines("float32"), name, 8)
    graphs = stage.graphs
    lens = [300, 257, 40, 700, 257, 128, 1, 900]
    dev = stage.device
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, 10_000, (8, max(lens)), generator=g).to(dev)
    last = torch.tensor(lens, device=dev) - 1
    stage.model.prefill(stage.model.embed(prompts), torch.arange(8, device=dev), last)
    stage.params.p.greedy.fill_(True)
    for n in (1, 3, 5, 8):
        for _ in range(3):  # the replay rewrites the K/V the eager step wrote: the same values
            pos = lens[:n]
            ids = torch.randint(0, 10_000, (n,), generator=g).to(dev)
            stage.meta[:, :n] = torch.tensor([pos, [1] * n, [0] * n], device=dev)
            stage.ids[:n] = ids
            stage.step_fn(n, max(pos) + 1, False)
            eager_t, eager_l = stage.ids[:n].clone(), stage.logits[:n].clone()
            key = graphs.key(n, max(pos) + 1, False)
            stage.meta[:, : key[0]] = 0
            stage.meta[:, :n] = torch.tensor([pos, [1] * n, [0] * n], device=dev)
            stage.ids[: key[0]] = 0
            stage.ids[:n] = ids
            graphs.replay(key)
            torch.testing.assert_close(stage.logits[:n], eager_l, atol=1e-4, rtol=1e-4)
            assert torch.equal(stage.ids[:n], eager_t)


@torch.inference_mode()
def test_a_stale_graph_is_never_replayed(engines):
    stage = _stage(engines("float32"), "semantic", 4)
    assert stage.graphs.lookup(2, 300, False) is not None
    stage.model.setup_cache(4)  # new cache tensors: the graphs would write the freed ones
    before = stage.graphs.eager_steps
    assert stage.graphs.lookup(2, 300, False) is None
    assert stage.graphs.eager_steps == before + 1


@pytest.mark.parametrize("name", ["semantic", "coarse"])
@torch.inference_mode()
def test_the_whole_step_never_syncs_with_the_host(engines, name):
    """What a graph cannot hold: no .item(), no host copy, no data-dependent shape, in the
    forward pass or in sampling (both variants)."""
    stage = _stage(engines("float16"), name, 4)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for variant in (False, True):
            stage.step_fn(3, 128, variant)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_strict_load_passes_every_check(engines):
    for dtype in ("float32", "float16"):
        config = EngineConfig(strict_gpu=True)
        engine = Engine.load("random:tiny", device="cuda", dtype=dtype, config=config)
        mode = engine.decode_mode()
        assert mode["cuda_graphs"] == "semantic,coarse" and mode["fallbacks"] == []
        assert set(mode["checks"]["sdpa"]["kernels"]) == {"masked", "causal", "full"}
        assert mode["sdpa"] != "default" and not torch.backends.cuda.cudnn_sdp_enabled()
        assert all(c["ok"] for c in mode["checks"]["graphs"].values())


def test_pipeline_on_cuda_equals_generate(engines):
    """The pipeline's worker threads (semantic on its own stream) against Engine.generate."""
    engine = engines("float32")
    texts = ["The first sentence is here.", "Then a second one.", "And a third."]
    want = [engine.generate(t, greedy=True, max_semantic_tokens=60)[0] for t in texts]
    done: list = []
    finished = threading.Event()

    def on_final(req):
        done.append(req)
        if len(done) == len(texts):
            finished.set()

    pipe = Pipeline(engine.runtime, on_final, device=engine.device)
    pipe.start()
    try:
        opts = GenerationOptions(greedy=True, max_semantic_tokens=60)
        for t in texts:
            pipe.submit(engine.request(t, None, opts))
        assert finished.wait(120)
    finally:
        pipe.stop(timeout=30)
    got = sorted(done, key=lambda r: r.id)
    for req, w in zip(got, want, strict=True):
        _assert_same_tokens(req.speech(engine.sample_rate), _tokens(w))


# -- the engine on CUDA -----------------------------------------------------------------------


@torch.no_grad()
def _assert_same_tokens(ours, want: dict) -> None:
    """``ours`` a Speech, ``want`` a dict with the same token arrays."""
    for key in ("semantic", "coarse", "fine"):
        np.testing.assert_array_equal(getattr(ours, key), want[key], err_msg=key)


def _tokens(speech) -> dict:
    return {"semantic": speech.semantic, "coarse": speech.coarse, "fine": speech.fine}


@pytest.mark.parametrize(
    ("text", "voice", "n"),
    [
        ("Hello there, how are you today?", None, 40),
        ("Hello there, how are you today?", "v2/en_speaker_1", 40),
        (LONG, "v2/en_speaker_2", 768),  # 20 coarse windows, kv up to the cache length
    ],
    ids=["short", "short-voice", "long"],
)
def test_cuda_float32_matches_transformers_on_cuda(engines, text, voice, n):
    engine = engines("float32")
    ref = vars(reference_generate(engine.loaded.model, engine.loaded.processor, text, voice, n))
    ours = engine.generate(text, voice=voice, greedy=True, max_semantic_tokens=n)[0]
    _assert_same_tokens(ours, ref)
    assert ours.audio.shape == ref["audio"].shape
    assert np.abs(ours.audio - ref["audio"]).max() <= 1e-4


def test_cuda_float32_matches_cpu_engine(engines):
    """Across devices: the arithmetic differs in rounding only, the tokens do not."""
    cpu = Engine.load("random:tiny", device="cpu")
    text, voice = "Same words on two devices.", "v2/en_speaker_3"
    a = cpu.generate(text, voice=voice, greedy=True, max_semantic_tokens=60)[0]
    b = engines("float32").generate(text, voice=voice, greedy=True, max_semantic_tokens=60)[0]
    _assert_same_tokens(b, _tokens(a))
    # the codec's convolutions may use TF32 on CUDA (torch.backends.cudnn.allow_tf32)
    assert np.abs(a.audio - b.audio).max() <= 1e-2 * np.abs(a.audio).max()


def test_graphs_on_and_off_give_the_same_tokens(engines):
    on, off = engines("float32", True), engines("float32", False)
    assert on.decode_mode()["cuda_graphs"] == "semantic,coarse"
    assert off.decode_mode()["cuda_graphs"] == "off"
    with torch.inference_mode():
        a, b = run_mixed(on), run_mixed(off)
    for x, y in zip(a, b, strict=True):
        _assert_same_tokens(x, _tokens(y))
        assert np.abs(x.audio - y.audio).max() <= 1e-5
    assert on.eager_steps() == {"semantic": 0, "coarse": 0}  # every step replayed a graph


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_end_to_end(engines, dtype):
    engine = engines(dtype)
    assert engine.semantic_model.lm_head.weight.dtype == DTYPES[dtype]
    texts = ["Half precision, greedy.", "Half precision, sampled, with a voice."]
    greedy = engine.generate(texts[0], greedy=True, max_semantic_tokens=50)[0]
    sampled = engine.generate(texts[1], voice="v2/en_speaker_4", seed=1)[0]
    for s in (greedy, sampled):
        T = s.coarse.shape[1]
        assert len(s.semantic) > 0
        assert s.fine.shape == (8, T) and s.audio.shape == (T * 320,)
        assert s.audio.dtype == np.float32 and np.isfinite(s.audio).all()
        assert s.fine.min() >= 0 and s.fine.max() < 1024


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@torch.inference_mode()
def test_half_precision_teacher_forced_logits_close_to_float32(engines, dtype):
    ref_model = engines("float32").coarse_model
    model = _own_model(engines(dtype), "coarse_model", 2)
    dev = model.lm_head.weight.device
    ids = torch.randint(0, 12_000, (2, 300), generator=torch.Generator().manual_seed(0)).to(dev)
    ref = ref_model.forward_full(ids).float()  # (2, 300, V)
    rows, last = torch.arange(2, device=dev), torch.tensor([256, 256], device=dev)
    first = model.prefill(model.embed(ids[:, :257]), rows, last)
    # decode steps give the logits from head_start (the coarse stage restricts the head)
    h = model.head_start
    got = [first.float()[:, h:]]
    for p in range(257, 300):
        pos = torch.full((2,), p, device=dev)
        got.append(model.decode(ids[:, p], pos, p + 1).float())
    got_t = torch.stack(got, 1)  # (2, 44, V - h)
    want = ref[:, 256:300, h:]
    assert torch.isfinite(got_t).all()
    cos = torch.nn.functional.cosine_similarity(got_t, want, dim=-1)
    assert cos.min() > 0.99, cos.min()
    assert (got_t - want).abs().max() <= 0.1 * want.abs().max()


@pytest.mark.skipif(
    importlib.util.find_spec("flash_attn") is None, reason="flash_attn is not installed"
)
def test_flash_attention_2_end_to_end():
    try:
        import flash_attn  # noqa: F401
    except ImportError as err:  # installed but built for another torch or CUDA
        pytest.skip(f"flash_attn does not import: {err}")
    flash = Engine.load("random:tiny", device="cuda", dtype="float16", attn="flash_attention_2")
    sdpa = Engine.load("random:tiny", device="cuda", dtype="float16")
    s = flash.generate("Flash attention, end to end.", greedy=True, max_semantic_tokens=40)[0]
    assert np.isfinite(s.audio).all() and s.fine.shape[0] == 8
    codes = torch.randint(0, 1024, (1, 1024, 8), device="cuda")
    with torch.inference_mode():
        for cb in (2, 7):
            a = flash.fine_model(codes, cb).float()
            b = sdpa.fine_model(codes, cb).float()
            assert (a - b).abs().max() <= 0.05 * b.abs().max()

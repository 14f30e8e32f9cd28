"""On a CUDA device: decode graphs, exactness against transformers, half precision.

Every test here is marked ``gpu`` (tests/conftest.py skips them without CUDA). Run with
``pytest -m gpu tests/gpu -q``; benchmarks/gpu.sh does, on the lent GPU machine.

What is exact and what is close:

* a graph replay is the eager decode on the same padded shapes, bit for bit (same kernels);
* against the unpadded eager decode the logits differ by rounding only (the kernels may sum in
  another order for another shape), so they are compared with a tolerance and by argmax;
* greedy tokens of the CUDA engine equal transformers' on the same device and weights (the
  CPU claim of tests/test_exactness.py, on CUDA), with graphs on and with graphs off.
"""

from __future__ import annotations

import copy
import importlib.util

import numpy as np
import pytest
import torch
from reference import reference_generate, run_mixed

from stream_engine import Engine, EngineConfig
from stream_engine.bark.model import CausalGPT
from stream_engine.runtime.cuda import DecodeGraphs, bucket_for

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


def _prefill(model: CausalGPT, lens: list[int], seed: int = 0) -> None:
    """Slots [0, len(lens)) prefilled with random prompts of these lengths (right-padded)."""
    dev = model.lm_head.weight.device
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 10_000, (len(lens), max(lens)), generator=g).to(dev)
    rows = torch.arange(len(lens), device=dev)
    model.prefill(model.embed(ids), rows, torch.tensor(lens, device=dev) - 1)


def _padded(model: CausalGPT, graphs: DecodeGraphs, ids, pos, kv_len):
    """The eager decode on the shapes a graph replays: what it must equal bit for bit."""
    n = ids.size(0)
    b, s = bucket_for(n, graphs.batch_sizes), bucket_for(kv_len, graphs.kv_lens)
    pad = torch.zeros(b - n, dtype=torch.long, device=ids.device)
    return model.decode(torch.cat([ids, pad]), torch.cat([pos, pad]), s)[:n].float()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("name", ["semantic_model", "coarse_model"])
@torch.inference_mode()
def test_graph_replay_equals_eager_decode(engines, name, dtype):
    model = _own_model(engines(dtype), name, 8)
    lens = [300, 257, 40, 700, 257, 128, 1, 900]  # every row at its own position
    _prefill(model, lens)
    graphs = DecodeGraphs(model)
    dev = model.lm_head.weight.device
    pos = torch.tensor(lens, device=dev)
    g = torch.Generator().manual_seed(1)
    # n: every batch bucket and sizes between; extra: kv_len beyond max(pos) + 1 (allowed)
    for n, extra in [(1, 0), (3, 0), (2, 130), (5, 0), (8, 0), (4, 300), (7, 0), (8, 60)]:
        for _ in range(3):
            ids = torch.randint(0, 10_000, (n,), generator=g).to(dev)
            p = pos[:n].clone()
            kv_len = min(int(p.max()) + 1 + extra, graphs.max_len)
            eager = model.decode(ids, p, kv_len).float()
            padded = _padded(model, graphs, ids, p, kv_len)
            got = graphs(ids, p, kv_len).clone()
            assert torch.equal(got, padded), (n, kv_len, (got - padded).abs().max().item())
            tol = 1e-4 if dtype == "float32" else 2e-2
            torch.testing.assert_close(got, eager, atol=tol, rtol=tol)
            if dtype == "float32":
                assert torch.equal(got.argmax(-1), eager.argmax(-1))
            pos[:n] += 1
    assert len(graphs.graphs) >= 8 or not graphs.capture


@pytest.mark.parametrize("capture_all", [False, True])
@torch.inference_mode()
def test_greedy_tokens_same_with_and_without_graphs(engines, capture_all):
    """A greedy decode loop over all slots, rows at different positions: same tokens."""
    model = _own_model(engines("float32"), "coarse_model", 6)
    graphs = DecodeGraphs(model)
    if capture_all:
        graphs.capture_all()  # before any prefill: it writes position 0 of every slot
        if graphs.capture:
            assert len(graphs.graphs) == len(graphs.batch_sizes) * len(graphs.kv_lens)
    lens = [120, 250, 257, 3, 126, 400]
    dev = model.lm_head.weight.device

    def run(decode) -> torch.Tensor:
        _prefill(model, lens, seed=2)  # the same cache state for both runs
        pos = torch.tensor(lens, device=dev)
        ids = torch.zeros(len(lens), dtype=torch.long, device=dev)
        out = []
        for _ in range(40):  # crosses the 128 and 256 kv buckets
            ids = decode(ids, pos, int(pos.max()) + 1).argmax(-1)
            out.append(ids)
            pos = pos + 1
        return torch.stack(out)

    eager = run(model.decode)
    graphed = run(graphs)
    assert torch.equal(eager, graphed)


@torch.inference_mode()
def test_graphs_follow_cache_reallocation(engines):
    model = _own_model(engines("float32"), "semantic_model", 4)
    graphs = DecodeGraphs(model)
    dev = model.lm_head.weight.device
    ids = torch.tensor([7, 8], device=dev)
    _prefill(model, [300, 10, 5, 5])
    pos = torch.tensor([300, 10], device=dev)
    graphs(ids, pos, 301)
    model.setup_cache(2)  # new cache tensors: the old graphs would write the freed ones
    _prefill(model, [300, 10])
    got = graphs(ids, pos, 301).clone()
    assert graphs.slots == 2
    assert torch.equal(got, _padded(model, graphs, ids, pos, 301))


@torch.inference_mode()
def test_decode_never_syncs_with_the_host(engines):
    """What a graph cannot hold: no .item(), no host copy, no data-dependent shape."""
    model = _own_model(engines("float16"), "coarse_model", 4)
    _prefill(model, [10, 20, 30, 40])
    dev = model.lm_head.weight.device
    ids = torch.tensor([1, 2, 3], device=dev)
    pos = torch.tensor([10, 20, 30], device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model.decode(ids, pos, 128)
    finally:
        torch.cuda.set_sync_debug_mode("default")


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
    for name in ("semantic", "coarse"):
        stage_on, stage_off = on.runtime.stages[name], off.runtime.stages[name]
        decode_on = getattr(stage_on, "decode", None)
        if not isinstance(decode_on, DecodeGraphs):
            pytest.fail(
                f"the {name} stage does not decode through make_decoder "
                "(wire stream_engine.runtime.cuda.make_decoder into the stages)"
            )
        assert stage_off.decode == stage_off.model.decode
    with torch.inference_mode():
        a, b = run_mixed(on), run_mixed(off)
    for x, y in zip(a, b, strict=True):
        _assert_same_tokens(x, _tokens(y))
        assert np.abs(x.audio - y.audio).max() <= 1e-5
    for name in ("semantic", "coarse"):
        assert on.runtime.stages[name].decode.graphs, f"no {name} graph was replayed"


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

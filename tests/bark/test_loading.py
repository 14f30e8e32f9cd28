"""Tests of the offline random Bark models and of loading and saving Bark directories.

Everything here runs without network and on the tiny model, except the configuration checks
of ``random:small`` and ``random:large`` (configs only, no weights).
"""

from __future__ import annotations

import gc
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoTokenizer,
    BarkModel,
    BarkProcessor,
    BertTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
)
from transformers.models.bark.generation_configuration_bark import (
    BarkCoarseGenerationConfig,
    BarkFineGenerationConfig,
    BarkGenerationConfig,
    BarkSemanticGenerationConfig,
)

from stream_engine.bark.loading import LoadedBark, load_bark, save_bark
from stream_engine.bark.random_models import (
    RANDOM_SIZES,
    RANDOM_VOICE_NAMES,
    TEXT_VOCAB_SIZE,
    bark_generation_config,
    build_random_bark,
    random_bark_config,
    random_bark_tokenizer,
    random_voice_presets,
)
from stream_engine.errors import ModelLoadError, ModelNotFound, UnknownVoice

ENGLISH = "Hello, my dog is cute. I like him very much, and he likes to play in the park!"
PROMPT_KEYS = ("semantic_prompt", "coarse_prompt", "fine_prompt")
SUB_CONFIGS = {
    "semantic_config": BarkSemanticGenerationConfig,
    "coarse_acoustics_config": BarkCoarseGenerationConfig,
    "fine_acoustics_config": BarkFineGenerationConfig,
}


@pytest.fixture(scope="module")
def tiny() -> LoadedBark:
    return load_bark("random:tiny")


@pytest.fixture(scope="module")
def saved(tiny: LoadedBark, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("bark") / "tiny"
    save_bark(tiny, directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer() -> BertTokenizer:
    return random_bark_tokenizer()


@pytest.fixture
def empty_hub_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # a machine where suno/bark-small happens to be cached must not load it here
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def assert_same_voices(
    a: dict[str, dict[str, np.ndarray]], b: dict[str, dict[str, np.ndarray]]
) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            assert a[name][key].dtype == b[name][key].dtype == np.int64
            np.testing.assert_array_equal(a[name][key], b[name][key])


def sub_config_values(config: object) -> dict[str, dict[str, object]]:
    """What BarkModel.generate builds from a generation config, per sub-model."""
    values = {}
    for key, cls in SUB_CONFIGS.items():
        given = getattr(config, key)
        given = given.to_dict() if not isinstance(given, dict) else given
        built = cls(**given).to_dict()
        built.pop("transformers_version")
        values[key] = built
    return values


# --- random models ----------------------------------------------------------------------------


def test_same_seed_gives_identical_weights_and_voices() -> None:
    a, pa = build_random_bark("tiny", seed=0)
    b, pb = build_random_bark("tiny", seed=0)
    assert_same_weights(a, b)
    assert_same_voices(random_voice_presets(0), random_voice_presets(0))
    for name in ("v2/en_speaker_0", "v2/de_speaker_0"):
        ha = pa("hi", voice_preset=name)["history_prompt"]
        hb = pb("hi", voice_preset=name)["history_prompt"]
        for key in PROMPT_KEYS:
            assert torch.equal(ha[key], hb[key])


def test_different_seeds_give_different_weights_and_voices() -> None:
    a, _ = build_random_bark("tiny", seed=0)
    b, _ = build_random_bark("tiny", seed=1)
    sb = dict(b.named_parameters())
    for name, param in a.named_parameters():
        assert not torch.equal(param, sb[name]), name
    va, vb = random_voice_presets(0), random_voice_presets(1)
    for name in va:
        assert not np.array_equal(va[name]["fine_prompt"][:, :50], vb[name]["fine_prompt"][:, :50])


def test_building_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_random_bark("tiny", seed=5)
    assert torch.equal(torch.rand(4), expected)


def test_random_model_is_eval_eager_float32(tiny: LoadedBark) -> None:
    model = tiny.model
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for sub in (model.semantic, model.coarse_acoustics, model.fine_acoustics):
        assert sub.config._attn_implementation == "eager"


def test_no_parameter_is_constant(tiny: LoadedBark) -> None:
    # layer norms, biases and codebooks must carry information, or a loader that drops
    # them would pass every equality test
    for name, param in tiny.model.named_parameters():
        flat = param.detach().flatten()
        if flat.numel() > 1:
            assert flat.std() > 0, name
    for name, module in tiny.model.codec_model.quantizer.named_modules():
        if hasattr(module, "embed"):
            assert module.embed.std() > 0.5, name
    norms = [m for m in tiny.model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms
    for norm in norms:
        assert 0.5 < float(norm.weight.detach().mean()) < 1.5  # around 1, not degenerate


@pytest.mark.parametrize(
    ("size", "layers", "heads", "hidden"), [("small", 12, 12, 768), ("large", 24, 16, 1024)]
)
def test_random_configs_have_barks_shapes(size: str, layers: int, heads: int, hidden: int) -> None:
    config = random_bark_config(size)
    expected = {
        "semantic_config": (129_600, 10_048, False),
        "coarse_acoustics_config": (12_096, 12_096, False),
        "fine_acoustics_config": (1_056, 1_056, True),
    }
    for key, (vocab_in, vocab_out, bias) in expected.items():
        sub = getattr(config, key)
        assert (sub.input_vocab_size, sub.output_vocab_size, sub.bias) == (
            vocab_in,
            vocab_out,
            bias,
        ), key
        assert (sub.num_layers, sub.num_heads, sub.hidden_size) == (layers, heads, hidden), key
        assert sub.block_size == 1024
    fine: Any = config.fine_acoustics_config
    assert (fine.n_codes_total, fine.n_codes_given) == (8, 1)
    codec: Any = config.codec_config
    assert codec.model_type == "encodec"
    assert codec.sampling_rate == 24_000
    assert list(codec.upsampling_ratios) == [8, 5, 4, 2]
    assert codec.codebook_size == 1024
    assert list(codec.target_bandwidths) == [1.5, 3.0, 6.0, 12.0, 24.0]
    assert codec.frame_rate == 75


def test_tiny_config_keeps_barks_token_layout_and_framing() -> None:
    config = random_bark_config("tiny")
    small = random_bark_config("small")
    for key in ("semantic_config", "coarse_acoustics_config", "fine_acoustics_config"):
        sub, ref = getattr(config, key), getattr(small, key)
        assert sub.input_vocab_size == ref.input_vocab_size
        assert sub.output_vocab_size == ref.output_vocab_size
        assert sub.bias == ref.bias
        assert sub.num_layers <= 4
    codec: Any = config.codec_config
    assert (codec.sampling_rate, codec.frame_rate, codec.codebook_size) == (24_000, 75, 1024)
    assert codec.num_quantizers >= 8


def test_tiny_codec_decodes_eight_codebooks(tiny: LoadedBark) -> None:
    codes = torch.randint(0, 1024, (8, 1, 75), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        embeddings = tiny.model.codec_model.quantizer.decode(codes)
        audio = tiny.model.codec_model.decoder(embeddings)
    assert audio.shape == (1, 1, 75 * 320)
    assert torch.isfinite(audio).all()
    rms = float(audio.pow(2).mean().sqrt())
    assert 0.01 < rms < 0.5
    assert float(audio.abs().max()) < 1.0


@pytest.mark.parametrize("size", ["huge", "", "Tiny"])
def test_random_config_rejects_unknown_sizes(size: str) -> None:
    with pytest.raises(ModelNotFound, match="random:tiny"):
        random_bark_config(size)


def test_generation_config_is_barks_defaults(tiny: LoadedBark) -> None:
    config: Any = tiny.model.generation_config  # Bark's keys are extra attributes
    assert config.sample_rate == 24_000
    assert config.codebook_size == 1024
    assert sub_config_values(config) == sub_config_values(BarkGenerationConfig())
    semantic = config.semantic_config
    assert semantic["text_encoding_offset"] == 10_048
    assert semantic["semantic_infer_token"] == 129_599
    assert semantic["text_pad_token"] == 129_595
    assert config.coarse_acoustics_config["coarse_infer_token"] == 12_050


# --- voices -----------------------------------------------------------------------------------


def test_voice_presets_have_the_real_format() -> None:
    voices = random_voice_presets(0)
    assert {f"v2/en_speaker_{i}" for i in range(4)} | {"v2/de_speaker_0"} <= voices.keys()
    assert set(RANDOM_VOICE_NAMES) == voices.keys()
    for name, preset in voices.items():
        semantic, coarse, fine = (preset[key] for key in PROMPT_KEYS)
        assert semantic.ndim == 1 and 100 <= semantic.size <= 1000, name
        assert all(a.dtype == np.int64 for a in (semantic, coarse, fine))
        assert semantic.min() >= 0 and semantic.max() < 10_000
        frames = round(semantic.size * 75 / 49.9)
        assert coarse.shape == (2, frames) and fine.shape == (8, frames)
        assert fine.min() >= 0 and fine.max() < 1024
        np.testing.assert_array_equal(fine[:2], coarse)


def test_processor_serves_the_voices_by_name(tiny: LoadedBark) -> None:
    assert set(tiny.processor.available_voice_presets) == tiny.voices.keys()
    history = tiny.processor(ENGLISH, voice_preset="v2/en_speaker_1")["history_prompt"]
    for key in PROMPT_KEYS:
        np.testing.assert_array_equal(history[key].numpy(), tiny.voices["v2/en_speaker_1"][key])


def test_unknown_voice(tiny: LoadedBark) -> None:
    assert tiny.voice("v2/en_speaker_2") is tiny.voices["v2/en_speaker_2"]
    with pytest.raises(UnknownVoice, match="v2/en_speaker_0"):
        tiny.voice("v2/xx_speaker_99")


def test_voice_files_go_with_the_processor() -> None:
    _, processor = build_random_bark("tiny")
    folder = processor.speaker_embeddings["repo_or_path"]
    assert os.path.isdir(folder)
    del processor
    gc.collect()
    assert not os.path.exists(folder)


# --- tokenizer --------------------------------------------------------------------------------


def test_tokenizer_layout_is_multilingual_berts(tokenizer: BertTokenizer) -> None:
    ids = tokenizer.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    assert ids == [0, 100, 101, 102, 103]
    assert len(tokenizer) < TEXT_VOCAB_SIZE


def test_english_gives_realistic_token_counts_and_round_trips(tokenizer: BertTokenizer) -> None:
    ids = tokenizer(ENGLISH, add_special_tokens=False)["input_ids"]
    words = len(ENGLISH.split())
    assert words <= len(ids) <= 2 * words
    assert tokenizer.unk_token_id not in ids
    assert max(ids) < TEXT_VOCAB_SIZE
    assert tokenizer.decode(ids) == ENGLISH


@pytest.mark.parametrize(
    "text",
    [
        "Guten Tag, wie geht es Ihnen?",
        "¿Dónde está la estación?",
        "Ça coûte 5€, très cher… non ?",
        "नमस्ते, आप कैसे हैं?",
        "Come stai oggi?",
        "こんにちは、元気ですか？",
        "안녕하세요, 잘 지내세요?",
        "Zażółć gęślą jaźń.",
        "Olá, tudo bem?",
        "Привет, как дела?",
        "İstanbul'da çay içtik.",
        "你好，世界！",
        "♪ In the jungle, the mighty jungle ♪ — [laughs]",
    ],
)
def test_barks_languages_tokenize_without_unknowns(text: str, tokenizer: BertTokenizer) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids
    assert tokenizer.unk_token_id not in ids
    assert max(ids) < TEXT_VOCAB_SIZE


def test_tokenizer_round_trips_through_save_pretrained(
    tmp_path: Path, tokenizer: BertTokenizer
) -> None:
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    for text in (ENGLISH, "Привет, как дела?", "你好，世界！"):
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]


# --- save and load ----------------------------------------------------------------------------


def test_saved_directory_loads_in_transformers(tiny: LoadedBark, saved: Path) -> None:
    model = BarkModel.from_pretrained(saved)
    assert_same_weights(model, tiny.model)
    assert sub_config_values(model.generation_config) == sub_config_values(
        tiny.model.generation_config
    )
    assert model.generation_config.to_dict() == tiny.model.generation_config.to_dict()

    processor = BarkProcessor.from_pretrained(saved)
    assert set(processor.available_voice_presets) == tiny.voices.keys()
    ours = tiny.processor(ENGLISH, voice_preset="v2/en_speaker_1")
    theirs = processor(ENGLISH, voice_preset="v2/en_speaker_1")
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    for key in PROMPT_KEYS:
        expected = tiny.voices["v2/en_speaker_1"][key]
        np.testing.assert_array_equal(theirs["history_prompt"][key].numpy(), expected)


def test_saved_directory_has_the_repo_layout(saved: Path) -> None:
    assert (saved / "speaker_embeddings_path.json").is_file()
    assert (saved / "speaker_embeddings" / "v2" / "en_speaker_1_fine_prompt.npy").is_file()
    assert (saved / "generation_config.json").is_file()


def test_load_bark_round_trips_a_saved_directory(tiny: LoadedBark, saved: Path) -> None:
    loaded = load_bark(str(saved))
    assert loaded.name == str(saved)
    assert not loaded.model.training
    assert_same_weights(loaded.model, tiny.model)
    assert_same_voices(loaded.voices, tiny.voices)
    assert sub_config_values(loaded.model.generation_config) == sub_config_values(
        tiny.model.generation_config
    )


def test_save_bark_accepts_a_bark_generation_config(tmp_path: Path) -> None:
    # BarkGenerationConfig cannot go through GenerationConfig.save_pretrained (transformers 5
    # fails validating it); save_bark writes the same values in the form from_pretrained reads
    loaded = load_bark("random:tiny")
    custom = BarkGenerationConfig(semantic_config={"temperature": 0.7, "min_eos_p": 0.2})
    loaded.model.generation_config = custom
    save_bark(loaded, tmp_path)
    assert loaded.model.generation_config is custom  # left as it was
    reloaded: Any = BarkModel.from_pretrained(tmp_path).generation_config
    assert sub_config_values(reloaded) == sub_config_values(custom)
    assert reloaded.semantic_config["min_eos_p"] == 0.2


def test_bark_generation_config_converts_without_loss() -> None:
    custom = BarkGenerationConfig(
        semantic_config={"renormalize_logits": False, "max_new_tokens": 100},
        fine_acoustics_config={"temperature": 0.5},
        sample_rate=22_050,
    )
    plain: Any = bark_generation_config(custom)
    assert sub_config_values(plain) == sub_config_values(custom)
    assert plain.sample_rate == 22_050
    assert bark_generation_config(plain).to_dict() == plain.to_dict()


def test_random_seed_syntax() -> None:
    loaded = load_bark("random:tiny@3")
    assert loaded.name == "random:tiny@3"
    model, _ = build_random_bark("tiny", seed=3)
    assert_same_weights(loaded.model, model)
    assert_same_voices(loaded.voices, random_voice_presets(3))


def test_load_bark_applies_dtype_and_attention() -> None:
    loaded = load_bark("random:tiny", dtype=torch.bfloat16, attn="sdpa")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    # transformers' Bark has no sdpa attention; its model is loaded as eager
    assert loaded.model.semantic.config._attn_implementation == "eager"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"offload": True}, "CUDA"),
        ({"attn": "flash_attention_2"}, "CUDA"),
        ({"attn": "magic"}, "magic"),
    ],
)
def test_load_bark_rejects_impossible_options(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ModelLoadError, match=match):
        load_bark("random:tiny", device="cpu", **kwargs)  # type: ignore[arg-type]


def test_directory_without_generation_config_gets_barks_defaults(
    saved: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    (copy / "generation_config.json").unlink()
    loaded = load_bark(str(copy))
    assert sub_config_values(loaded.model.generation_config) == sub_config_values(
        BarkGenerationConfig()
    )


def test_directory_with_missing_weights_is_a_load_error(saved: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    weights = load_file(copy / "model.safetensors")
    del weights["semantic.layernorm_final.weight"]
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"semantic\.layernorm_final\.weight"):
        load_bark(str(copy))


def test_directory_with_another_architecture_is_a_load_error(tmp_path: Path) -> None:
    config = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=100, n_positions=16)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="gpt2"):
        load_bark(str(tmp_path))


def test_directory_without_a_model_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="Bark") as info:
        load_bark(str(tmp_path))
    assert not isinstance(info.value, ModelNotFound)


# --- not found --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["random:huge", "random:", "random:tiny@x", "random:Tiny"])
def test_unknown_random_model(name: str) -> None:
    with pytest.raises(ModelNotFound) as info:
        load_bark(name)
    for size in RANDOM_SIZES:
        assert f"random:{size}" in str(info.value)


@pytest.mark.usefixtures("empty_hub_cache")
def test_hub_model_in_offline_mode_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(ModelNotFound) as info:
        load_bark("suno/bark-small")
    assert time.monotonic() - start < 20
    for size in RANDOM_SIZES:
        assert f"random:{size}" in str(info.value)


@pytest.mark.usefixtures("empty_hub_cache")
def test_hub_model_that_cannot_be_fetched_fails_fast() -> None:
    # Without network this takes the unreachable-hub path; with network, the hub answers
    # "not found". Either way: ModelNotFound within seconds, and nothing is downloaded.
    start = time.monotonic()
    with pytest.raises(ModelNotFound) as info:
        load_bark("stream-engine-tests/no-such-bark-model")
    assert time.monotonic() - start < 20
    for size in RANDOM_SIZES:
        assert f"random:{size}" in str(info.value)


@pytest.mark.parametrize("name", ["./no/such/dir", "/no/such/bark", "a/b/c"])
def test_path_that_does_not_exist(name: str) -> None:
    with pytest.raises(ModelNotFound, match="random:tiny"):
        load_bark(name)

"""Offline Bark models: Bark's exact architectures with seeded random weights.

Nothing here downloads anything. ``random:small`` and ``random:large`` have the shapes of
``suno/bark-small`` and ``suno/bark`` (so memory use and speed are those of the real models);
``random:tiny`` keeps Bark's vocabularies and token layout but has two narrow layers, for
tests. The speech they make is noise, but every tensor, token id, voice preset and
configuration has the form the real checkpoints have, so the whole engine runs on them.

The parts:

* :func:`random_bark_config` - a ``BarkConfig`` for one of :data:`RANDOM_SIZES`;
* :func:`bark_generation_config` - Bark's generation settings in the form
  ``BarkModel.from_pretrained`` produces (a plain ``GenerationConfig`` holding dicts);
* :func:`random_bark_tokenizer` - a WordPiece tokenizer laid out like
  ``bert-base-multilingual-cased``, built from a vocabulary generated here;
* :func:`random_voice_presets` - voice presets in the real format, seeded per name;
* :func:`write_voice_presets` - writes presets in the layout ``BarkProcessor`` reads;
* :func:`build_random_bark` - all of the above as a ``(BarkModel, BarkProcessor)`` pair.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import unicodedata
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import torch

from stream_engine.errors import ModelLoadError, ModelNotFound

if TYPE_CHECKING:
    from transformers import (
        BarkConfig,
        BarkModel,
        BarkProcessor,
        BertTokenizer,
        EncodecConfig,
        GenerationConfig,
    )

RANDOM_SIZES: Final = ("tiny", "small", "large")

# Bark's vocabularies. They are the same at every size because they carry the token layout:
# text ids are shifted by 10_048 into the semantic model's input vocabulary, and the pad and
# "infer" tokens sit at fixed ids above the text range.
SEMANTIC_INPUT_VOCAB: Final = 129_600
SEMANTIC_OUTPUT_VOCAB: Final = 10_048
COARSE_VOCAB: Final = 12_096
FINE_VOCAB: Final = 1_056
TEXT_VOCAB_SIZE: Final = 119_547  # bert-base-multilingual-cased; text ids must stay below
BLOCK_SIZE: Final = 1024

# The audio side of Bark's token layout (BarkGenerationConfig's defaults).
SEMANTIC_VOCAB_SIZE: Final = 10_000
SEMANTIC_RATE_HZ: Final = 49.9
COARSE_RATE_HZ: Final = 75
CODEBOOK_SIZE: Final = 1024
N_COARSE_CODEBOOKS: Final = 2
N_FINE_CODEBOOKS: Final = 8
SAMPLE_RATE: Final = 24_000

# Names of the voice presets random models ship with, as in suno/bark's speaker_embeddings.
_LANGUAGES: Final = ("de", "es", "fr", "hi", "it", "ja", "ko", "pl", "pt", "ru", "tr", "zh")
RANDOM_VOICE_NAMES: Final = tuple(f"v2/en_speaker_{i}" for i in range(10)) + tuple(
    f"v2/{lang}_speaker_0" for lang in _LANGUAGES
)
_PROMPT_KEYS: Final = ("semantic_prompt", "coarse_prompt", "fine_prompt")

SPEAKER_EMBEDDINGS_JSON: Final = "speaker_embeddings_path.json"
SPEAKER_EMBEDDINGS_DIR: Final = "speaker_embeddings"


@dataclass(frozen=True)
class _Shape:
    layers: int
    heads: int
    hidden: int


_SHAPES: Final[Mapping[str, _Shape]] = MappingProxyType(
    {
        # 2 layers of width 32: a forward pass costs well under a millisecond on 2 CPU cores.
        "tiny": _Shape(layers=2, heads=2, hidden=32),
        "small": _Shape(layers=12, heads=12, hidden=768),  # suno/bark-small
        "large": _Shape(layers=24, heads=16, hidden=1024),  # suno/bark
    }
)


def random_bark_config(size: str) -> BarkConfig:
    """The ``BarkConfig`` of ``random:<size>`` (one of :data:`RANDOM_SIZES`)."""
    from transformers import BarkCoarseConfig, BarkConfig, BarkFineConfig, BarkSemanticConfig

    shape = _shape(size)
    common: dict[str, Any] = {
        "num_layers": shape.layers,
        "num_heads": shape.heads,
        "hidden_size": shape.hidden,
        "block_size": BLOCK_SIZE,
        "dropout": 0.0,
    }
    return BarkConfig(
        semantic_config=BarkSemanticConfig(
            input_vocab_size=SEMANTIC_INPUT_VOCAB,
            output_vocab_size=SEMANTIC_OUTPUT_VOCAB,
            bias=False,
            **common,
        ),
        coarse_acoustics_config=BarkCoarseConfig(
            input_vocab_size=COARSE_VOCAB, output_vocab_size=COARSE_VOCAB, bias=False, **common
        ),
        fine_acoustics_config=BarkFineConfig(
            input_vocab_size=FINE_VOCAB,
            output_vocab_size=FINE_VOCAB,
            bias=True,
            n_codes_total=N_FINE_CODEBOOKS,
            n_codes_given=1,
            **common,
        ),
        codec_config=_codec_config(size),
    )


def _shape(size: str) -> _Shape:
    try:
        return _SHAPES[size]
    except KeyError:
        raise ModelNotFound(
            f"unknown random model size {size!r}; choose one of "
            + ", ".join(f"random:{s}" for s in RANDOM_SIZES)
        ) from None


def _codec_config(size: str) -> EncodecConfig:
    from transformers import EncodecConfig

    if size != "tiny":
        # EncodecConfig's defaults are facebook/encodec_24khz, the codec Bark decodes with:
        # 24 kHz, strides 8*5*4*2 = 320 (75 frames/s), 32 codebooks of 1024 entries.
        return EncodecConfig()
    # A narrow codec with the same framing: 320 samples per frame at 24 kHz (75 Hz) and
    # 1024-entry codebooks. The top bandwidth decides how many codebooks exist:
    # 6 kbps / (75 Hz * 10 bits) = 8, exactly the 8 that Bark's fine model predicts.
    return EncodecConfig(
        target_bandwidths=[1.5, 3.0, 6.0],
        sampling_rate=SAMPLE_RATE,
        upsampling_ratios=[8, 5, 4, 2],
        codebook_size=CODEBOOK_SIZE,
        num_filters=4,
        hidden_size=32,
        num_lstm_layers=1,
    )


def bark_generation_config(source: GenerationConfig | None = None) -> GenerationConfig:
    """Bark's generation settings as ``BarkModel.from_pretrained`` gives them.

    ``from_pretrained`` reads ``generation_config.json`` into a plain ``GenerationConfig``
    whose ``semantic_config``, ``coarse_acoustics_config`` and ``fine_acoustics_config`` are
    dicts, and ``BarkModel.generate`` builds the sub-configs from those dicts. A
    ``BarkGenerationConfig`` object cannot take that place: its ``__init__`` skips
    ``GenerationConfig.__init__``, so ``save_pretrained`` fails validating it (no
    ``early_stopping``) and ``generate`` cannot unpack its sub-configs.

    With ``source`` None the values are ``BarkGenerationConfig``'s defaults (Bark's token
    constants, ``codebook_size`` 1024, ``sample_rate`` 24000). Otherwise ``source`` (a
    ``BarkGenerationConfig`` or a loaded config holding dicts) is converted; keys that are
    missing take Bark's defaults.
    """
    from transformers import GenerationConfig
    from transformers.models.bark.generation_configuration_bark import (
        BarkCoarseGenerationConfig,
        BarkFineGenerationConfig,
        BarkSemanticGenerationConfig,
    )

    subs: dict[str, type[GenerationConfig]] = {
        "semantic_config": BarkSemanticGenerationConfig,
        "coarse_acoustics_config": BarkCoarseGenerationConfig,
        "fine_acoustics_config": BarkFineGenerationConfig,
    }
    values: dict[str, Any] = {}
    if source is not None and not _is_bark_generation_config(source):
        # a loaded config: keep what else it holds (e.g. ``_from_model_config``)
        values.update(source.to_diff_dict())
        values.pop("transformers_version", None)
    for key, cls in subs.items():
        given = getattr(source, key, None)
        if isinstance(given, GenerationConfig):
            given = given.to_dict()
        values[key] = _compact_sub_config(cls, dict(given or {}))
    values["sample_rate"] = getattr(source, "sample_rate", SAMPLE_RATE)
    values["codebook_size"] = getattr(source, "codebook_size", CODEBOOK_SIZE)
    return GenerationConfig(**values)


def _is_bark_generation_config(config: GenerationConfig) -> bool:
    from transformers.models.bark.generation_configuration_bark import BarkGenerationConfig

    return isinstance(config, BarkGenerationConfig)


def _compact_sub_config(cls: type[GenerationConfig], given: dict[str, Any]) -> dict[str, Any]:
    """The dict of one Bark sub-config: its Bark-specific values plus those set in ``given``.

    A key is dropped only when its value equals both ``GenerationConfig``'s default and the
    Bark sub-config's own default, so ``cls(**result)`` rebuilds exactly ``cls(**given)``
    while the file stays as short as the ones on the hub.
    """
    from transformers import GenerationConfig

    full = cls(**given).to_dict()
    generic = GenerationConfig().to_dict()
    own = cls().to_dict()
    skip = {"transformers_version", "_from_model_config"}
    missing = object()
    return {
        key: value
        for key, value in full.items()
        if key not in skip
        and (value != generic.get(key, missing) or value != own.get(key, missing))
    }


# --- tokenizer ------------------------------------------------------------------------------

# Common English words (and, through ``str.capitalize``, their sentence-initial forms), so
# that English text comes out near one token per word as with the real vocabulary.
_ENGLISH_TEXT: Final = """
the of and to a in is it you that he was for on are with as I his they be at one have
this from or had by not word but what some we can out other were all there when up use
your how said an each she which do their time if will way about many then them write
would like so these her long make thing see him two has look more day could go come did
number sound no most people my over know water than call first who may down side been
now find any new work part take get place made live where after back little only round
man year came show every good me give our under name very through just form sentence
great think say help low line differ turn cause much mean before move right boy old too
same tell does set three want air well also play small end put home read hand port large
spell add even land here must big high such follow act why ask men change went light kind
off need house picture try us again animal point mother world near build self earth father
head stand own page should country found answer school grow study still learn plant cover
food sun four between state keep eye never last let thought city tree cross farm hard
start might story saw far sea draw left late run while press close night real life few
north open seem together next white children begin got walk example ease paper group
always music those both mark often letter until mile river car feet care second book carry
took science eat room friend began idea fish mountain stop once base hear horse cut sure
watch color face wood main enough plain girl usual young ready above ever red list though
feel talk bird soon body dog family direct pose leave song measure door product black short
numeral class wind question happen complete ship area half rock order fire south problem
piece told knew pass since top whole king space heard best hour better true during hundred
five remember step early hold west ground interest reach fast verb sing listen six table
travel less morning ten simple several vowel toward war lay against pattern slow center
love person money serve appear road map rain rule govern pull cold notice voice unit power
town fine certain fly fall lead cry dark machine note wait plan figure star box noun field
rest correct able pound done beauty drive stood contain front teach week final gave green
oh quick develop ocean warm free minute strong special mind behind clear tail produce fact
street inch multiply nothing course stay wheel full force blue object decide surface deep
moon island foot system busy test record boat common gold possible plane age dry wonder
laugh thousand ago ran check game shape equate hot miss brought heat snow tire bring yes
distant fill east paint language among hello hi okay thank thanks please sorry today
tomorrow yesterday really very cute am speech speak speaking text audio weather nice
"""

# Word endings as ``##`` continuations, so that inflected forms of the words above split in
# two pieces instead of falling back to single characters.
_SUFFIXES: Final = (
    "s es ed d ing ly er ers est tion tions ment ments ness ful able al ic ity ous ive y en "
    "ize ized ist ists ism less ship ance ence ant ent ation ations ies ied"
)


def _char_ranges() -> Iterable[tuple[int, int]]:
    """Code point ranges (inclusive) of the characters the vocabulary holds one by one."""
    return (
        (0x21, 0x7E),  # printable ASCII
        (0xA1, 0xAC),  # Latin-1 symbols (the soft hyphen 0xAD is removed by normalization)
        (0xAE, 0xFF),  # Latin-1 symbols and letters
        (0x100, 0x17F),  # Latin Extended-A: Polish, Czech, Turkish...
        (0x218, 0x21B),  # Romanian comma-below letters
        (0x386, 0x3CE),  # Greek
        (0x400, 0x45F),  # Cyrillic
        (0x900, 0x97F),  # Devanagari (Hindi)
        (0x2013, 0x2014),  # en and em dash
        (0x2018, 0x201E),  # curly quotes
        (0x2020, 0x2022),  # daggers, bullet
        (0x2026, 0x2026),  # ellipsis
        (0x2039, 0x203A),  # single guillemets
        (0x20AC, 0x20AC),  # euro sign
        (0x2122, 0x2122),  # trade mark
        (0x266A, 0x266B),  # musical notes (Bark sings between them)
        (0x3001, 0x3011),  # CJK punctuation and brackets
        (0x3041, 0x3096),  # hiragana
        (0x30A1, 0x30FC),  # katakana and the prolonged sound mark
        (0x4E00, 0x9FFF),  # CJK unified ideographs
        (0xAC00, 0xD7A3),  # Hangul syllables
        (0xFF01, 0xFF5E),  # full-width forms
    )


def _continues_words(char: str) -> bool:
    """Whether ``char`` can appear inside a word after BERT's pre-tokenization.

    BERT splits words at punctuation (every non-alphanumeric ASCII character and Unicode
    category P*) and around CJK ideographs; everything else - letters, digits, combining
    vowel signs (Devanagari), symbols such as the euro sign - may follow another character
    and then needs a ``##`` form.
    """
    code = ord(char)
    if 0x4E00 <= code <= 0x9FFF:
        return False
    if code < 0x80:
        return char.isalnum()
    return not unicodedata.category(char).startswith("P")


def _random_vocab() -> dict[str, int]:
    """A vocabulary laid out like bert-base-multilingual-cased's first ids.

    ``[PAD]`` is 0, ``[unused1]``..``[unused99]`` follow, then ``[UNK]`` 100, ``[CLS]`` 101,
    ``[SEP]`` 102 and ``[MASK]`` 103, as in the real file; then single characters, their
    ``##`` continuations, English words and word endings.
    """
    tokens = ["[PAD]", *(f"[unused{i}]" for i in range(1, 100))]
    tokens += ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(c) for lo, hi in _char_ranges() for c in range(lo, hi + 1)]
    tokens += chars
    tokens += [f"##{c}" for c in chars if _continues_words(c)]
    for word in _ENGLISH_TEXT.split():
        tokens += [word, word.capitalize()]
    tokens += [f"##{suffix}" for suffix in _SUFFIXES.split()]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))  # a word like "I" is also a character
    if len(vocab) > TEXT_VOCAB_SIZE:  # pragma: no cover - a guard on the lists above
        raise AssertionError("random vocabulary is larger than Bark's text vocabulary")
    return vocab


def random_bark_tokenizer() -> BertTokenizer:
    """An offline stand-in for Bark's tokenizer (bert-base-multilingual-cased).

    Cased WordPiece with the same special tokens at the same ids; every id is below
    :data:`TEXT_VOCAB_SIZE`. It saves and loads with ``save_pretrained`` and
    ``AutoTokenizer.from_pretrained`` like any BERT tokenizer.
    """
    from transformers import BertTokenizer

    return BertTokenizer(
        vocab=_random_vocab(),
        do_lower_case=False,
        tokenize_chinese_chars=True,
        strip_accents=None,
        model_max_length=512,
    )


# --- voice presets --------------------------------------------------------------------------


def _name_seed(name: str) -> int:
    # hashlib, not hash(): str hashes change from one process to the next
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")


def random_voice_preset(name: str, seed: int = 0) -> dict[str, np.ndarray]:
    """One voice preset in Bark's format, a function of ``(seed, name)`` alone.

    ``semantic_prompt`` is 1-D (a few hundred semantic tokens), ``coarse_prompt`` 2 x M and
    ``fine_prompt`` 8 x M codebook entries with M the semantic length at 75 / 49.9 frames per
    token, as in the real presets; the first two fine rows are the coarse ones.
    """
    rng = np.random.default_rng([seed, _name_seed(name)])
    n_semantic = int(rng.integers(200, 400))
    n_frames = round(n_semantic * COARSE_RATE_HZ / SEMANTIC_RATE_HZ)
    semantic = rng.integers(0, SEMANTIC_VOCAB_SIZE, n_semantic, dtype=np.int64)
    fine = rng.integers(0, CODEBOOK_SIZE, (N_FINE_CODEBOOKS, n_frames), dtype=np.int64)
    return {
        "semantic_prompt": semantic,
        "coarse_prompt": fine[:N_COARSE_CODEBOOKS].copy(),
        "fine_prompt": fine,
    }


def random_voice_presets(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """The voice presets of a random model: :data:`RANDOM_VOICE_NAMES`, seeded per name."""
    return {name: random_voice_preset(name, seed) for name in RANDOM_VOICE_NAMES}


def write_voice_presets(
    voices: Mapping[str, Mapping[str, np.ndarray]], directory: str | os.PathLike[str]
) -> dict[str, Any]:
    """Write presets in the layout of the Bark repositories and return the path dict.

    Files are ``speaker_embeddings/<name>_<key>.npy`` next to ``speaker_embeddings_path.json``
    (what ``BarkProcessor.save_pretrained`` writes and ``BarkProcessor.from_pretrained``
    reads). The returned dict is what ``BarkProcessor(speaker_embeddings=...)`` takes.
    """
    root = os.fspath(directory)
    embeddings: dict[str, Any] = {"repo_or_path": root}
    for name, preset in voices.items():
        relative = {key: _preset_file(name, key) for key in _PROMPT_KEYS}
        for key, path in relative.items():
            if key not in preset:
                raise ModelLoadError(f"voice preset {name!r} has no {key!r}")
            target = os.path.join(root, path)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            np.save(target, np.asarray(preset[key], dtype=np.int64), allow_pickle=False)
        embeddings[name] = relative
    with open(os.path.join(root, SPEAKER_EMBEDDINGS_JSON), "w", encoding="utf-8") as file:
        json.dump(embeddings, file, indent=1)
    return embeddings


def _preset_file(name: str, key: str) -> str:
    # Preset names become paths ("v2/en_speaker_1"): refuse any that would leave the folder.
    parts = name.replace("\\", "/").split("/")
    if not name or os.path.isabs(name) or any(part in ("", ".", "..") for part in parts):
        raise ModelLoadError(f"invalid voice preset name {name!r}")
    return "/".join((SPEAKER_EMBEDDINGS_DIR, *parts[:-1], f"{parts[-1]}_{key}.npy"))


# --- the model ------------------------------------------------------------------------------


def build_random_bark(
    size: str, seed: int = 0, *, attn_implementation: str = "eager"
) -> tuple[BarkModel, BarkProcessor]:
    """``BarkModel`` and ``BarkProcessor`` of ``random:<size>``, with weights from ``seed``.

    The same ``(size, seed)`` gives bit-identical weights and voices. The model is in eval
    mode, float32, on the CPU, with :func:`bark_generation_config`. The processor's voice
    presets (:func:`random_voice_presets`) are files in a private temporary folder, in the
    layout the Bark repositories use, so that ``processor(text, voice_preset=name)`` and
    ``processor.save_pretrained`` work as with a downloaded model; the folder is removed when
    the processor is garbage collected.
    """
    from transformers import BarkModel, BarkProcessor

    if seed < 0:
        raise ModelLoadError(f"seed must be >= 0, not {seed}")
    config = random_bark_config(size)
    config._attn_implementation = attn_implementation  # applies to the sub-configs too
    # Fork the global RNG: transformers draws the initial weights from it, and the caller's
    # random state must not depend on whether a model was built.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BarkModel(config)
    _spread_weights(model)
    _randomize_constants(model, seed)
    _calibrate_codec(model, seed)
    model.generation_config = bark_generation_config()
    model.eval()

    processor = BarkProcessor(tokenizer=random_bark_tokenizer(), speaker_embeddings=None)
    folder = tempfile.mkdtemp(prefix="stream-engine-voices-")
    weakref.finalize(processor, shutil.rmtree, folder, ignore_errors=True)
    processor.speaker_embeddings = write_voice_presets(random_voice_presets(seed), folder)
    return model, processor


@torch.no_grad()
def _spread_weights(model: BarkModel) -> None:
    """Widen the transformers' initial weights so that their outputs depend on their inputs.

    With transformers' N(0, 0.02) init, attention is nearly uniform and the logits nearly flat:
    a random model then says the same tokens whatever the text or voice, and tests could not
    tell one request's output from another's. Linear weights get std 2/sqrt(fan_in) and
    embeddings std 0.4, which keeps activations bounded (pre-norm blocks) while making every
    stage sensitive to its input. Deterministic: the same draws, rescaled.
    """
    seen: set[int] = set()  # the fine model's heads are tied to its embeddings: scale once
    for sub in (model.semantic, model.coarse_acoustics, model.fine_acoustics):
        for module in sub.modules():
            if not isinstance(module, torch.nn.Linear | torch.nn.Embedding):
                continue
            if id(module.weight) in seen:
                continue
            seen.add(id(module.weight))
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_((2.0 / module.in_features**0.5) / 0.02)
            else:
                module.weight.mul_(0.4 / 0.02)


@torch.no_grad()
def _randomize_constants(model: BarkModel, seed: int) -> None:
    """Replace the tensors the default init leaves constant with seeded random values.

    The default init sets layer norms to 1 and 0, biases to 0, and EnCodec's codebooks to 0.
    Zero codebooks would decode every code to the same sound, and constant parameters let a
    weight-loading bug (a bias or norm not copied) go unnoticed; so every such parameter gets
    a small spread around its constant, and the codebooks get unit-scale vectors.
    """
    from transformers.models.encodec.modeling_encodec import EncodecEuclideanCodebook

    generator = torch.Generator().manual_seed(seed + 0x5EED)
    for param in model.parameters():  # a fixed order, so the noise is a function of seed
        flat = param.detach().reshape(-1)
        if flat.numel() > 1 and bool((flat == flat[0]).all()):
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            param.add_(noise * 0.05)
    for module in model.codec_model.modules():
        if isinstance(module, EncodecEuclideanCodebook):
            embed = torch.randn(module.embed.shape, generator=generator, dtype=module.embed.dtype)
            module.embed.copy_(embed)
            module.embed_avg.copy_(embed)
            module.cluster_size.fill_(1.0)
            module.inited.fill_(1.0)


@torch.no_grad()
def _calibrate_codec(model: BarkModel, seed: int) -> None:
    """Scale the codec's last convolution so that random codes decode to speech-like levels.

    A randomly initialized EnCodec decoder puts out a near-constant offset (its last layer's
    bias dominates), which is neither audible nor a fair load for an audio encoder. One
    decode of a second of seeded random codes measures the output; the last convolution's
    weight-norm gain and bias are then set so that the output has zero mean and an RMS of
    0.1 (about -20 dBFS, with peaks well below full scale).
    """
    codec = model.codec_model
    generator = torch.Generator().manual_seed(seed + 0xC0DEC)
    codes = torch.randint(
        0, CODEBOOK_SIZE, (N_FINE_CODEBOOKS, 1, COARSE_RATE_HZ), generator=generator
    )
    audio = codec.decoder(codec.quantizer.decode(codes))
    last = codec.decoder.layers[-1].conv
    scale = 0.1 / float(audio.std())
    offset = float(audio.mean())
    gain = last.parametrizations.weight.original0
    gain.mul_(scale)
    last.bias.copy_(-scale * (offset - last.bias))

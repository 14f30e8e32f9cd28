"""Load and save Bark: random offline models, local directories and Hugging Face hub models.

:func:`load_bark` takes one string and returns a :class:`LoadedBark` (transformers'
``BarkModel``, its ``BarkProcessor`` and the voice presets as arrays):

* ``random:tiny``, ``random:small``, ``random:large`` - offline models with Bark's
  architecture and seeded random weights (:mod:`stream_engine.bark.random_models`);
  ``random:small@7`` picks seed 7 (the default is 0);
* a local directory in the Hugging Face layout, as :func:`save_bark` or
  ``BarkModel.save_pretrained`` + ``BarkProcessor.save_pretrained`` write it;
* a hub id such as ``suno/bark-small`` or ``suno/bark``. The local cache is tried first
  without any network; if the model is not there, one short request to the hub decides
  whether downloading can work, so that a machine without network fails within seconds
  with :class:`~stream_engine.errors.ModelNotFound` (naming the offline models) instead of
  retrying for minutes. Nothing ever falls back silently to another model.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import torch

from stream_engine.bark.random_models import (
    RANDOM_SIZES,
    bark_generation_config,
    build_random_bark,
    random_voice_presets,
    write_voice_presets,
)
from stream_engine.errors import ModelLoadError, ModelNotFound, UnknownVoice

if TYPE_CHECKING:
    from transformers import BarkModel, BarkProcessor

logger = logging.getLogger(__name__)

_RANDOM_PREFIX: Final = "random:"
_RANDOM_RE: Final = re.compile(r"random:(?P<size>[^@]*)(?:@(?P<seed>\d+))?")
# owner/name or a bare name, as the hub allows them (no "..", no leading separator)
_HUB_ID_RE: Final = re.compile(r"[A-Za-z0-9][\w.-]*(?:/[\w.-]+)?")
# the hub request that decides whether a download can work; short, because its only
# purpose is to fail fast when there is no network
_HUB_PROBE_TIMEOUT_S: Final = 5.0
_PROMPT_KEYS: Final = ("semantic_prompt", "coarse_prompt", "fine_prompt")
# transformers' Bark has eager and FlashAttention-2 classes only; the engine's own sdpa
# kernels read the same weights, so "sdpa" loads the transformers model as eager
_HF_ATTN: Final[Mapping[str, str]] = MappingProxyType(
    {"eager": "eager", "sdpa": "eager", "flash_attention_2": "flash_attention_2"}
)


def offline_models() -> tuple[str, ...]:
    """The model names that need no download."""
    return tuple(f"{_RANDOM_PREFIX}{size}" for size in RANDOM_SIZES)


@dataclass
class LoadedBark:
    """A Bark model ready to serve, with what was asked for and the voices it knows."""

    name: str  # what the user asked for: "random:tiny", "suno/bark-small", a directory
    model: BarkModel  # transformers model, eval(), on device/dtype
    processor: BarkProcessor  # tokenizer (+ speaker embeddings paths, may be None)
    voices: dict[str, dict[str, np.ndarray]]  # preset -> {"semantic_prompt", ...} int64 arrays

    def voice(self, name: str) -> dict[str, np.ndarray]:
        """The arrays of one voice preset; :class:`UnknownVoice` if there is none by that name."""
        try:
            return self.voices[name]
        except KeyError:
            known = sorted(self.voices)
            shown = ", ".join(known[:12]) + (", ..." if len(known) > 12 else "")
            raise UnknownVoice(
                f"unknown voice {name!r}; this model has {len(known)} voices: {shown or 'none'}"
            ) from None


def load_bark(
    model: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    attn: str = "eager",
    offload: bool = False,
) -> LoadedBark:
    """Load ``model`` (``random:<size>[@seed]``, a directory, or a hub id).

    ``attn`` is ``"eager"``, ``"sdpa"`` or ``"flash_attention_2"`` (CUDA only). transformers'
    Bark has no sdpa attention, so with ``"sdpa"`` its model is built eager (the engine's own
    kernels, which read the same weights, are the ones that use sdpa). ``offload=True``
    keeps the weights on the CPU and moves one sub-model at a time to the CUDA ``device``
    (``BarkModel.enable_cpu_offload``).

    Raises :class:`ModelNotFound` when the model does not exist or cannot be fetched, and
    :class:`ModelLoadError` when it exists but cannot be loaded as asked.
    """
    target = torch.device(device)
    hf_attn = _hf_attention(attn, target)
    if offload and target.type != "cuda":
        raise ModelLoadError(f"offload needs a CUDA device, not {target}")

    if model.startswith(_RANDOM_PREFIX):
        bark, processor, voices = _load_random(model, hf_attn)
    elif os.path.isdir(model):
        try:
            bark, processor = _from_pretrained(model, dtype, hf_attn, local_files_only=True)
        except OSError as err:
            raise ModelLoadError(f"{model!r} is not a Bark model directory: {err}") from err
        voices = _read_voices(processor)
    elif _HUB_ID_RE.fullmatch(model) and ".." not in model:
        bark, processor, voices = _load_hub(model, dtype, hf_attn)
    else:
        raise ModelNotFound(f"{model!r} is not a directory or a hub model id. {_offline_hint()}")

    bark.eval()
    if getattr(bark.generation_config, "semantic_config", None) is None:
        # BarkModel.generate reads its settings from here; a directory saved without
        # generation_config.json would otherwise fail only when asked to speak
        logger.warning("%s has no Bark generation config; using Bark's defaults", model)
        bark.generation_config = bark_generation_config()
    # PreTrainedModel.to is wrapped in a way type checkers cannot follow; it is Module.to
    module: torch.nn.Module = bark
    try:
        if offload:
            module.to(dtype=dtype)
            bark.enable_cpu_offload(accelerator_id=target.index or 0)
        else:
            module.to(device=target, dtype=dtype)
    except (RuntimeError, ValueError, ImportError) as err:
        raise ModelLoadError(f"cannot place {model!r} on {target} as {dtype}: {err}") from err
    return LoadedBark(name=model, model=bark, processor=processor, voices=voices)


def save_bark(loaded: LoadedBark, directory: str | os.PathLike[str]) -> None:
    """Write ``loaded`` as a Hugging Face Bark directory.

    ``BarkModel.from_pretrained``, ``BarkProcessor.from_pretrained`` (voices included, as
    ``speaker_embeddings_path.json`` + ``speaker_embeddings/*.npy`` like the Bark repos) and
    :func:`load_bark` all read it back. The voices written are ``loaded.voices``.
    """
    from transformers import BarkProcessor

    root = os.fspath(directory)
    model = loaded.model
    # transformers 5 validates the generation config while saving, and BarkGenerationConfig
    # cannot pass (it never runs GenerationConfig.__init__, so attributes such as
    # early_stopping are missing). Save the same values in the plain form that
    # from_pretrained reads back; the model is left as it was.
    original = model.generation_config
    try:
        model.generation_config = bark_generation_config(original)
        os.makedirs(root, exist_ok=True)
        model.save_pretrained(root)
        # The tokenizer through a processor without presets: BarkProcessor.save_pretrained
        # would fetch every preset again through its paths (for a hub model, from the
        # network); the arrays are in memory already.
        BarkProcessor(
            tokenizer=loaded.processor.tokenizer, speaker_embeddings=None
        ).save_pretrained(root)
        write_voice_presets(loaded.voices, root)
    except OSError as err:
        raise ModelLoadError(f"cannot save {loaded.name!r} to {root}: {err}") from err
    finally:
        model.generation_config = original


def _offline_hint() -> str:
    return "Models that need no download: " + ", ".join(offline_models()) + "."


def _hf_attention(attn: str, device: torch.device) -> str:
    try:
        hf_attn = _HF_ATTN[attn]
    except KeyError:
        raise ModelLoadError(
            f"unknown attention implementation {attn!r}; choose one of {', '.join(_HF_ATTN)}"
        ) from None
    if hf_attn == "flash_attention_2" and device.type != "cuda":
        raise ModelLoadError(f"flash_attention_2 needs a CUDA device, not {device}")
    return hf_attn


def _load_random(
    model: str, hf_attn: str
) -> tuple[BarkModel, BarkProcessor, dict[str, dict[str, np.ndarray]]]:
    match = _RANDOM_RE.fullmatch(model)
    sizes = ", ".join(offline_models())
    if match is None:
        raise ModelNotFound(
            f"cannot parse {model!r}: use random:SIZE or random:SIZE@SEED ({sizes})"
        )
    size, seed = match["size"], int(match["seed"] or 0)
    if size not in RANDOM_SIZES:
        raise ModelNotFound(f"unknown random model {model!r}; choose one of {sizes}")
    try:
        bark, processor = build_random_bark(size, seed, attn_implementation=hf_attn)
    except (ImportError, ValueError) as err:  # e.g. flash-attn not installed
        raise ModelLoadError(f"cannot build {model!r}: {err}") from err
    return bark, processor, random_voice_presets(seed)


def _from_pretrained(
    source: str, dtype: torch.dtype, hf_attn: str, *, local_files_only: bool
) -> tuple[BarkModel, BarkProcessor]:
    """``BarkModel`` and ``BarkProcessor`` from a directory or the hub.

    OSError (files missing, not in the cache, download failed) passes through; the callers
    decide what it means. Anything that is not a complete Bark checkpoint is a
    :class:`ModelLoadError`: ``from_pretrained`` alone would accept another architecture's
    config, or a checkpoint with missing weights, and fill the gaps with random values.
    """
    from transformers import AutoConfig, BarkConfig, BarkModel, BarkProcessor

    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local_files_only)
        if not isinstance(config, BarkConfig):
            kind = getattr(config, "model_type", "unknown")
            raise ModelLoadError(f"{source!r} holds a {kind!r} model, not Bark")
        loaded: Any = BarkModel.from_pretrained(
            source,
            config=config,
            dtype=dtype,
            attn_implementation=hf_attn,
            local_files_only=local_files_only,
            output_loading_info=True,
        )
        bark, info = loaded
        processor = BarkProcessor.from_pretrained(source, local_files_only=local_files_only)
    except OSError:
        raise
    except (ValueError, KeyError, TypeError, ImportError, RuntimeError) as err:
        raise ModelLoadError(f"cannot load Bark from {source!r}: {err}") from err
    _check_complete(source, bark, info)
    return bark, processor


def _check_complete(source: str, bark: BarkModel, info: dict[str, Any]) -> None:
    """Raise :class:`ModelLoadError` if the checkpoint lacked weights the model needs.

    Missing buffers that the model rebuilds deterministically (causal masks, convolution
    geometry) are fine; missing parameters or codec codebooks would be random.
    """
    parameters = {name for name, _ in bark.named_parameters(remove_duplicate=False)}
    missing = sorted(
        key
        for key in info.get("missing_keys", ())
        if key in parameters or key.endswith("codebook.embed")
    )
    mismatched = sorted(str(key) for key in info.get("mismatched_keys", ()))
    if missing or mismatched:
        problems = [f"missing {', '.join(missing[:8])}"] if missing else []
        problems += [f"wrong shape {', '.join(mismatched[:8])}"] if mismatched else []
        raise ModelLoadError(f"{source!r} is not a complete Bark checkpoint: {'; '.join(problems)}")


def _load_hub(
    repo_id: str, dtype: torch.dtype, hf_attn: str
) -> tuple[BarkModel, BarkProcessor, dict[str, dict[str, np.ndarray]]]:
    try:
        # the local cache first: no request at all when the model is there
        bark, processor = _from_pretrained(repo_id, dtype, hf_attn, local_files_only=True)
    except OSError:
        pass
    else:
        return bark, processor, _read_voices(processor)

    _probe_hub(repo_id)
    try:
        bark, processor = _from_pretrained(repo_id, dtype, hf_attn, local_files_only=False)
    except OSError as err:
        raise ModelNotFound(f"cannot download {repo_id!r}: {err}. {_offline_hint()}") from err
    _fetch_voice_files(repo_id)
    return bark, processor, _read_voices(processor)


def _probe_hub(repo_id: str) -> None:
    """Raise :class:`ModelNotFound` unless the hub answers for ``repo_id`` right now.

    One request with a short timeout and no retries. transformers' own downloads retry
    connection errors with back-off (more than 20 s before they give up), so without this
    a machine with no network would wait a long time for an error that is certain.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    try:
        HfApi().model_info(repo_id, timeout=_HUB_PROBE_TIMEOUT_S)
    except GatedRepoError as err:
        reason = f"{repo_id!r} is gated on the hub and this machine has no access"
        raise ModelNotFound(f"{reason}. {_offline_hint()}") from err
    except RepositoryNotFoundError as err:
        reason = f"{repo_id!r} is not a local directory and not a model on the hub"
        raise ModelNotFound(f"{reason}. {_offline_hint()}") from err
    except OfflineModeIsEnabled as err:
        reason = (
            f"{repo_id!r} is not a local directory, not in the Hugging Face cache, and hub"
            " access is off (HF_HUB_OFFLINE)"
        )
        raise ModelNotFound(f"{reason}. {_offline_hint()}") from err
    except Exception as err:  # the HTTP client's errors: DNS, connect, timeout, HTTP status
        reason = (
            f"{repo_id!r} is not a local directory, not in the Hugging Face cache, and the hub"
            f" cannot be reached ({err})"
        )
        raise ModelNotFound(f"{reason}. {_offline_hint()}") from err


def _fetch_voice_files(repo_id: str) -> None:
    """Download every voice preset of ``repo_id`` into the cache in one go.

    The processor fetches presets one file per request; a Bark repository has hundreds, so
    one listing and parallel downloads are much faster. The presets are then read from the
    cache.
    """
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(
            repo_id, allow_patterns=["speaker_embeddings_path.json", "speaker_embeddings/**"]
        )
    except Exception as err:  # the model is there; missing presets are reported when read
        logger.warning("could not download the voice presets of %s: %s", repo_id, err)


def _read_voices(processor: BarkProcessor) -> dict[str, dict[str, np.ndarray]]:
    """All voice presets the processor lists, read through the processor's own loader.

    Only local files are read (a directory, or the hub cache after :func:`_fetch_voice_files`):
    the processor's loader would otherwise send a request per file. A preset whose files are
    missing or malformed is skipped with a warning; the others stay usable.
    """
    voices: dict[str, dict[str, np.ndarray]] = {}
    skipped: list[str] = []
    for name in processor.available_voice_presets:
        try:
            arrays = processor._load_voice_preset(name, local_files_only=True)
            processor._validate_voice_preset_dict(arrays)
        except (OSError, ValueError, TypeError) as err:
            logger.debug("voice preset %s: %s", name, err)
            skipped.append(name)
            continue
        voices[name] = {key: np.asarray(arrays[key], dtype=np.int64) for key in _PROMPT_KEYS}
    if skipped:
        logger.warning(
            "skipped %d voice presets whose files are missing or malformed: %s",
            len(skipped),
            ", ".join(skipped[:10]) + (", ..." if len(skipped) > 10 else ""),
        )
    return voices

"""The public entry point: load a Bark model, turn texts into speech.

``Engine.generate`` runs the batched runtime until every request is done; the streaming server
drives the same :class:`~stream_engine.runtime.loop.Runtime` step by step.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import random
from typing import Any

import torch

from .bark import cpu_kernels
from .bark.loading import LoadedBark, load_bark, save_bark
from .bark.model import CausalGPT, FineGPT, from_hf
from .bark.prompts import BarkConstants, VoicePrompt
from .config import EngineConfig, GenerationOptions
from .errors import (
    EmptyText,
    GpuCheckFailed,
    InvalidOption,
    StreamEngineError,
    TextTooLong,
    UnknownVoice,
)
from .runtime import cuda, self_check
from .runtime.loop import Runtime
from .runtime.request import Request, Speech, Status
from .runtime.stages import CoarseStage, CodecStage, DecodeStage, FineStage, SemanticStage

log = logging.getLogger(__name__)

# Real Bark speaks about 14 characters of English text per second (measured on suno/bark's
# examples: ~2.6 words/s); semantic tokens come at 49.9 per second of audio.
RANDOM_CHARS_PER_SECOND = 14.0
RANDOM_MIN_SEMANTIC_TOKENS = 25  # half a second: even "Hi." is spoken


def random_model_semantic_tokens(text: str, consts: BarkConstants) -> int:
    """Segment length for ``random:*`` models, whose random weights never choose EOS.

    Semantic tokens proportional to the text's length at the rate real Bark speaks, clamped to
    [25, 768]. Used when a request sets no ``max_semantic_tokens``.
    """
    seconds = len(text.strip()) / RANDOM_CHARS_PER_SECOND
    tokens = math.ceil(seconds * consts.semantic_rate_hz)
    return max(RANDOM_MIN_SEMANTIC_TOKENS, min(consts.max_new_semantic_tokens, tokens))


def flash_attn_problem(device: torch.device) -> str | None:
    """Why flash-attn cannot serve here (None: it can): it must import, and on CUDA run once."""
    try:
        from flash_attn import flash_attn_func  # optional CUDA-only dependency
    except Exception as exc:  # ImportError, or a broken build's OSError/RuntimeError
        return f"flash_attn does not import ({type(exc).__name__}: {exc})"
    if device.type != "cuda":
        return None  # the device check says what is wrong
    try:
        q = torch.zeros(1, 1, 1, 64, dtype=torch.float16, device=device)  # (B, T, nh, hs)
        flash_attn_func(q, q, q, causal=True)
        torch.cuda.synchronize(device)
    except Exception as exc:
        return f"flash_attn fails on {device} ({type(exc).__name__}: {exc})"
    return None


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise InvalidOption(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


class Engine:
    """A loaded Bark model with its runtime."""

    def __init__(self, loaded: LoadedBark, config: EngineConfig, device: torch.device) -> None:
        self.loaded = loaded
        self.config = config
        self.device = device
        self.consts = BarkConstants.from_generation_config(loaded.model.generation_config)
        self.is_random = loaded.name.startswith("random:")
        hf = loaded.model
        semantic, coarse, fine = (
            from_hf(hf.semantic),
            from_hf(hf.coarse_acoustics),
            from_hf(hf.fine_acoustics),
        )
        assert isinstance(semantic, CausalGPT) and isinstance(coarse, CausalGPT)
        assert isinstance(fine, FineGPT)
        for m in (semantic, coarse, fine):
            m.set_attn(config.attn)
        # decode steps on a CPU in float32: the AVX2 kernels, packed oneDNN or plain MKL
        self.decode_kernel, kernels = cpu_kernels.resolve(
            config.cpu_decode_kernel, semantic.lm_head.weight
        )
        semantic.use_decode_kernel(self.decode_kernel, kernels, config.semantic_slots)
        coarse.use_decode_kernel(self.decode_kernel, kernels, config.coarse_slots)
        self.semantic_model, self.coarse_model, self.fine_model = semantic, coarse, fine
        self.voices = {name: VoicePrompt.from_preset(p) for name, p in loaded.voices.items()}
        # what the engine fell back from at load, and why (e.g. flash-attn that does not import)
        self.fallbacks: list[str] = []
        # the load-time GPU checks' findings (see runtime/self_check.py)
        self.checks: dict[str, Any] = {}
        self._ids = itertools.count(1)
        on_gpu = cuda.on_gpu(device)
        graphs = config.cuda_graphs and on_gpu
        self.semantic_stage = SemanticStage(
            semantic,
            self.consts,
            config.semantic_slots,
            sync_every=8 if on_gpu else 1,
            cuda_graphs=graphs,
            graph_batches=config.cuda_graph_batches,
        )
        self.coarse_stage = CoarseStage(
            coarse,
            self.consts,
            config.coarse_slots,
            cuda_graphs=graphs,
            graph_batches=config.cuda_graph_batches,
        )
        self.runtime = Runtime(
            {
                "semantic": self.semantic_stage,
                "coarse": self.coarse_stage,
                "fine": FineStage(fine, self.consts, config.fine_batch),
                "codec": CodecStage(hf.codec_model, config.codec_batch),
            },
            max_queue=config.max_queue,
            semantic_rate_hz=self.consts.semantic_rate_hz,
        )

    # -- loading --------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        model: str = "suno/bark-small",
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        attn: str | None = None,
        offload: bool = False,
        config: EngineConfig | None = None,
    ) -> Engine:
        """Load ``model``: a hub id, a local directory in HF layout, or ``random:tiny|small|large``.

        ``offload=True`` is refused: accelerate's offload hooks serve transformers' own forward
        passes, and the runtime's stages read the weights directly, so they would run where the
        weights rest (the CPU), silently. ``load_bark(..., offload=True)`` still offloads the
        transformers model alone.
        """
        if offload:
            raise InvalidOption(
                "offload=True is not supported by the engine's runtime: its stages read the "
                "weights directly and would run on the CPU; load with dtype='float16' or a "
                "smaller model instead"
            )
        dev = torch.device(device) if device is not None else _default_device()
        config = config or EngineConfig()
        if attn is not None:
            config = dataclasses.replace(config, attn=attn)
        torch_dtype = _dtype(dtype, dev)
        fallbacks: list[str] = []
        if config.attn == "flash_attention_2":
            if torch_dtype == torch.float32:
                raise InvalidOption(
                    "flash_attention_2 runs in float16 or bfloat16, not float32: load with "
                    "dtype='float16' (or 'bfloat16'), or with attn='sdpa'"
                )
            problem = flash_attn_problem(dev)
            if problem is not None:
                if config.strict_gpu:
                    raise GpuCheckFailed(f"flash_attention_2 is not usable here: {problem}")
                log.warning("flash_attention_2 is not usable (%s); attention runs on sdpa", problem)
                fallbacks.append(f"flash_attention_2 -> sdpa: {problem}")
                config = dataclasses.replace(config, attn="sdpa")
        if config.attn == "flash_attention_2" and dev.type != "cuda":
            raise InvalidOption("flash_attention_2 needs a CUDA device")
        hf_attn = "flash_attention_2" if config.attn == "flash_attention_2" else "eager"
        loaded = load_bark(model, device=dev, dtype=torch_dtype, attn=hf_attn, offload=offload)
        engine = cls(loaded, config, dev)
        engine.fallbacks.extend(fallbacks)
        if cuda.on_gpu(dev):
            engine._prepare_gpu()
        return engine

    def _prepare_gpu(self) -> None:
        """Choose attention kernels, capture the decode graphs, check them (runtime/self_check).

        Each failure falls back (torch's own kernel choice; eager decode) with a warning and a
        line in :attr:`fallbacks`, or raises :class:`GpuCheckFailed` under ``strict_gpu``.
        Runs before any request, from the loading thread.
        """
        check = self.config.gpu_self_check
        if check:
            model = self.semantic_model
            calls = self_check.attention_calls(
                self.device, model.lm_head.weight.dtype, model.cfg.n_head, model.cfg.head_dim
            )
            tolerance = self_check.SDPA_TOLERANCE.get(model.lm_head.weight.dtype, 5e-2)
            try:
                self.checks["sdpa"] = self_check.probe_sdpa(calls, tolerance).as_dict()
            except Exception as exc:
                self._fall_back(f"attention kernel probe failed ({_why(exc)}); torch chooses")
        else:  # not a check: a policy (plans per shape), as the probe applies it
            self_check.turn_off_cudnn_attention()
            disabled = {"CUDNN_ATTENTION": self_check.CUDNN_WHY}
            self.checks["sdpa"] = {"kernels": {}, "disabled": disabled}
        stages: tuple[DecodeStage, ...] = (self.semantic_stage, self.coarse_stage)
        failed: str | None = None  # the stage whose capture raised: nothing is captured after it
        for stage in stages:
            if stage.graphs is None:
                continue
            if failed is not None:
                stage.graphs = None
                self._fall_back(
                    f"{stage.name} decode graphs -> eager: not captured after the {failed} "
                    "stage's capture failed"
                )
                continue
            try:
                stage.capture_graphs()
            except Exception as exc:
                stage.graphs, failed = None, stage.name
                self._fall_back(
                    f"{stage.name} decode graphs -> eager: capture failed ({_why(exc)})"
                )
                continue
            self.checks.setdefault("capture_s", {})[stage.name] = round(stage.graphs.capture_s, 3)
            if not check:
                continue
            try:
                result = self_check.check_graphs(stage)
            except Exception as exc:
                problem: str | None = f"{stage.name}: the check failed to run ({_why(exc)})"
            else:
                self.checks.setdefault("graphs", {})[stage.name] = result.as_dict()
                problem = result.problem
            if problem is not None:
                stage.graphs = None
                self._fall_back(f"{stage.name} decode graphs -> eager: {problem}")

    def _fall_back(self, reason: str) -> None:
        if self.config.strict_gpu:
            raise GpuCheckFailed(reason)
        log.warning("%s", reason)
        self.fallbacks.append(reason)

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write a Hugging Face layout directory that transformers and ``Engine.load`` read."""
        save_bark(self.loaded, directory)

    def decode_mode(self) -> dict[str, Any]:
        """How the engine decodes, as loaded: for /healthz and the metrics.

        ``cuda_graphs`` says which stages replay graphs; ``sdpa`` the attention kernel of each
        kind of call (``"default"``: torch chooses per call); ``fallbacks`` what the load fell
        back from, and why; ``checks`` the load-time GPU checks' findings.
        """
        kernels = self.checks.get("sdpa", {}).get("kernels", {})
        stages = (self.semantic_stage, self.coarse_stage)
        return {
            "attn": self.config.attn,
            "cuda_graphs": ",".join(s.name for s in stages if s.graphs and s.graphs.live) or "off",
            "decode_kernel": self.decode_kernel,
            "dtype": str(self.semantic_model.lm_head.weight.dtype).removeprefix("torch."),
            "sdpa": ",".join(f"{k}={v}" for k, v in kernels.items()) or "default",
            "fallbacks": list(self.fallbacks),
            "checks": dict(self.checks),
        }

    def eager_steps(self) -> dict[str, int]:
        """Decode steps that found no captured graph and ran eagerly, per stage (CUDA graphs)."""
        return {
            s.name: s.graphs.eager_steps
            for s in (self.semantic_stage, self.coarse_stage)
            if s.graphs is not None
        }

    @property
    def name(self) -> str:
        return self.loaded.name

    @property
    def sample_rate(self) -> int:
        return self.consts.sample_rate

    # -- requests -------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise InvalidOption(f"text must be a string, got {type(text).__name__}")
        if not text.strip():
            raise EmptyText("text is empty")
        ids: list[int] = self.loaded.processor.tokenizer(text, add_special_tokens=False)[
            "input_ids"
        ]
        if not ids:
            raise EmptyText("text has no speakable tokens")
        limit = self.consts.max_input_semantic_length
        if len(ids) > limit:
            raise TextTooLong(f"text is {len(ids)} tokens; Bark reads at most {limit} at once")
        return ids

    def count_tokens(self, text: str) -> int:
        """Text tokens Bark would read for ``text`` (no validation; for the segmenter)."""
        return len(self.loaded.processor.tokenizer(text, add_special_tokens=False)["input_ids"])

    def voice(self, name: str | None) -> VoicePrompt | None:
        if name is None:
            return None
        if not isinstance(name, str) or name not in self.voices:
            raise UnknownVoice(f"unknown voice {name!r}; available: {sorted(self.voices)}")
        return self.voices[name]

    def request(
        self,
        text: str,
        voice: str | VoicePrompt | None = None,
        options: GenerationOptions | None = None,
        after: Request | None = None,
    ) -> Request:
        """Validate and build a request (not yet submitted). Raises on bad input.

        ``voice``: a preset's name, or a voice prompt itself (e.g. one a user brought).

        ``after``: the previous segment of the same stream; this one is then conditioned on its
        tokens as well as on the voice preset (voice continuity across sentences).
        """
        options = options or GenerationOptions()
        if options.seed is None:
            options = options.with_seed(random.randrange(2**31))
        ids = self.tokenize(text)
        if options.max_semantic_tokens is not None:
            cap = options.max_semantic_tokens
        elif self.is_random:
            cap = random_model_semantic_tokens(text, self.consts)
        else:
            cap = self.consts.max_new_semantic_tokens
        preset = voice if isinstance(voice, VoicePrompt) else self.voice(voice)
        return Request(next(self._ids), text, ids, options, preset, cap, after=after, preset=preset)

    @torch.inference_mode()
    def generate(
        self, texts: str | list[str], voice: str | None = None, **options: Any
    ) -> list[Speech]:
        """Speak each text; all run together in the batched runtime. Blocks until done."""
        if isinstance(texts, str):
            texts = [texts]
        opts = GenerationOptions.from_dict(options)
        reqs = [self.request(t, voice, opts) for t in texts]
        for r in reqs:
            self.runtime.submit(r)
        pending = {r.id for r in reqs}
        while pending:
            for r in self.runtime.step():
                pending.discard(r.id)
        for r in reqs:
            if r.status is not Status.FINISHED:
                err = r.error
                raise err if isinstance(err, StreamEngineError) else StreamEngineError(str(err))
        return [r.speech(self.sample_rate) for r in reqs]

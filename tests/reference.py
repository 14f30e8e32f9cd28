"""transformers' BarkModel as the reference: the same stages, called the way BarkModel.generate calls them.

``BarkModel.generate`` returns only audio; to compare tokens stage by stage we call its
sub-models' ``generate`` in its order, with its configs, and check (in the tests) that the audio
equals ``BarkModel.generate``'s own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers.models.bark.generation_configuration_bark import (
    BarkCoarseGenerationConfig,
    BarkFineGenerationConfig,
    BarkSemanticGenerationConfig,
)


@dataclass
class Reference:
    semantic: np.ndarray  # (N,) without EOS
    coarse: np.ndarray  # (2, T)
    fine: np.ndarray  # (8, T)
    audio: np.ndarray  # (T * 320,)


@torch.no_grad()
def reference_generate(model, processor, text: str, voice: str | None, max_new: int) -> Reference:
    gen = model.generation_config
    sem_cfg = BarkSemanticGenerationConfig(**gen.semantic_config)
    sem_cfg.max_new_tokens = max_new
    coarse_cfg = BarkCoarseGenerationConfig(**gen.coarse_acoustics_config)
    fine_cfg = BarkFineGenerationConfig(**gen.fine_acoustics_config)
    dev = model.device
    inputs = processor(text, voice_preset=voice)
    history = inputs.get("history_prompt")
    if history is not None:
        history = {k: torch.as_tensor(v).to(dev) for k, v in history.items()}
    semantic = model.semantic.generate(
        inputs["input_ids"].to(dev),
        attention_mask=inputs["attention_mask"].to(dev),
        history_prompt=history,
        semantic_generation_config=sem_cfg,
    )
    sem_tokens = semantic[0].cpu().numpy().copy()
    coarse = model.coarse_acoustics.generate(
        semantic,
        history_prompt=history,
        semantic_generation_config=sem_cfg,
        coarse_generation_config=coarse_cfg,
        codebook_size=gen.codebook_size,
    )
    fine = model.fine_acoustics.generate(
        coarse,
        history_prompt=history,
        semantic_generation_config=sem_cfg,
        coarse_generation_config=coarse_cfg,
        fine_generation_config=fine_cfg,
        codebook_size=gen.codebook_size,
    )
    audio = model.codec_decode(fine)
    eos = sem_cfg.eos_token_id
    sem_tokens = (
        sem_tokens[: np.argmax(sem_tokens == eos)] if (sem_tokens == eos).any() else sem_tokens
    )
    coarse_codes = coarse[0].cpu().numpy().reshape(-1, 2).T - sem_cfg.semantic_vocab_size
    return Reference(
        semantic=sem_tokens,
        coarse=np.remainder(coarse_codes, gen.codebook_size),
        fine=fine[0].cpu().numpy(),
        audio=audio[0].float().cpu().numpy(),
    )


# A mixed batch for batch-invariance tests: greedy, sampling, top-k/top-p, min_eos_p, voices.
MIXED_CASES = [
    ("Hello there.", None, dict(greedy=True, max_semantic_tokens=30)),
    (
        "A longer sentence with another voice in it.",
        "v2/en_speaker_1",
        dict(seed=5, max_semantic_tokens=70),
    ),
    (
        "Sampling with top k.",
        "v2/de_speaker_0",
        dict(seed=9, top_k=50, top_p=0.9, max_semantic_tokens=45),
    ),
    (
        "Short.",
        "v2/en_speaker_2",
        dict(seed=3, text_temp=1.0, min_eos_p=0.5, max_semantic_tokens=25),
    ),
]


def run_mixed(engine) -> list:
    """MIXED_CASES through ``engine``'s runtime, two at once and two joining 5 steps later.

    Returns their speeches, in MIXED_CASES order.
    """
    from stream_engine.config import GenerationOptions

    reqs = [engine.request(t, v, GenerationOptions(**o)) for t, v, o in MIXED_CASES]
    rt = engine.runtime
    rt.submit(reqs[0])
    rt.submit(reqs[1])
    for _ in range(5):
        rt.step()
    rt.submit(reqs[2])
    rt.submit(reqs[3])
    while rt.busy:
        rt.step()
    return [r.speech(engine.sample_rate) for r in reqs]

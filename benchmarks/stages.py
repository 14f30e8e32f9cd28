"""Per-stage decode speed: our runtime vs transformers' BarkModel on the same weights, one run.

Prints a table and writes JSON. Usage:
    python benchmarks/stages.py --model random:small --tokens 64 --out benchmarks/results/cpu.json

Measures semantic and coarse decode ms/token at batch 1 (reference: the sub-model's
``generate`` with its DynamicCache, greedy) and our aggregate tokens/s at batch 1 and 8.
Also fine ms per 1024-frame window and codec ms per audio second, ours vs reference.\nNot yet measured: end-to-end RTF (see the issue).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from stream_engine import Engine


def ours_ms_per_token(model, batch: int, prompt: int, tokens: int) -> float:
    model.setup_cache(batch)
    ids = torch.randint(0, 10_000, (batch, prompt))
    with torch.inference_mode():
        model.prefill(model.embed(ids), torch.arange(batch), torch.full((batch,), prompt - 1))
        nxt = torch.zeros(batch, dtype=torch.long)
        for warm in (True, False):
            t = time.perf_counter()
            for i in range(tokens):
                pos = torch.full((batch,), prompt + i)
                nxt = model.decode(nxt, pos, prompt + i + 1).argmax(-1)
            if not warm:
                return (time.perf_counter() - t) * 1000 / tokens
    raise AssertionError


def reference_ms_per_token(hf_model, prompt: int, tokens: int) -> float:
    from transformers.generation.utils import GenerationMixin

    ids = torch.randint(0, 10_000, (1, prompt))
    with torch.inference_mode():

        def run(n):
            t = time.perf_counter()
            GenerationMixin.generate(
                hf_model, ids, max_new_tokens=n, min_new_tokens=n, do_sample=False
            )
            return time.perf_counter() - t

        run(2)
        # subtract the prefill: time(n) - time(1)
        return (run(tokens + 1) - run(1)) * 1000 / tokens


def fine_and_codec(engine) -> dict[str, float]:
    """Fine: ms per window (6 codebook passes over 1024 frames); codec: ms per audio second."""
    hf = engine.loaded.model
    codes = torch.randint(0, 1024, (1, 1024, 8))
    out = {}
    with torch.inference_mode():
        for label, fn in (
            ("fine_ours_ms_per_window", lambda cb: engine.fine_model(codes, cb)),
            ("fine_reference_ms_per_window", lambda cb: hf.fine_acoustics(cb, codes).logits),
        ):
            fn(2)
            t = time.perf_counter()
            for cb in range(2, 8):
                fn(cb)
            out[label] = (time.perf_counter() - t) * 1000
        fine = torch.randint(0, 1024, (8, 375)).numpy()  # 5 s of audio
        codec = engine.runtime.stages["codec"]
        codec.decode(fine)
        t = time.perf_counter()
        codec.decode(fine)
        out["codec_ours_ms_per_audio_s"] = (time.perf_counter() - t) * 1000 / 5
        t = time.perf_counter()
        hf.codec_decode(torch.as_tensor(fine)[None])
        out["codec_reference_ms_per_audio_s"] = (time.perf_counter() - t) * 1000 / 5
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:small")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    engine = Engine.load(args.model, device="cpu")
    hf = engine.loaded.model
    machine = f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}"
    rows = {}
    for name, ours, ref, prompt in (
        ("semantic", engine.semantic_model, hf.semantic, 257),
        ("coarse", engine.coarse_model, hf.coarse_acoustics, 400),
    ):
        r = reference_ms_per_token(ref, prompt, args.tokens)
        b1 = ours_ms_per_token(ours, 1, prompt, args.tokens)
        b8 = ours_ms_per_token(ours, 8, prompt, args.tokens)
        rows[name] = {
            "reference_ms_per_token": r,
            "ours_b1_ms_per_token": b1,
            "ours_b1_vs_reference": b1 / r,
            "ours_b8_ms_per_step": b8,
            "b8_over_b1_tokens_per_s": (8 / b8) / (1 / b1),
        }
    print(f"model {args.model} on {machine}")
    print(
        f"{'stage':10} {'ref ms/tok':>10} {'ours b1':>8} {'ratio':>6} {'ours b8/step':>12} {'b8/b1 tok/s':>11}"
    )
    for name, v in rows.items():
        print(
            f"{name:10} {v['reference_ms_per_token']:10.1f} {v['ours_b1_ms_per_token']:8.1f} "
            f"{v['ours_b1_vs_reference']:6.2f} {v['ours_b8_ms_per_step']:12.1f} {v['b8_over_b1_tokens_per_s']:11.2f}"
        )
    other = fine_and_codec(engine)
    for key, value in other.items():
        print(f"{key:32} {value:8.1f}")
    if args.out:
        with open(args.out, "w") as f:
            record = {"model": args.model, "machine": machine, "stages": rows, **other}
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()

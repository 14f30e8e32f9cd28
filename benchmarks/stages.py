"""Per-stage decode speed: our runtime vs transformers' BarkModel on the same weights, one run.

Prints a table and writes JSON. Usage:
    python benchmarks/stages.py --model random:small --tokens 64 --out benchmarks/results/cpu.json

Measures semantic and coarse decode ms/token at batch 1 (reference: the sub-model's
``generate`` with its DynamicCache, greedy) and our aggregate tokens/s at batch 1 and 8:
``--repeats`` rounds of reference, ours at batch 1, ours at batch 8, reporting medians (this
2-core machine drifts by 10-20% over minutes; every round is in the JSON).
Also fine ms per 1024-frame window and codec ms per audio second, ours vs reference, at
batch 1 and 8 (per window / per audio second of the batch). End-to-end RTF:
``benchmarks/end_to_end.py``. ``--device cuda`` synchronizes before every clock read.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from common import add_engine_args, load_engine, machine_info, machine_line

DEVICE = torch.device("cpu")  # set by main()


def clock() -> float:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
    return time.perf_counter()


def ours_ms_per_token(model, batch: int, prompt: int, tokens: int) -> float:
    model.setup_cache(batch)
    dev = DEVICE
    ids = torch.randint(0, 10_000, (batch, prompt), device=dev)
    with torch.inference_mode():
        rows, last = torch.arange(batch, device=dev), torch.full((batch,), prompt - 1, device=dev)
        model.prefill(model.embed(ids), rows, last)
        nxt = torch.zeros(batch, dtype=torch.long, device=dev)
        for warm in (True, False):
            t = clock()
            for i in range(tokens):
                pos = torch.full((batch,), prompt + i, device=dev)
                nxt = model.decode(nxt, pos, prompt + i + 1).argmax(-1) + model.head_start
            if not warm:
                return (clock() - t) * 1000 / tokens
    raise AssertionError


def reference_ms_per_token(hf_model, prompt: int, tokens: int) -> float:
    from transformers.generation.utils import GenerationMixin

    ids = torch.randint(0, 10_000, (1, prompt), device=DEVICE)
    with torch.inference_mode():

        def run(n):
            t = clock()
            GenerationMixin.generate(
                hf_model, ids, max_new_tokens=n, min_new_tokens=n, do_sample=False
            )
            return clock() - t

        run(2)
        # subtract the prefill: time(n) - time(1)
        return (run(tokens + 1) - run(1)) * 1000 / tokens


def fine_and_codec(engine, batch: int = 1) -> dict[str, float]:
    """Fine: ms per window (6 codebook passes over 1024 frames); codec: ms per audio second.

    At ``batch`` > 1: ``batch`` windows in one forward pass (ours and the reference, whose
    ``BarkFineModel.generate`` runs a batch the same way), and ``batch`` sequences of 5 s for
    the codec: ours one request at a time, as ``CodecStage`` decodes (EnCodec's LSTMs see
    padding); the reference in one ``codec_decode`` call, as ``BarkModel.generate`` does
    without ``return_output_lengths``. Figures are per window / per audio second of the batch.
    Keys: batch 1 as before (``fine_ours_ms_per_window``...), batch B with ``_bB`` added.
    """
    hf = engine.loaded.model
    tag = "" if batch == 1 else f"_b{batch}"
    codes = torch.randint(0, 1024, (batch, 1024, 8), device=DEVICE)
    out = {}
    with torch.inference_mode():
        for label, fn in (
            (f"fine_ours{tag}_ms_per_window", lambda cb: engine.fine_model(codes, cb)),
            (f"fine_reference{tag}_ms_per_window", lambda cb: hf.fine_acoustics(cb, codes).logits),
        ):
            fn(2)
            t = clock()
            for cb in range(2, 8):
                fn(cb)
            out[label] = (clock() - t) * 1000 / batch
        fine = torch.randint(0, 1024, (batch, 8, 375)).numpy()  # 5 s of audio each
        codec = engine.runtime.stages["codec"]
        codec.decode(fine[0])
        t = clock()
        for one in fine:
            codec.decode(one)
        out[f"codec_ours{tag}_ms_per_audio_s"] = (clock() - t) * 1000 / (5 * batch)
        t = clock()
        hf.codec_decode(torch.as_tensor(fine, device=DEVICE))
        out[f"codec_reference{tag}_ms_per_audio_s"] = (clock() - t) * 1000 / (5 * batch)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    add_engine_args(ap)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument(
        "--repeats", type=int, default=3, help="semantic/coarse: repeats (medians reported)"
    )
    ap.add_argument("--fine-batch", type=int, default=8, help="fine/codec batch besides 1")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    engine = load_engine(args)
    global DEVICE
    DEVICE = engine.device
    hf = engine.loaded.model
    machine = machine_info(engine)
    cmd = "benchmarks/stages.py " + " ".join(sys.argv[1:])
    rows = {}
    for name, ours, ref, prompt in (
        ("semantic", engine.semantic_model, hf.semantic, 257),
        ("coarse", engine.coarse_model, hf.coarse_acoustics, 400),
    ):
        # interleaved repeats, so that drift in the machine's speed reaches both sides; medians
        runs = [
            (
                reference_ms_per_token(ref, prompt, args.tokens),
                ours_ms_per_token(ours, 1, prompt, args.tokens),
                ours_ms_per_token(ours, 8, prompt, args.tokens),
            )
            for _ in range(args.repeats)
        ]
        r, b1, b8 = (statistics.median(col) for col in zip(*runs, strict=True))
        rows[name] = {
            "repeats_ms": [list(run) for run in runs],
            "reference_ms_per_token": r,
            "ours_b1_ms_per_token": b1,
            "ours_b1_vs_reference": b1 / r,
            "ours_b8_ms_per_step": b8,
            "b8_over_b1_tokens_per_s": (8 / b8) / (1 / b1),
        }
    print(f"model {args.model}")
    print(machine_line(machine))
    print(
        f"{'stage':10} {'ref ms/tok':>10} {'ours b1':>8} {'ratio':>6} {'ours b8/step':>12} {'b8/b1 tok/s':>11}"
    )
    for name, v in rows.items():
        print(
            f"{name:10} {v['reference_ms_per_token']:10.1f} {v['ours_b1_ms_per_token']:8.1f} "
            f"{v['ours_b1_vs_reference']:6.2f} {v['ours_b8_ms_per_step']:12.1f} {v['b8_over_b1_tokens_per_s']:11.2f}"
        )
    other = fine_and_codec(engine)
    if args.fine_batch > 1:
        other.update(fine_and_codec(engine, args.fine_batch))
    for key, value in other.items():
        print(f"{key:36} {value:8.1f}")
    print(
        f"at batch {args.fine_batch}: ms per window / per audio second of the batch; codec: ours "
        "one request at a time (CodecStage), reference one batched codec_decode call"
    )
    if args.out:
        with open(args.out, "w") as f:
            record = {
                "command": cmd,
                "model": args.model,
                "machine": machine,
                "stages": rows,
                **other,
            }
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()

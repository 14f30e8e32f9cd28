"""End-to-end real-time factor: our ``Engine.generate`` vs transformers' ``BarkModel.generate``.

Both sides run on the same weights (the engine's loaded ``BarkModel``), on the same machine, in
one run, at each batch size of ``--batch``; each batch is that many different sentences with one
voice preset. RTF = wall seconds / audio seconds (below 1 is faster than real time); per-stream
RTF = wall seconds / seconds of audio of one stream (what one listener waits for, per second).

Identical work: random weights never choose EOS, so both sides are capped at the same number of
semantic tokens per stream (ours: ``max_semantic_tokens``; reference: ``semantic_max_new_tokens``,
which ``BarkModel.generate`` forwards to the semantic model's ``generate`` as ``max_new_tokens``).
Every run checks the token and sample counts each side produced, stage by stage, and the script
exits with status 1 if they differ (e.g. a trained model that ends a sentence early).

Both sides sample with the engine's defaults (``GenerationOptions()``: text/coarse temperature 0.7,
fine 0.5, no top-k); the reference gets them as ``do_sample``/``*_temperature``/``*_top_k``
kwargs (transformers would otherwise decode greedily, with top-k 50 when sampling). The
reference's inputs come from ``BarkProcessor`` outside the timed region; ours are text.

Usage (prints a table, writes JSON):
    python benchmarks/end_to_end.py --model random:small --batch 1 8 --semantic-tokens 150
        [--repeats 3] [--warmup 1] [--out benchmarks/results/e2e-cpu-random-small.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch
from common import SENTENCES, add_engine_args, clock, load_engine, machine_info, machine_line

from stream_engine import Engine
from stream_engine.config import GenerationOptions

# transformers log lines (not Python warnings) that every batched BarkModel.generate call prints:
# the sub-models get a generation_config plus kwargs, and the coarse model no attention mask.
_KNOWN_LOG_LINES = (
    "Passing `generation_config` together with generation-related arguments",
    "The attention mask and the pad token id were not set",
    "The attention mask is not set with a batched input",
)


class _DropKnownLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_KNOWN_LOG_LINES)


def quiet_known_transformers_logs() -> None:
    for handler in logging.getLogger("transformers").handlers:
        handler.addFilter(_DropKnownLines())


def to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, Mapping):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def reference_sampling_kwargs() -> dict[str, Any]:
    """Our default sampling settings, spelled as BarkModel.generate kwargs."""
    o = GenerationOptions()
    if o.top_p is not None or o.min_eos_p is not None or o.greedy:
        raise SystemExit("update reference_sampling_kwargs: the engine's defaults changed")
    return {
        "do_sample": True,
        "semantic_temperature": o.text_temp,
        "coarse_temperature": o.coarse_temp,
        "fine_temperature": o.fine_temp,
        "semantic_top_k": o.top_k or 0,  # 0 turns transformers' top-k off (else 50)
        "coarse_top_k": o.top_k or 0,
    }


Lengths = dict[str, list[int]]  # per stream: semantic tokens, coarse/fine frames, audio samples


def run_ours(engine: Engine, texts: list[str], voice: str, tokens: int) -> tuple[float, Lengths]:
    dev = engine.device
    t0 = clock(dev)
    speech = engine.generate(texts, voice, max_semantic_tokens=tokens)
    wall = clock(dev) - t0
    lengths = {
        "semantic": [len(s.semantic) for s in speech],
        "coarse": [s.coarse.shape[1] for s in speech],
        "fine": [s.fine.shape[1] for s in speech],
        "audio": [len(s.audio) for s in speech],
    }
    return wall, lengths


class _Recorder:
    """Wraps the reference's sub-model ``generate`` calls to read their output lengths."""

    def __init__(self, hf: Any, pad: int) -> None:
        self.hf, self.pad = hf, pad
        self.semantic: list[int] = []
        self.coarse: list[int] = []
        self.fine: list[int] = []

    def _wrap(self, module: Any, record: Callable[[torch.Tensor], None]) -> None:
        original = module.generate

        def generate(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            record(out[0] if isinstance(out, tuple) else out)
            return out

        module.generate = generate

    def __enter__(self) -> _Recorder:
        # semantic: (B, N) with EOS/padding after the end; counted before the coarse model
        # overwrites the padding in place
        self._wrap(
            self.hf.semantic,
            lambda out: self.semantic.extend((out != self.pad).sum(1).tolist()),
        )
        self._wrap(
            self.hf.coarse_acoustics,
            lambda out: self.coarse.extend([out.shape[1] // 2] * out.shape[0]),
        )
        self._wrap(
            self.hf.fine_acoustics,
            lambda out: self.fine.extend([out.shape[-1]] * out.shape[0]),
        )
        return self

    def __exit__(self, *exc: object) -> None:
        for module in (self.hf.semantic, self.hf.coarse_acoustics, self.hf.fine_acoustics):
            del module.generate  # back to the class's method


def run_reference(
    engine: Engine, texts: list[str], voice: str, tokens: int, batched: bool, seed: int
) -> tuple[float, Lengths]:
    hf, processor, dev = engine.loaded.model, engine.loaded.processor, engine.device
    groups = [texts] if batched else [[t] for t in texts]
    inputs = [to_device(dict(processor(g, voice_preset=voice)), dev) for g in groups]
    kwargs = reference_sampling_kwargs()
    audio: list[int] = []
    torch.manual_seed(seed)
    with _Recorder(hf, engine.consts.semantic_pad_token) as rec:
        t0 = clock(dev)
        for inp in inputs:
            out = hf.generate(**inp, semantic_max_new_tokens=tokens, **kwargs)
            audio.extend([out.shape[-1]] * out.shape[0])
        wall = clock(dev) - t0
    lengths = {"semantic": rec.semantic, "coarse": rec.coarse, "fine": rec.fine, "audio": audio}
    return wall, lengths


class ReferenceMode:
    """Batched ``BarkModel.generate`` calls unless one fails; then one call per text."""

    def __init__(self) -> None:
        self.batched = True
        self.why = "not tried at batch > 1"

    def run(
        self, engine: Engine, texts: list[str], voice: str, tokens: int, seed: int
    ) -> tuple[float, Lengths]:
        if self.batched and len(texts) > 1:
            try:
                wall, lengths = run_reference(engine, texts, voice, tokens, True, seed)
            except Exception as e:  # a finding to report, then time the fallback
                self.batched = False
                self.why = f"batch of {len(texts)} failed: {type(e).__name__}: {e}"
                print(f"reference: {self.why}; timing sequential calls instead")
            else:
                if len(lengths["audio"]) == len(texts):
                    self.why = f"a batch of {len(texts)} texts gave {len(texts)} audios"
                    return wall, lengths
                self.batched = False
                self.why = f"a batch of {len(texts)} texts gave {len(lengths['audio'])} audios"
                print(f"reference: {self.why}; timing sequential calls instead")
        return run_reference(engine, texts, voice, tokens, len(texts) == 1, seed)

    def label(self, batch: int) -> str:
        if batch == 1:
            return "one call"
        return "batched" if self.batched else f"sequential ({batch} calls)"


def bench_batch(
    engine: Engine,
    batch: int,
    voice: str,
    tokens: int,
    repeats: int,
    warmup: int,
    reference: ReferenceMode,
) -> dict[str, Any]:
    texts = [SENTENCES[i % len(SENTENCES)] for i in range(batch)]
    for _ in range(warmup):
        run_ours(engine, texts, voice, tokens)
        reference.run(engine, texts, voice, tokens, seed=10_000)
    walls: dict[str, list[float]] = {"ours": [], "reference": []}
    lengths: dict[str, Lengths] = {}
    matches = True
    for r in range(repeats):  # interleaved, so that a slow spell of the machine hits both
        w, ours = run_ours(engine, texts, voice, tokens)
        walls["ours"].append(w)
        w, ref = reference.run(engine, texts, voice, tokens, seed=r)
        walls["reference"].append(w)
        matches &= ours == ref and all(n == tokens for n in ours["semantic"])
        lengths = {"ours": ours, "reference": ref}
    sr = engine.sample_rate
    result: dict[str, Any] = {"batch": batch, "work_matches": matches, "texts": texts}
    for side in ("ours", "reference"):
        wall = statistics.median(walls[side])
        audio_s = sum(lengths[side]["audio"]) / sr
        result[side] = {
            "wall_s": wall,
            "wall_s_all": walls[side],
            "audio_s": audio_s,
            "rtf": wall / audio_s,
            "per_stream_rtf": wall / (audio_s / batch),
            "lengths": lengths[side],
        }
    result["reference"]["mode"] = reference.label(batch)
    result["speedup"] = result["reference"]["wall_s"] / result["ours"]["wall_s"]
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_engine_args(ap)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--semantic-tokens", type=int, default=150, help="per stream; 150 = 3 s")
    ap.add_argument("--voice", default="v2/en_speaker_6")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side; median reported")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs per side and batch")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    engine = load_engine(args)
    quiet_known_transformers_logs()
    if args.voice not in engine.voices:
        raise SystemExit(f"unknown voice {args.voice!r}; available: {sorted(engine.voices)}")
    machine = machine_info(engine)
    reference = ReferenceMode()
    print(
        f"model {args.model}, {args.semantic_tokens} semantic tokens per stream, voice {args.voice}"
    )
    print(machine_line(machine))

    results = []
    for batch in args.batch:
        res = bench_batch(
            engine, batch, args.voice, args.semantic_tokens, args.repeats, args.warmup, reference
        )
        results.append(res)
        if not res["work_matches"]:
            ours, ref = res["ours"]["lengths"], res["reference"]["lengths"]
            print(f"WARNING batch {batch}: the sides did different work: ours {ours}, ref {ref}")

    print(
        f"{'batch':>5} {'ours audio s':>12} {'ref audio s':>11} {'ours wall s':>11} "
        f"{'ref wall s':>10} {'ours RTF':>8} {'ref RTF':>8} {'speedup':>7} "
        f"{'ours RTF/stream':>15} {'ref RTF/stream':>14}  reference"
    )
    for r in results:
        o, f = r["ours"], r["reference"]
        print(
            f"{r['batch']:>5} {o['audio_s']:12.2f} {f['audio_s']:11.2f} {o['wall_s']:11.2f} "
            f"{f['wall_s']:10.2f} {o['rtf']:8.3f} {f['rtf']:8.3f} {r['speedup']:7.2f} "
            f"{o['per_stream_rtf']:15.3f} {f['per_stream_rtf']:14.3f}  {f['mode']}"
        )
    print(f"reference batching: {reference.why}")
    print(
        "RTF = median wall s / audio s of the batch; per-stream RTF = wall s / audio s of one "
        "stream; speedup = reference wall / ours"
    )
    if args.out:
        record = {
            "benchmark": "end_to_end",
            "command": " ".join(sys.argv),
            "model": args.model,
            "semantic_tokens": args.semantic_tokens,
            "voice": args.voice,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "machine": machine,
            "reference_kwargs": {
                "semantic_max_new_tokens": args.semantic_tokens,
                **reference_sampling_kwargs(),
            },
            "reference_batches": {"batched": reference.batched, "check": reference.why},
            "results": results,
        }
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    return 0 if all(r["work_matches"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Where a request's time goes, stage by stage, and how much batching can save of it.

Runs the same sentences (``common.SENTENCES``, voice ``v2/en_speaker_6``, the random
model's length rule) through the runtime twice: one request at a time, then all together in
one batch. Each stage is stepped on its own, and each step is timed and filed as

* **decode**: a semantic or coarse step that only decodes (one token per request: weight-read
  bound on a CPU, so a batch shares the cost), or
* **window**: a step that runs a whole window (a semantic or coarse prefill, which Bark
  redoes for every 60-token coarse window, a fine-model pass over 1024 frames, an EnCodec
  decode): compute bound, so a batch costs about the sum of its requests.

It prints both tables and the speed-up of the batch over the requests run one by one. That
speed-up is what continuous batching can give the server at most on this machine for this work
(the load benchmark's "throughput at 4 clients / 1 client" cannot exceed it by much), and the
window share explains why.

    python benchmarks/breakdown.py --model random:small --batch 4 \\
        [--out benchmarks/results/breakdown-cpu-random-small.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from typing import Any

from common import SENTENCES, add_engine_args, clock, load_engine, machine_info, machine_line

from stream_engine import Engine
from stream_engine.config import GenerationOptions
from stream_engine.runtime.scheduler import STAGES

VOICE = "v2/en_speaker_6"


def run(engine: Engine, texts: list[str]) -> dict[str, dict[str, float]]:
    """Seconds per stage and kind (decode / window) for ``texts`` run as one batch."""
    rt = engine.runtime
    reqs = [engine.request(t, VOICE, GenerationOptions(seed=i)) for i, t in enumerate(texts)]
    for r in reqs:
        rt.submit(r)
    spent: dict[str, dict[str, float]] = defaultdict(lambda: {"decode": 0.0, "window": 0.0})
    for name in STAGES:
        stage = rt.stages[name]
        while not all(r.past(name) for r in reqs):
            rows = getattr(stage, "slots", None)
            prefill = (
                name in ("fine", "codec")
                or bool(rt.queues[name])  # requests about to be admitted: a prefill
                or any(row.prefill for _, row in (rows.items() if rows is not None else []))
            )
            t = clock(engine.device)
            rt.step([name])
            spent[name]["window" if prefill else "decode"] += clock(engine.device) - t
    for r in reqs:
        if r.error is not None:
            raise SystemExit(f"request failed: {r.error!r}")
    return {n: dict(spent[n]) for n in STAGES}


def total(table: dict[str, dict[str, float]], kind: str | None = None) -> float:
    return sum(v for s in table.values() for k, v in s.items() if kind in (None, k))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_engine_args(ap)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not 1 < args.batch <= len(SENTENCES):
        ap.error(f"--batch must be in [2, {len(SENTENCES)}]")
    engine = load_engine(args)
    info = machine_info(engine)
    print(f"model {args.model}; {machine_line(info)}", flush=True)
    texts = list(SENTENCES[: args.batch])
    run(engine, [texts[0]])  # warm-up (allocations, kernel selection), not counted

    one: dict[str, dict[str, float]] = defaultdict(lambda: {"decode": 0.0, "window": 0.0})
    t0 = time.perf_counter()
    for text in texts:
        for name, kinds in run(engine, [text]).items():
            for kind, v in kinds.items():
                one[name][kind] += v
    wall_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    batch = run(engine, texts)
    wall_batch = time.perf_counter() - t0

    print(f"\n{len(texts)} sentences, one at a time vs one batch of {len(texts)} (seconds)")
    print(f"{'stage':9} {'kind':7} {'one by one':>10} {'batch':>8} {'saved':>7}")
    for name in STAGES:
        for kind in ("decode", "window"):
            a, b = one[name][kind], batch[name][kind]
            if a or b:
                print(f"{name:9} {kind:7} {a:10.1f} {b:8.1f} {a / b if b else 0:6.2f}x")
    for kind in ("decode", "window"):
        a, b = total(one, kind), total(batch, kind)
        print(f"{'all':9} {kind:7} {a:10.1f} {b:8.1f} {a / b:6.2f}x")
    a, b = total(one), total(batch)
    window_share = total(one, "window") / a
    print(f"{'all':9} {'':7} {a:10.1f} {b:8.1f} {a / b:6.2f}x")
    print(
        f"\nwindow work is {window_share:.0%} of the one-by-one time; the batch of {len(texts)} "
        f"gives {a / b:.2f}x the throughput of one request at a time (wall {wall_one:.1f} s vs "
        f"{wall_batch:.1f} s)"
    )
    if args.out:
        record: dict[str, Any] = {
            "benchmark": "breakdown",
            "command": "benchmarks/breakdown.py " + " ".join(sys.argv[1:]),
            "model": args.model,
            "machine": info,
            "texts": texts,
            "voice": VOICE,
            "one_by_one_s": {n: dict(one[n]) for n in STAGES},
            "batch_s": batch,
            "window_share_one_by_one": window_share,
            "batch_speedup": a / b,
            "wall_one_by_one_s": wall_one,
            "wall_batch_s": wall_batch,
        }
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()

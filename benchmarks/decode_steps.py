"""What a decode step costs with more rows, and why: weights read once, KV caches read per row.

A decode step of the semantic or coarse model reads every weight once, whatever the number of
rows (requests) it carries, and each row's own KV cache: 2 x layers x positions x n_embd
floats. At bark-small's 12 layers and 768 wide, that is about 66 MB per row at 900 positions,
against 340 MB of weights. So the gain from batching decode steps shrinks as the caches grow.
This times the engine's own decode step (``CausalGPT.decode``, with the decode kernel the
engine chose) at ``--rows`` rows and ``--kv`` cached positions, in interleaved rounds, and
prints ms per step, the ratio to one row at the same length, the bytes a step must read
(weights + caches) and the GB/s that implies. On a GPU (``--device cuda``) the steps are
eager and timed to the end of the device's work; ``gpu_check.py`` times them beside CUDA
graph replays of the same step.

    python benchmarks/decode_steps.py --model random:small --stage coarse
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
from common import add_engine_args, clock, load_engine, machine_info, machine_line

from stream_engine.bark.model import CausalGPT


def step_seconds(model: CausalGPT, rows: int, kv: int, steps: int) -> float:
    """Seconds per eager decode step at ``rows`` rows and ``kv`` cached positions (on a GPU,
    the device's work waited for, so the steps are timed, not their launches)."""
    dev = model.lm_head.weight.device
    ids = torch.zeros(rows, dtype=torch.long, device=dev)
    pos = torch.full((rows,), kv - 1, device=dev)
    with torch.inference_mode():
        model.decode(ids, pos, kv)  # warm
        t = clock(dev)
        for _ in range(steps):
            model.decode(ids, pos, kv)
        return (clock(dev) - t) / steps


def weight_bytes(model: CausalGPT) -> int:
    """Bytes of weights one decode step reads: the blocks, the final norm, the head's used rows."""
    blocks = sum(p.numel() * p.element_size() for p in model.layers.parameters())
    norm = sum(p.numel() * p.element_size() for p in model.layernorm_final.parameters())
    head = model.lm_head.weight
    used = head.size(0) - model.head_start
    return blocks + norm + used * head.size(1) * head.element_size()


def cache_bytes(model: CausalGPT, rows: int, kv: int) -> int:
    cfg = model.cfg
    itemsize = model.lm_head.weight.element_size()
    return 2 * cfg.n_layer * rows * kv * cfg.n_embd * itemsize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_engine_args(ap)
    ap.add_argument("--stage", choices=("semantic", "coarse"), default="coarse")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--kv", type=int, nargs="+", default=[64, 448, 896])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians printed")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    engine = load_engine(args)
    # the engine's models as its stages set them up (the coarse head restricted to its ids)
    model = engine.semantic_model if args.stage == "semantic" else engine.coarse_model
    if max(args.kv) > model.cfg.block_size or min(args.kv) < 1 or min(args.rows) < 1:
        raise SystemExit(f"--kv must be in [1, {model.cfg.block_size}], --rows positive")
    model.setup_cache(max(args.rows))
    machine = machine_info(engine)
    print(f"model {args.model}, {args.stage} decode steps")
    print(machine_line(machine))

    cells = [(r, kv) for kv in args.kv for r in args.rows]
    runs: dict[tuple[int, int], list[float]] = {c: [] for c in cells}
    for _ in range(args.repeats):  # interleaved, so that drift reaches every cell alike
        for r, kv in cells:
            runs[r, kv].append(step_seconds(model, r, kv, args.steps))

    weights = weight_bytes(model)
    print(f"weights read per step: {weights / 1e6:.0f} MB")
    print(f"{'kv':>5} {'rows':>4} {'ms/step':>8} {'x 1 row':>7} {'MB read':>8} {'GB/s':>6}")
    table = []
    for kv in args.kv:
        one = statistics.median(runs[min(args.rows), kv])
        for r in args.rows:
            s = statistics.median(runs[r, kv])
            read = weights + cache_bytes(model, r, kv)
            row = {
                "kv": kv,
                "rows": r,
                "ms_per_step": s * 1e3,
                "vs_fewest_rows": s / one,
                "mb_read": read / 1e6,
                "gb_per_s": read / s / 1e9,
                "repeats_ms": [x * 1e3 for x in runs[r, kv]],
            }
            table.append(row)
            print(
                f"{kv:5d} {r:4d} {row['ms_per_step']:8.1f} {row['vs_fewest_rows']:7.2f} "
                f"{row['mb_read']:8.0f} {row['gb_per_s']:6.1f}"
            )
    if args.out:
        record = {
            "benchmark": "decode_steps",
            "command": " ".join(sys.argv),
            "model": args.model,
            "stage": args.stage,
            "machine": machine,
            "weights_mb": weights / 1e6,
            "steps": args.steps,
            "repeats": args.repeats,
            "results": table,
        }
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()

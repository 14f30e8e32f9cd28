"""Memory bandwidth of a decode step's linears on the CPU: the default GEMM vs packed oneDNN.

For each weight shape of bark-small's causal models and batch 1, 4 and 8, times
``F.linear`` (MKL) and oneDNN's linear on a weight reordered once
(``stream_engine.bark.model.Linear.pack``, what ``EngineConfig.cpu_packed_decode`` uses), over
enough copies of the weight (~400 MB) that nothing stays in cache, and prints GB/s of weights
read. Also prints a plain read (``x.sum()`` over 400 MB) as the machine's bandwidth.

    python benchmarks/linear_kernels.py
"""

from __future__ import annotations

import time

import torch

from stream_engine.bark.model import Linear, can_pack

SHAPES = ((2304, 768), (768, 768), (3072, 768), (768, 3072), (10048, 768))  # (out, in)


def seconds(fn, reps: int = 3) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(100_000_000)
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}")
    print(f"plain read (x.sum over 400 MB): {0.4 / seconds(x.sum):.1f} GB/s")
    del x
    if not can_pack(torch.zeros(1)):
        raise SystemExit("this torch build has no oneDNN linear")
    print(f"{'weight':>11} {'batch':>5} {'F.linear GB/s':>14} {'packed GB/s':>12}")
    with torch.inference_mode():
        for out_f, in_f in SHAPES:
            n = max(1, int(400e6 // (out_f * in_f * 4)))
            layers = [Linear(in_f, out_f) for _ in range(n)]
            nbytes = n * out_f * in_f * 4
            for batch in (1, 4, 8):
                inp = torch.randn(batch, 1, in_f)
                for layer in layers:
                    layer.unpack()
                plain = seconds(lambda: [layer(inp) for layer in layers])  # noqa: B023
                for layer in layers:
                    layer.pack(batch)
                packed = seconds(lambda: [layer(inp) for layer in layers])  # noqa: B023
                print(
                    f"{out_f:>5}x{in_f:<5} {batch:5d} {nbytes / plain / 1e9:14.1f} "
                    f"{nbytes / packed / 1e9:12.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()

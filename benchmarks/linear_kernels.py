"""Memory bandwidth of a decode step's linears on the CPU: MKL vs packed oneDNN vs AVX2.

For each weight shape of bark-small's causal models and batch 1, 4 and 8, times ``F.linear``
(MKL), oneDNN's linear on a weight reordered once (``Linear.pack``) and the AVX2 kernel of
``stream_engine.bark.cpu_kernels`` (what ``EngineConfig.cpu_decode_kernel`` chooses between),
over enough copies of the weight (~400 MB) that nothing stays in cache, and prints GB/s of
weights read. Rounds are interleaved (the three kernels in turn) and the median of
``--repeats`` is printed. Also prints a plain read (``x.sum()`` over 400 MB) as the
machine's bandwidth.

    python benchmarks/linear_kernels.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from stream_engine.bark import cpu_kernels
from stream_engine.bark.model import Linear, can_pack

SHAPES = ((2304, 768), (768, 768), (3072, 768), (768, 3072), (10048, 768))  # (out, in)


def seconds(fn, reps: int = 3) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def sweep(kernel, x, layers):
    """A call of ``kernel(x, layer)`` over every layer."""

    def run() -> None:
        for layer in layers:
            kernel(x, layer)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(100_000_000)
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}")
    print(f"plain read (x.sum over 400 MB): {0.4 / seconds(x.sum):.1f} GB/s")
    del x
    if not can_pack(torch.zeros(1)):
        raise SystemExit("this torch build has no oneDNN linear")
    avx2, why = cpu_kernels.build()
    if avx2 is None:
        raise SystemExit(f"the AVX2 kernel cannot be built here: {why}")
    print(f"{'weight':>11} {'batch':>5} {'MKL GB/s':>9} {'oneDNN GB/s':>12} {'AVX2 GB/s':>10}")
    with torch.inference_mode():
        for out_f, in_f in SHAPES:
            n = max(1, int(400e6 // (out_f * in_f * 4)))
            layers = [Linear(in_f, out_f) for _ in range(n)]
            nbytes = n * out_f * in_f * 4
            for batch in (1, 4, 8):
                inp = torch.randn(batch, 1, in_f)
                for layer in layers:
                    layer.pack(batch)
                kernels = {
                    "mkl": lambda x, layer: torch.nn.functional.linear(x, layer.weight, layer.bias),
                    "onednn": lambda x, layer: layer(x),
                    "avx2": lambda x, layer: avx2.linear(x, layer.weight, layer.bias, False),
                }
                runs: dict[str, list[float]] = {name: [] for name in kernels}
                for _ in range(args.repeats):
                    for name, kernel in kernels.items():
                        runs[name].append(seconds(sweep(kernel, inp, layers)))
                gbs = {k: nbytes / statistics.median(v) / 1e9 for k, v in runs.items()}
                print(
                    f"{out_f:>5}x{in_f:<5} {batch:5d} {gbs['mkl']:9.1f} {gbs['onednn']:12.1f} "
                    f"{gbs['avx2']:10.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()

"""What the benchmark scripts share: the engine options, loading, the machine line, the clock.

Every script names the model, device, dtype and CPU decode kernel the same way
(:func:`add_engine_args`, :func:`load_engine`) and records the machine it ran on the same way
(:func:`machine_info`), so that results from different scripts can be compared.
"""

from __future__ import annotations

import argparse
import platform
import time
from typing import Any

import torch
import transformers

from stream_engine import Engine
from stream_engine.config import CPU_DECODE_KERNELS, EngineConfig

# Eight different sentences of realistic length (2-5 s of speech each); batches and paragraphs
# cycle them.
SENTENCES = (
    "The train to the airport leaves every fifteen minutes from platform four.",
    "Please remember to water the plants while I am away this weekend.",
    "Scientists have found a new species of frog in the rainforest of Peru.",
    "Could you send me the report before the meeting tomorrow morning?",
    "The museum is closed on Mondays, but it stays open late on Fridays.",
    "After the storm passed, the whole village came out to clear the roads.",
    "My grandmother taught me how to bake bread when I was seven years old.",
    "Turn left at the next corner and the library will be on your right.",
)


def add_engine_args(ap: argparse.ArgumentParser, model: str = "random:small") -> None:
    """``--model``, ``--device``, ``--dtype`` and ``--decode-kernel``, for :func:`load_engine`."""
    ap.add_argument("--model", default=model)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: float32 on cpu, float16 on cuda")
    ap.add_argument(
        "--decode-kernel",
        default="auto",
        choices=CPU_DECODE_KERNELS,
        help="EngineConfig.cpu_decode_kernel (CPU float32)",
    )


def load_engine(args: argparse.Namespace, **config: Any) -> Engine:
    """The engine :func:`add_engine_args` describes; ``config``: more ``EngineConfig`` fields."""
    torch.manual_seed(0)
    return Engine.load(
        args.model,
        device=args.device,
        dtype=args.dtype,
        config=EngineConfig(cpu_decode_kernel=args.decode_kernel, **config),
    )


def machine_info(engine: Engine) -> dict[str, Any]:
    """The CPU (or GPU), threads, versions, device, dtype and decode kernel of this run."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    dtype = next(engine.loaded.model.parameters()).dtype
    info = {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(engine.device),
        "dtype": str(dtype).removeprefix("torch."),
        "decode_kernel": engine.decode_kernel,
    }
    if engine.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(engine.device)
    return info


def machine_line(info: dict[str, Any]) -> str:
    return "machine " + ", ".join(f"{k} {v}" for k, v in info.items())


def clock(device: torch.device) -> float:
    """``time.perf_counter()`` after the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()

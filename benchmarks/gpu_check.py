"""The GPU check: is the engine right on a CUDA device, and how fast is it? No pytest needed.

Run it first on a lent GPU machine (``benchmarks/gpu_wheels.sh`` prints the command that
carries what the machine lacks). It runs in parts, in this order; each part has its own time
budget (a part over it, or one that raises, is recorded with its error and the next part
runs), and the whole run has one deadline:

=============  ===========  ===========  ==========================================================
part           full: s      --quick: s   what
               (budget)     (budget)
=============  ===========  ===========  ==========================================================
environment    ~10 (30)     ~10 (30)     imports (naming what is missing and the wheels to carry),
                                         the device, versions
correctness    ~50 (90)     ~40 (70)     random:small float32: CUDA graphs against eager decoding
                                         (same tokens at every stage, the mixed batch of
                                         tests/reference.py); greedy tokens against transformers'
                                         BarkModel on the same weights and device (2 texts; quick:
                                         1); float16 finite and close to float32; the Pipeline's
                                         worker threads against Engine.generate
decode-small   ~30 (70)     ~20 (45)     random:small float16: a whole decode step of the
                                         engine (forward and sampling: the stage steps of
                                         runtime/trace.py) at batch 1, 8 and 32, graphs and
                                         eager (quick: graphs); the model's decode forward alone,
                                         eager and as a CUDA graph replay, and the batch-bucket
                                         question: a replay at each exact batch vs at its bucket
e2e-small      ~40 (70)     ~20 (40)     end_to_end.py's runs: RTF ours vs BarkModel.generate,
                                         same weights, batch 1 and 8 (quick: 1), 100 semantic
                                         tokens (2 s of audio) per stream, a warm-up, then the
                                         median of 2 timed runs (quick: 1)
server-small   ~40 (75)     ~30 (50)     a Server in this process, load.py's clients (two
                                         sentences each, word by word): TTFA p50/p95 and streams
                                         faster than real time at 1, 8 and 32 clients (quick: 1
                                         and 32), and with early audio at 1 (full only)
e2e-large      ~60 (80)     -            random:large float16 (its load is most of the time):
                                         RTF ours vs BarkModel.generate, batch 1, a warm-up, then
                                         one timed run
decode-large   ~25 (55)     -            random:large float16: decode steps as for decode-small,
                                         graphs only
=============  ===========  ===========  ==========================================================

The whole run stops starting parts at 8 minutes (``--quick``: 4); the expected times above are
estimates for an H100/H200 until a run records its own (``seconds`` of each part in the JSON).

``--dry-run`` runs the same code on the CPU with ``random:tiny`` in float32 (the float16 check
in float16 on the CPU), with small sizes and one torch thread, in 20-40 s on 2 cores (3 minutes
at most; the first engine loaded on a new machine also builds the CPU decode kernels, 30-50 s):
what needs CUDA (graph replays) is recorded as ``skipped: no CUDA``, and the graphs-vs-eager
check compares two eager engines through the same code. ``tests/test_benchmarks.py`` runs it,
so the program cannot rot between GPU sessions.

Correctness tolerances: tokens are compared exactly (semantic, coarse and fine codes); audio
within 1e-4 against transformers (tests/test_exactness.py's bound) and 1e-5 between engines
that decode the same tokens; float16 against float32, teacher-forced on the same 300 random
ids (a 257-token prefill, then 43 decode steps), per stage: cosine similarity of every
position's logits >= 0.999, largest difference <= 5% of the largest float32 logit, the same
argmax at >= 90% of positions (on a CPU, random:small: 0.99997, 0.6%, 98%); float16 audio
all finite and codes in range.

Goals (issue 14, H100/H200, bark-small float16; not judged in a dry run or on other models):
a decode step <= 0.5 ms at batch 1 with graphs (the engine's semantic step); RTF <= 0.1 at
batch 1; TTFA p50 <= 150 ms (1 client); >= 32 concurrent streams faster than real time;
bark-large RTF <= 0.2 at batch 1. Each is printed PASS, FAIL or not measured.

Output: one JSON file (``--out``; default ``$OUT/gpu-check-<gpu>.json`` when ``$OUT`` is set,
else ``benchmarks/results/gpu-check-<gpu>.json``), rewritten after every part, so a run that
is cut off still leaves what it measured; a summary on stdout.

Engines load with ``strict_gpu`` (a load-time GPU check that fails raises instead of falling
back); a strict load that fails is recorded and the engine is loaded again without it, so that
the later parts measure what the fallback does.

Exit status: 1 when a correctness check or a strict load failed, or a part raised or ran out
of time; 2 when the environment check failed (nothing else ran); else 0 (a part skipped, e.g.
the server's without its wheels, is no failure). Goals do not change it.

    python3 benchmarks/gpu_check.py [--quick | --dry-run] [--parts NAME ...] [--out FILE]
        [--budget-scale X]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stream_engine import Engine

ROOT = Path(__file__).resolve().parents[1]
# the package from this working tree, and tests/reference.py (the transformers reference)
sys.path[1:1] = [str(ROOT), str(ROOT / "tests")]

VOICE = "v2/en_speaker_6"
PARTS = ("correctness", "decode-small", "e2e-small", "server-small", "e2e-large", "decode-large")

# what each part imports; a missing module is named with the wheel that provides it
CORE_MODULES = (
    "numpy",
    "torch",
    "transformers",
    "stream_engine.engine",
    "stream_engine.runtime.pipeline",
    "stream_engine.runtime.trace",
    "common",
    "decode_steps",
    "end_to_end",
    "reference",
)
SERVER_MODULES = (
    "websockets",
    "starlette",
    "uvicorn",
    "av",
    "httpx",
    "stream_engine.server.app",
    "stream_engine.client",
    "load",
)
WHEELS = {"prometheus_client": "prometheus-client", "pytest_asyncio": "pytest-asyncio"}

# float16 against float32, teacher-forced (see the module's docstring)
HALF_MIN_COSINE = 0.999
HALF_MAX_RELATIVE_DIFF = 0.05
HALF_MIN_ARGMAX_AGREEMENT = 0.9
AUDIO_TOL_REFERENCE = 1e-4  # tests/test_exactness.py's bound
AUDIO_TOL_SAME_TOKENS = 1e-5


@dataclass(frozen=True)
class Plan:
    """What a mode runs, and how much of it."""

    mode: str
    device: str
    small: str  # the model of the *-small parts and of the correctness checks
    large: str
    dtype: str  # of the measurements (the float16 check runs in float16 in every mode)
    parts: tuple[str, ...]
    budgets: dict[str, float]  # seconds per part
    total_s: float  # no part starts after this
    reference_cases: tuple[tuple[str, str | None, int], ...]  # text, voice, semantic tokens
    pipeline_tokens: int
    slots: int  # semantic and coarse slots of the measured engines
    batches: tuple[int, ...]  # decode steps timed at these batches
    step_tokens: int  # semantic tokens per stream while the engine's steps are timed
    eager_engine_steps: bool  # time the eager engine's steps too (small only)
    model_kv: int  # cached positions of the model-level decode timings
    model_steps: int
    graph_rows: tuple[int, ...]  # exact batches of the bucket question
    e2e_batches: tuple[int, ...]
    e2e_large_batches: tuple[int, ...]
    e2e_tokens: int
    e2e_repeats: int
    e2e_large_repeats: int
    e2e_warmup: int
    clients: tuple[int, ...]
    sentences: int
    short: bool  # load.py's short sentences
    early_audio: bool  # a 1-client round with early audio too
    # torch's CPU threads (None: its default). The dry run checks code, not speed: with one
    # thread a busy CPU slows it in proportion, where two threads that wait for each other at
    # every kernel stall for whole scheduler slices (seconds instead of 0.1 s per request)
    threads: int | None = None


FULL = Plan(
    mode="full",
    device="cuda",
    small="random:small",
    large="random:large",
    dtype="float16",
    parts=PARTS,
    budgets={
        "correctness": 90,
        "decode-small": 70,
        "e2e-small": 70,
        "server-small": 75,
        "e2e-large": 80,
        "decode-large": 55,
    },
    total_s=480,
    reference_cases=(
        ("Hello there, how are you today?", None, 40),
        ("A second sentence, with a voice this time.", "v2/en_speaker_1", 100),
    ),
    pipeline_tokens=60,
    slots=32,
    batches=(1, 8, 32),
    step_tokens=64,
    eager_engine_steps=True,
    model_kv=512,
    model_steps=50,
    graph_rows=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32),
    e2e_batches=(1, 8),
    e2e_large_batches=(1,),
    e2e_tokens=100,
    e2e_repeats=2,
    e2e_large_repeats=1,
    e2e_warmup=1,
    clients=(1, 8, 32),
    sentences=2,
    short=False,
    early_audio=True,
)
QUICK = Plan(
    **{
        **FULL.__dict__,
        "mode": "quick",
        "parts": ("correctness", "decode-small", "e2e-small", "server-small"),
        "budgets": {"correctness": 70, "decode-small": 45, "e2e-small": 40, "server-small": 50},
        "total_s": 240,
        "reference_cases": FULL.reference_cases[:1],
        "eager_engine_steps": False,
        "e2e_batches": (1,),
        "e2e_repeats": 1,
        "clients": (1, 32),
        "early_audio": False,
    }
)
DRY_RUN = Plan(
    mode="dry-run",
    device="cpu",
    small="random:tiny",
    large="random:tiny",
    dtype="float32",
    parts=PARTS,
    # correctness loads the first engine: on a new machine that builds the CPU decode kernels
    budgets=dict.fromkeys(PARTS, 60) | {"correctness": 120},
    total_s=180,
    reference_cases=(
        ("Hello there, how are you today?", None, 30),
        ("A second sentence, with a voice this time.", "v2/en_speaker_1", 40),
    ),
    pipeline_tokens=20,
    slots=4,
    batches=(1, 4),
    step_tokens=16,
    eager_engine_steps=True,
    model_kv=64,
    model_steps=3,
    graph_rows=(1, 2, 3, 4),
    e2e_batches=(1,),
    e2e_large_batches=(1,),
    e2e_tokens=12,
    e2e_repeats=1,
    e2e_large_repeats=1,
    e2e_warmup=0,
    clients=(1, 2),
    sentences=1,
    short=True,
    early_audio=True,
    threads=1,
)


class PartTimeout(BaseException):
    """A part ran past its budget. A BaseException, so that no ``except Exception`` of the code
    under test takes it for its own failure."""


class Skip(Exception):
    """A part cannot run here (why in the message)."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`PartTimeout` in the main thread after ``seconds`` (Python code resumes
    between bytecodes: a CUDA call finishes first)."""

    def on_alarm(signum: int, frame: Any) -> None:
        raise PartTimeout(f"over its budget of {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def jsonable(x: Any) -> Any:
    """``json.dump``'s fallback: numpy scalars and arrays as numbers and lists, else str."""
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


@dataclass
class Check:
    """The run's state: the plan, the loaded engines, the record that becomes the JSON."""

    plan: Plan
    out: Path
    started: float = field(default_factory=time.perf_counter)
    record: dict[str, Any] = field(default_factory=dict)
    engines: dict[tuple[Any, ...], Engine] = field(default_factory=dict)
    server_missing: list[str] = field(default_factory=list)
    mixed_runs: dict[str, list[Any]] = field(default_factory=dict)  # speeches by engine label

    @property
    def cuda(self) -> bool:
        return self.plan.device == "cuda"

    def say(self, *parts: Any) -> None:
        print(f"[{time.perf_counter() - self.started:6.1f} s]", *parts, flush=True)

    def save(self) -> None:
        self.record["wall_s"] = time.perf_counter() - self.started
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record, indent=1, default=jsonable))
        tmp.replace(self.out)

    def engine(self, model: str, dtype: str, graphs: bool, slots: int | None = None) -> Engine:
        """The engine of these settings, loaded once, with ``strict_gpu`` (a load-time check
        that fails raises instead of falling back). A strict load that fails is recorded (the
        run then exits with status 1) and the engine is loaded again without ``strict_gpu``,
        so that the parts after it still measure what the fallback does."""
        key = (model, dtype, graphs, slots)
        if key not in self.engines:
            import dataclasses

            import torch

            from stream_engine import Engine, EngineConfig

            sizes = {"semantic_slots": slots, "coarse_slots": slots} if slots else {}
            config = EngineConfig(cuda_graphs=graphs, strict_gpu=True, **sizes)
            name = (
                f"{model} {dtype} {'graphs' if graphs else 'eager'}, {config.semantic_slots} slots"
            )
            entry: dict[str, Any] = {
                "model": model,
                "dtype": dtype,
                "cuda_graphs": graphs,
                "semantic_slots": config.semantic_slots,
                "coarse_slots": config.coarse_slots,
            }
            self.record["engines"][name] = entry
            torch.manual_seed(0)
            t = time.perf_counter()
            try:
                engine = Engine.load(model, device=self.plan.device, dtype=dtype, config=config)
            except Exception as e:
                entry["strict_load_error"] = f"{type(e).__name__}: {e}"
                self.say(f"FAIL strict load of {name}: {entry['strict_load_error']}")
                config = dataclasses.replace(config, strict_gpu=False)
                engine = Engine.load(model, device=self.plan.device, dtype=dtype, config=config)
            entry |= {"load_s": time.perf_counter() - t, "decode_mode": engine.decode_mode()}
            self.say(f"loaded {name} in {entry['load_s']:.1f} s: {engine.decode_mode()}")
            self.engines[key] = engine
        return self.engines[key]

    def drop_engines(self, dtype: str) -> None:
        """Free the engines of ``dtype`` (device memory for the next parts)."""
        for key in [k for k in self.engines if k[1] == dtype]:
            del self.engines[key]
        if self.cuda:
            import torch

            torch.cuda.empty_cache()


# -- environment ------------------------------------------------------------------------------


def try_imports(modules: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    """Import each module; the wheels missing (by distribution name) and every error."""
    missing: list[str] = []
    errors: dict[str, str] = {}
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            errors[name] = f"{type(e).__name__}: {e}"
            top = (getattr(e, "name", None) or "").split(".")[0]
            if isinstance(e, ModuleNotFoundError) and top and top not in ("stream_engine",):
                wheel = WHEELS.get(top, top.replace("_", "-"))
                if wheel not in missing:
                    missing.append(wheel)
        except Exception as e:  # e.g. a compiled module built for another ABI
            errors[name] = f"{type(e).__name__}: {e}"
    return missing, errors


def gpu_slug(name: str) -> str:
    """'NVIDIA H200' -> 'h200', for file names."""
    words = name.lower().replace("nvidia", "").split()
    return re.sub(r"[^a-z0-9]+", "-", words[0]) if words else "gpu"


def check_environment(check: Check) -> bool:
    """Imports, the device and versions, in the record; False when the check cannot run."""
    t = time.perf_counter()
    env: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    check.record["environment"] = env
    missing, errors = try_imports(CORE_MODULES)
    server_missing, server_errors = try_imports(SERVER_MODULES)
    env |= {"import_errors": errors | server_errors, "missing_wheels": missing}
    env["server_missing_wheels"] = check.server_missing = server_missing
    if server_errors and not server_missing:  # imports that fail for another reason
        check.server_missing = [f"{m} ({e})" for m, e in server_errors.items()]
    ok = not errors
    if errors:
        for name, err in errors.items():
            print(f"MISSING {name}: {err}")
        if missing:
            print(f"carry these wheels (benchmarks/gpu_wheels.sh, here): {' '.join(missing)}")
    if server_missing or server_errors:
        print(
            "the server part will be skipped: "
            + ", ".join(check.server_missing or server_errors)
            + (f" (carry: {' '.join(server_missing)})" if server_missing else "")
        )
    try:
        import torch

        env |= {
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(),
            "threads": torch.get_num_threads(),
        }
        import numpy
        import transformers

        env |= {"transformers": transformers.__version__, "numpy": numpy.__version__}
    except ImportError:
        pass
    if ok and check.cuda:
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device: this check needs one (--dry-run runs it on the CPU)")
            ok = False
        else:
            props = torch.cuda.get_device_properties(0)
            torch.zeros(1, device="cuda").add_(1)  # the device answers
            env |= {
                "gpu": props.name,
                "capability": f"{props.major}.{props.minor}",
                "multiprocessors": props.multi_processor_count,
                "memory_gib": props.total_memory / 2**30,
                "cudnn": torch.backends.cudnn.version(),
                "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            }
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        env["commit"] = commit or None
    env["seconds"] = time.perf_counter() - t
    check.say(
        "environment:",
        ", ".join(
            f"{k} {env[k]}"
            for k in ("python", "torch", "torch_cuda", "transformers", "gpu")
            if env.get(k)
        ),
    )
    return ok


# -- correctness ------------------------------------------------------------------------------


def compare(ours: Any, want: Any, audio_tol: float) -> dict[str, Any]:
    """Two results with ``semantic``, ``coarse``, ``fine`` and ``audio``: equal tokens at each
    stage, audio within ``audio_tol``. Where a stage's tokens differ, the first index that does."""
    import numpy as np

    row: dict[str, Any] = {"tokens_equal": {}, "first_difference": {}}
    for stage in ("semantic", "coarse", "fine"):
        a, b = np.asarray(getattr(ours, stage)), np.asarray(getattr(want, stage))
        equal = a.shape == b.shape and bool(np.array_equal(a, b))
        row["tokens_equal"][stage] = equal
        if not equal:  # the first step (token, or frame) where they differ
            a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
            n = min(a2.shape[1], b2.shape[1])
            index = None
            if a2.shape[0] == b2.shape[0]:
                diff = np.nonzero((a2[:, :n] != b2[:, :n]).any(0))[0]
                index = int(diff[0]) if len(diff) else n
            row["first_difference"][stage] = {
                "shapes": [list(a.shape), list(b.shape)],
                "index": index,
            }
    a, b = np.asarray(ours.audio), np.asarray(want.audio)
    row["audio_max_diff"] = float(np.abs(a - b).max()) if a.shape == b.shape else None
    row["audio_tol"] = audio_tol
    row["passed"] = all(row["tokens_equal"].values()) and (
        row["audio_max_diff"] is not None and row["audio_max_diff"] <= audio_tol
    )
    if not row["first_difference"]:
        del row["first_difference"]
    return row


def mixed(check: Check, engine: Engine, label: str) -> list[Any]:
    """tests/reference.py's mixed batch (greedy, sampled, top-k/top-p, min_eos_p, voices; two
    requests joining five steps after the first two) on ``engine``, once per engine."""
    import torch
    from reference import run_mixed

    if label not in check.mixed_runs:
        with torch.inference_mode():
            check.mixed_runs[label] = run_mixed(engine)
    return check.mixed_runs[label]


def graphs_on(engine: Engine) -> bool:
    """Whether both decode stages replay CUDA graphs (``cuda_graphs``: the stages' names)."""
    return engine.decode_mode()["cuda_graphs"] == "semantic,coarse"


def check_graphs_vs_eager(check: Check, dtype: str) -> dict[str, Any]:
    p = check.plan
    slots = p.slots if dtype != "float32" else None
    on = check.engine(p.small, dtype, True, slots)
    off = check.engine(p.small, dtype, False, slots)
    result: dict[str, Any] = {
        "dtype": dtype,
        "decode_mode": {"graphs": on.decode_mode(), "eager": off.decode_mode()},
    }
    if not check.cuda:
        result["note"] = "no CUDA: both engines decode eagerly; the same code compares them"
    elif not graphs_on(on):
        result |= {"passed": False, "why": "the graphs engine does not decode with CUDA graphs"}
        return result
    a, b = mixed(check, on, f"{dtype}-graphs"), mixed(check, off, f"{dtype}-eager")
    rows = [compare(x, y, AUDIO_TOL_SAME_TOKENS) for x, y in zip(a, b, strict=True)]
    return result | {"cases": rows, "passed": all(r["passed"] for r in rows)}


def check_reference(check: Check) -> dict[str, Any]:
    from reference import reference_generate

    engine = check.engine(check.plan.small, "float32", True)
    rows = []
    for text, voice, n in check.plan.reference_cases:
        ref = reference_generate(engine.loaded.model, engine.loaded.processor, text, voice, n)
        ours = engine.generate(text, voice=voice, greedy=True, max_semantic_tokens=n)[0]
        rows.append(
            {"text": text, "voice": voice, "semantic_tokens": n}
            | compare(ours, ref, AUDIO_TOL_REFERENCE)
        )
    return {"cases": rows, "passed": all(r["passed"] for r in rows)}


def check_half_generates(check: Check) -> dict[str, Any]:
    """float16 through the whole engine (graphs): audio finite, codes in range; and how many
    of the float32 run's greedy semantic tokens it repeats before the first difference."""
    import numpy as np

    p = check.plan
    half = mixed(check, check.engine(p.small, "float16", True, p.slots), "float16-graphs")
    full = mixed(check, check.engine(p.small, "float32", True), "float32-graphs")
    rows = []
    for h, f in zip(half, full, strict=True):
        frames = h.coarse.shape[1]
        ok = (
            len(h.semantic) > 0
            and h.fine.shape == (8, frames)
            and h.audio.shape == (frames * 320,)
            and bool(np.isfinite(h.audio).all())
            and int(h.fine.min()) >= 0
            and int(h.fine.max()) < 1024
        )
        n = min(len(h.semantic), len(f.semantic))
        same = np.asarray(h.semantic[:n]) == np.asarray(f.semantic[:n])
        prefix = int(np.argmin(same)) if not same.all() else n
        rows.append({"passed": ok, "frames": frames, "semantic_same_as_float32_prefix": prefix})
    return {"cases": rows, "passed": all(r["passed"] for r in rows)}


def check_half_logits(check: Check) -> dict[str, Any]:
    """Teacher-forced: the float16 engine's prefill and decode steps against the float32 model's
    whole-sequence forward on the same ids (the float16 engine is eager; its caches are
    resized for this and restored)."""
    import torch

    p = check.plan
    ref_engine = check.engine(p.small, "float32", False)
    engine = check.engine(p.small, "float16", False, p.slots)
    dev = engine.device
    result: dict[str, Any] = {
        "min_cosine": HALF_MIN_COSINE,
        "max_relative_diff": HALF_MAX_RELATIVE_DIFF,
        "min_argmax_agreement": HALF_MIN_ARGMAX_AGREEMENT,
    }
    passed = True
    for stage, vocab, slots in (
        ("semantic", 10_000, engine.config.semantic_slots),
        ("coarse", 12_000, engine.config.coarse_slots),
    ):
        ref_model = getattr(ref_engine, f"{stage}_model")
        model = getattr(engine, f"{stage}_model")
        length, prompt = 300, 257
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (2, length), generator=g).to(dev)
        h = model.head_start  # decode steps give the logits from here (the coarse stage's ids)
        model.setup_cache(2)
        try:
            with torch.inference_mode():
                want = ref_model.forward_full(ids).float()[:, prompt - 1 : length, h:]
                rows, last = torch.arange(2, device=dev), torch.full((2,), prompt - 1, device=dev)
                got = [model.prefill(model.embed(ids[:, :prompt]), rows, last).float()[:, h:]]
                for pos in range(prompt, length):
                    at = torch.full((2,), pos, device=dev)
                    got.append(model.decode(ids[:, pos], at, pos + 1).float())
                got_t = torch.stack(got, 1)  # (2, 44, V - h)
        finally:
            model.setup_cache(slots)
        cos = torch.nn.functional.cosine_similarity(got_t, want, dim=-1)
        row = {
            "finite": bool(torch.isfinite(got_t).all()),
            "cosine_min": float(cos.min()),
            "relative_max_diff": float((got_t - want).abs().max() / want.abs().max()),
            "argmax_agreement": float((got_t.argmax(-1) == want.argmax(-1)).float().mean()),
        }
        row["passed"] = (
            row["finite"]
            and row["cosine_min"] >= HALF_MIN_COSINE
            and row["relative_max_diff"] <= HALF_MAX_RELATIVE_DIFF
            and row["argmax_agreement"] >= HALF_MIN_ARGMAX_AGREEMENT
        )
        passed &= row["passed"]
        result[stage] = row
    return result | {"passed": passed}


def check_pipeline(check: Check) -> dict[str, Any]:
    """The Pipeline's worker threads (a CUDA stream each on a GPU) give what Engine.generate
    gives: the same requests, in the same batches (three texts with one cap, submitted together),
    greedy and then sampled with a seed."""
    from common import SENTENCES

    from stream_engine.config import GenerationOptions
    from stream_engine.runtime.pipeline import Pipeline

    engine = check.engine(check.plan.small, "float32", True)
    texts = list(SENTENCES[:3])
    voice = "v2/en_speaker_1"
    groups = [
        {"greedy": True, "max_semantic_tokens": check.plan.pipeline_tokens},
        {"seed": 7, "max_semantic_tokens": check.plan.pipeline_tokens},
    ]
    want = [engine.generate(texts, voice, **g) for g in groups]
    finals: list[Any] = []
    arrived = threading.Condition()

    def on_final(req: Any) -> None:
        with arrived:
            finals.append(req)
            arrived.notify_all()

    pipe = Pipeline(engine.runtime, on_final, device=engine.device)
    got = []
    pipe.start()
    try:
        for g in groups:
            reqs = [engine.request(t, voice, GenerationOptions(**g)) for t in texts]
            for r in reqs:
                pipe.submit(r)
            with arrived:
                if not arrived.wait_for(lambda reqs=reqs: all(r in finals for r in reqs), 120):
                    raise TimeoutError("the pipeline did not finish its requests in 120 s")
            errors = [r.error for r in reqs if r.error is not None]
            if errors:
                raise RuntimeError(f"a pipeline request failed: {errors[0]!r}")
            got.append([r.speech(engine.sample_rate) for r in reqs])
    finally:
        pipe.stop(timeout=30)
    rows = [
        {"options": g, "text": t} | compare(a, b, AUDIO_TOL_SAME_TOKENS)
        for g, gs, ws in zip(groups, got, want, strict=True)
        for t, a, b in zip(texts, gs, ws, strict=True)
    ]
    return {"cases": rows, "passed": all(r["passed"] for r in rows)}


def part_correctness(check: Check, out: dict[str, Any]) -> None:
    checks: list[dict[str, Any]] = out.setdefault("checks", [])
    judged: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("graphs_vs_eager", lambda: check_graphs_vs_eager(check, "float32")),
        ("reference", lambda: check_reference(check)),
        ("pipeline_vs_generate", lambda: check_pipeline(check)),
        ("float16_generates", lambda: check_half_generates(check)),
        ("float16_logits", lambda: check_half_logits(check)),
        # not judged: float16 rounds a padded (graph) and an unpadded (eager) step differently
        ("float16_graphs_vs_eager_info", lambda: check_graphs_vs_eager(check, "float16")),
    ]
    for name, run in judged:
        t = time.perf_counter()
        try:
            row = {"name": name} | run()
        except PartTimeout as e:  # the part ends here; the check that ran out is recorded
            checks.append({"name": name, "passed": False, "error": f"timeout: {e}"})
            raise
        except Exception as e:
            row = {"name": name, "passed": False, "error": f"{type(e).__name__}: {e}"}
            row["traceback"] = traceback.format_exc(limit=8)
        if name.endswith("_info"):
            row["judged"], row["agreed"] = False, row.pop("passed", None)
        row["seconds"] = time.perf_counter() - t
        checks.append(row)
        verdict = {True: "PASS", False: "FAIL"}.get(row.get("passed"), "INFO")
        check.say(f"{verdict} {name} ({row['seconds']:.1f} s)", row.get("error", ""))
        check.save()
    check.mixed_runs.clear()
    check.drop_engines("float32")
    if any(c.get("passed") is False for c in checks):
        failed = [c["name"] for c in checks if c.get("passed") is False]
        out["problems"] = [f"correctness check(s) failed: {', '.join(failed)}"]


# -- decode steps -----------------------------------------------------------------------------


def engine_steps(check: Check, engine: Engine, batch: int) -> dict[str, Any]:
    """A whole decode step of the engine (forward, sampling, bookkeeping: Runtime.step's
    stage steps), from a generate call of ``batch`` texts: the mean over the semantic and the
    coarse stages' decode steps at that batch (whole-window steps left out). On CUDA tokens are
    read back every few steps, so single steps are uneven; the mean is what a step costs."""
    from common import SENTENCES

    from stream_engine.runtime.trace import StepTrace

    p = check.plan
    texts = [SENTENCES[i % len(SENTENCES)] for i in range(batch)]
    engine.generate(texts, VOICE, max_semantic_tokens=min(16, p.step_tokens), seed=1)  # warm
    trace = StepTrace()
    engine.runtime.observers.append(trace)
    eager_before = eager_step_counts(engine)
    try:
        t0 = time.perf_counter()
        engine.generate(texts, VOICE, max_semantic_tokens=p.step_tokens, seed=2)
        t1 = time.perf_counter()
    finally:
        engine.runtime.observers.remove(trace)
    row: dict[str, Any] = {"batch": batch, "generate_s": t1 - t0}
    eager_after = eager_step_counts(engine)
    if eager_before is not None and eager_after is not None:  # steps that found no graph
        row["eager_steps"] = {k: n - eager_before.get(k, 0) for k, n in eager_after.items()}
    for stage in ("semantic", "coarse"):
        ms = [
            (s.end - s.start) * 1e3
            for s in trace.between(t0, t1)
            if s.stage == stage and not s.window and s.batch == batch
        ]
        row[stage] = {
            "steps": len(ms),
            "ms_mean": statistics.fmean(ms) if ms else None,
            "ms_median": statistics.median(ms) if ms else None,
        }
    return row


def eager_step_counts(engine: Engine) -> dict[str, int] | None:
    """Decode steps that found no captured graph, per stage, where the engine counts them."""
    counts = getattr(engine, "eager_steps", None)
    return dict(counts()) if callable(counts) else None


def step_stage(engine: Engine, stage: str, slots: int) -> Any:
    """A decode stage of ``engine``'s weights with its own cache of ``slots`` slots and graphs
    (on CUDA real ones; elsewhere StepGraphs runs the step on the same shapes, eagerly)."""
    from stream_engine.bark.model import from_hf
    from stream_engine.runtime.stages import CoarseStage, SemanticStage

    hf = engine.loaded.model
    model = from_hf(hf.semantic if stage == "semantic" else hf.coarse_acoustics)
    model.set_attn(engine.config.attn)
    kind = SemanticStage if stage == "semantic" else CoarseStage
    return kind(model, engine.consts, slots, cuda_graphs=True)


def replay_seconds(stage: Any, rows: int, kv: int, steps: int) -> float:
    """Seconds per replay of the engine's whole decode step (forward pass and sampling, the
    graph the stage captures) at exactly ``rows`` rows, keys up to ``kv``."""
    import torch
    from common import clock

    key = (rows, kv, False)
    stage.capture_graphs([key])
    with torch.inference_mode():
        stage.meta.zero_()
        stage.meta[0, :rows] = kv - 1  # every row at the last position
        stage.graphs.replay(key)
        t = clock(stage.device)
        for _ in range(steps):
            stage.graphs.replay(key)
        return (clock(stage.device) - t) / steps


def model_steps(check: Check, engine: Engine, out: dict[str, Any]) -> None:
    """Per stage: the decode forward alone (``CausalGPT.decode``, eager: decode_steps.py's
    timing) and the engine's whole decode step (forward and sampling) as a graph replay, at
    each batch and at its bucket: the bucket question. Resizes the models' caches: run last on
    ``engine``."""
    import decode_steps

    from stream_engine.runtime.cuda import batch_buckets

    p = check.plan
    rows_max = max(*p.batches, *p.graph_rows)
    buckets = batch_buckets(rows_max)
    for stage in ("semantic", "coarse"):
        model = getattr(engine, f"{stage}_model")
        kv = min(p.model_kv, model.cfg.block_size)
        model.setup_cache(rows_max)
        weights = decode_steps.weight_bytes(model)
        row: dict[str, Any] = {"kv": kv, "steps": p.model_steps, "weights_mb": weights / 1e6}
        out.setdefault("model_steps", {})[stage] = row
        eager = {b: decode_steps.step_seconds(model, b, kv, p.model_steps) for b in p.batches}
        row["eager_ms"] = {b: s * 1e3 for b, s in eager.items()}
        row["eager_gb_per_s"] = {
            b: (weights + decode_steps.cache_bytes(model, b, kv)) / s / 1e9
            for b, s in eager.items()
        }
        # the whole step as the engine replays it, at each exact batch and at the buckets
        steps = step_stage(engine, stage, rows_max)
        timed = {b: replay_seconds(steps, b, kv, p.model_steps) for b in p.graph_rows}
        row["step_capture_s"] = steps.graphs.capture_s
        if check.cuda:
            row["graph_replay_ms"] = {b: s * 1e3 for b, s in timed.items()}
            how = "graph replay of the whole step"
        else:
            row["graph_replay_ms"] = "skipped: no CUDA"
            how = "the whole step on the same shapes, eager (no CUDA)"
        # the bucket question: a batch of n runs padded to its bucket; what does that cost?
        table = []
        for n in p.graph_rows:
            b = next(x for x in buckets if x >= n)
            if b in timed:
                table.append(
                    {
                        "batch": n,
                        "bucket": b,
                        "ms_exact": timed[n] * 1e3,
                        "ms_bucket": timed[b] * 1e3,
                        "bucket_over_exact": timed[b] / timed[n],
                    }
                )
        row["buckets"] = {"timed": how, "buckets": buckets, "table": table}
        check.say(
            f"{stage} forward, kv {kv}: eager "
            + ", ".join(f"b{b} {ms:.3f}" for b, ms in row["eager_ms"].items())
            + " ms"
            + (
                "; graph replay "
                + ", ".join(f"b{b} {ms:.3f}" for b, ms in row["graph_replay_ms"].items())
                + " ms"
                if check.cuda
                else ""
            )
        )
        check.save()


def part_decode(check: Check, out: dict[str, Any], large: bool) -> None:
    p = check.plan
    model = p.large if large else p.small
    graphs = check.engine(model, p.dtype, True, p.slots)
    engines = {"graphs": graphs}
    if p.eager_engine_steps and not large:
        engines["eager"] = check.engine(model, p.dtype, False, p.slots)
    out |= {"model": model, "dtype": p.dtype, "engine_steps": {}}
    for label, engine in engines.items():
        for b in p.batches:
            row = engine_steps(check, engine, b)
            out["engine_steps"].setdefault(label, {})[b] = row
            check.say(
                f"{model} {label} batch {b}: semantic step "
                f"{row['semantic']['ms_mean'] or float('nan'):.3f} ms, coarse "
                f"{row['coarse']['ms_mean'] or float('nan'):.3f} ms (mean)"
            )
            check.save()
    # the forward alone, on an engine no later part uses (its caches are resized): the small
    # model's eager engine (loaded for the float16 checks), the large model's only engine
    # (its parts are the last)
    model_steps(check, graphs if large else check.engine(model, p.dtype, False, p.slots), out)


# -- end to end -------------------------------------------------------------------------------


def part_e2e(check: Check, out: dict[str, Any], large: bool) -> None:
    import end_to_end

    p = check.plan
    model = p.large if large else p.small
    engine = check.engine(model, p.dtype, True, p.slots)
    end_to_end.quiet_known_transformers_logs()
    reference = end_to_end.ReferenceMode()
    out |= {
        "model": model,
        "dtype": p.dtype,
        "semantic_tokens": p.e2e_tokens,
        "repeats": p.e2e_large_repeats if large else p.e2e_repeats,
        "warmup": p.e2e_warmup,
        "voice": VOICE,
        "results": [],
    }
    repeats = p.e2e_large_repeats if large else p.e2e_repeats
    for b in p.e2e_large_batches if large else p.e2e_batches:
        res = end_to_end.bench_batch(
            engine, b, VOICE, p.e2e_tokens, repeats, p.e2e_warmup, reference
        )
        out["results"].append(res)
        out["reference_batches"] = {"batched": reference.batched, "check": reference.why}
        check.say(
            f"{model} batch {b}: RTF ours {res['ours']['rtf']:.3f}, reference "
            f"{res['reference']['rtf']:.3f} ({res['speedup']:.1f}x), same work: "
            f"{res['work_matches']}"
        )
        if not res["work_matches"]:
            out.setdefault("problems", []).append(f"batch {b}: the two sides did different work")
        check.save()


# -- the server -------------------------------------------------------------------------------


def part_server(check: Check, out: dict[str, Any]) -> None:
    if check.server_missing:
        raise Skip(f"skipped: cannot import {', '.join(check.server_missing)}")
    import asyncio

    p = check.plan
    engine = check.engine(p.small, p.dtype, True, p.slots)
    out |= {"model": p.small, "dtype": p.dtype, "sentences": p.sentences, "rounds": {}}
    asyncio.run(serve_rounds(check, engine, out))


async def serve_rounds(check: Check, engine: Engine, out: dict[str, Any]) -> None:
    """load.py's clients against our server: one warm-up client, then a round per client count
    (all clients start together, each with its own paragraph, sent word by word)."""
    import load
    from common import SENTENCES

    from stream_engine.config import ServerConfig
    from stream_engine.runtime.trace import StepTrace
    from stream_engine.server.app import Server

    p = check.plan
    top = max(p.clients)
    server = Server(
        engine,
        ServerConfig(port=0, max_connections=max(64, top), max_connections_per_ip=max(16, top)),
    )
    await server.start()
    trace = StepTrace()
    engine.runtime.observers.append(trace)
    pool = load.SHORT_SENTENCES if p.short else SENTENCES
    try:
        await load.run_round(server.url, [load.paragraph(0, p.sentences, pool)], VOICE, 0.0)
        sides = [("ours", False)] + ([("early", True)] if p.early_audio else [])
        for n in p.clients:
            for side, early in sides:
                if early and n != 1:
                    continue
                texts = [load.paragraph(1 + i, p.sentences, pool) for i in range(n)]
                t0 = time.perf_counter()
                results, wall = await load.run_round(server.url, texts, VOICE, 0.0, early)
                t1 = time.perf_counter()
                s = load.summarize(
                    [(results, wall)], [load.engine_summary(trace, t0, t1)], load.SENT[side]
                )
                s["faster_than_real_time"] = sum(
                    1
                    for r in s["per_stream"]
                    if r["end"] == "done" and r["rtf"] is not None and r["rtf"] < 1
                )
                out["rounds"].setdefault(str(n), {})[side] = s
                check.say(
                    f"{n} client(s) {side}: TTFA p50 {1e3 * (s['ttfa_p50_s'] or 0):.0f} ms, "
                    f"p95 {1e3 * (s['ttfa_p95_s'] or 0):.0f} ms; faster than real time: "
                    f"{s['faster_than_real_time']}/{n}; done {s['done']}/{s['streams']}"
                )
                if s["failures"] or s["protocol_errors"]:
                    out.setdefault("problems", []).append(
                        f"{n} clients {side}: {s['failures']}, "
                        f"{s['protocol_errors']} protocol error(s)"
                    )
                check.save()
    finally:
        engine.runtime.observers.remove(trace)
        await server.stop(timeout=0)


# -- goals ------------------------------------------------------------------------------------


def dig(record: dict[str, Any], *path: Any) -> Any:
    """``record[a][b]...``, or None where a step is missing."""
    x: Any = record
    for key in path:
        found = key in x if isinstance(x, dict) else isinstance(x, list) and key in range(len(x))
        if not found:
            return None
        x = x[key]
    return x


def e2e_rtf(record: dict[str, Any], part: str, batch: int) -> float | None:
    for r in dig(record, "parts", part, "result", "results") or []:
        if r["batch"] == batch and r["work_matches"]:
            return float(r["ours"]["rtf"])
    return None


def most_faster_than_real_time(record: dict[str, Any]) -> int | None:
    rounds = dig(record, "parts", "server-small", "result", "rounds") or {}
    counts = [
        sides["ours"]["faster_than_real_time"] for sides in rounds.values() if "ours" in sides
    ]
    return max(counts) if counts else None


def goals(check: Check) -> list[dict[str, Any]]:
    """Issue 14's goals, from this run: PASS/FAIL on CUDA with the goal's model in float16,
    else not measured (the value still shown where there is one)."""
    rec, p = check.record, check.plan
    ttfa = dig(rec, "parts", "server-small", "result", "rounds", "1", "ours", "ttfa_p50_s")
    rows = [
        (
            "decode step <= 0.5 ms at batch 1 with graphs (bark-small fp16, the engine's "
            "semantic step)",
            "ms",
            dig(
                rec,
                "parts",
                "decode-small",
                "result",
                "engine_steps",
                "graphs",
                1,
                "semantic",
                "ms_mean",
            ),
            0.5,
            "<=",
            "random:small",
        ),
        (
            "RTF <= 0.1 at batch 1 (bark-small fp16)",
            "",
            e2e_rtf(rec, "e2e-small", 1),
            0.1,
            "<=",
            "random:small",
        ),
        (
            "TTFA p50 <= 150 ms (bark-small fp16, 1 client, through the server)",
            "ms",
            None if ttfa is None else 1e3 * ttfa,
            150.0,
            "<=",
            "random:small",
        ),
        (
            ">= 32 concurrent streams faster than real time (bark-small fp16, through the server)",
            "streams",
            most_faster_than_real_time(rec),
            32,
            ">=",
            "random:small",
        ),
        (
            "bark-large RTF <= 0.2 at batch 1 (fp16)",
            "",
            e2e_rtf(rec, "e2e-large", 1),
            0.2,
            "<=",
            "random:large",
        ),
    ]
    out = []
    for goal, unit, value, target, op, model in rows:
        row: dict[str, Any] = {"goal": goal, "target": target, "unit": unit, "value": value}
        if value is None:
            row |= {"status": "not measured", "why": "its part did not run or did not finish"}
        elif not check.cuda or p.dtype != "float16" or model not in (p.small, p.large):
            row |= {"status": "not measured", "why": f"{p.mode}: {p.small} {p.dtype} on {p.device}"}
        else:
            met = value <= target if op == "<=" else value >= target
            row["status"] = "PASS" if met else "FAIL"
        out.append(row)
    return out


# -- running ----------------------------------------------------------------------------------


def run_part(check: Check, name: str, fn: Callable[[Check, dict[str, Any]], None]) -> None:
    p = check.plan
    left = p.total_s - (time.perf_counter() - check.started)
    own = p.budgets.get(name, FULL.budgets[name])  # a part --parts added to --quick: full's
    budget = min(own, left)
    entry: dict[str, Any] = {"budget_s": own, "status": "running", "result": {}}
    check.record["parts"][name] = entry
    if budget < 5:
        entry["status"] = "skipped"
        entry["why"] = f"skipped: out of time ({left:.0f} s left of the run's {p.total_s:.0f})"
        check.say(f"== {name}: {entry['why']}")
        check.save()
        return
    check.say(f"== {name} (budget {budget:.0f} s)")
    t = time.perf_counter()
    try:
        with time_limit(budget):
            fn(check, entry["result"])
    except Skip as e:
        entry |= {"status": "skipped", "why": str(e)}
    except PartTimeout as e:
        entry |= {"status": "timeout", "error": str(e), "traceback": traceback.format_exc(limit=8)}
    except Exception as e:
        entry |= {"status": "error", "error": f"{type(e).__name__}: {e}"}
        entry["traceback"] = traceback.format_exc(limit=12)
    else:
        problems = entry["result"].get("problems")
        entry["status"] = "failed" if problems else "ok"
    entry["seconds"] = time.perf_counter() - t
    check.say(
        f"== {name}: {entry['status']} in {entry['seconds']:.1f} s",
        entry.get("error") or entry.get("why") or "",
    )
    if "traceback" in entry:
        print(entry["traceback"], flush=True)
    check.save()


def strict_load_errors(record: dict[str, Any]) -> list[str]:
    return [
        f"{name}: {e['strict_load_error']}"
        for name, e in record["engines"].items()
        if "strict_load_error" in e
    ]


def summary(check: Check) -> None:
    rec = check.record
    env = rec["environment"]
    print(
        f"\n== gpu_check {check.plan.mode} on {env.get('gpu') or 'cpu'} (torch {env.get('torch')}, "
        f"CUDA {env.get('torch_cuda')}, transformers {env.get('transformers')}): "
        f"{rec['wall_s']:.0f} s"
    )
    for name, part in rec["parts"].items():
        note = part.get("error") or part.get("why") or "; ".join(part["result"].get("problems", []))
        print(f"  {name:<13} {part['status']:<8} {part.get('seconds', 0):6.1f} s  {note}")
    for error in strict_load_errors(rec):
        print(f"  FAIL strict load (then loaded without strict_gpu): {error}")
    for c in dig(rec, "parts", "correctness", "result", "checks") or []:
        verdict = {True: "PASS", False: "FAIL"}.get(c.get("passed"), "info")
        extra = c.get("error") or c.get("note") or ""
        if "agreed" in c:
            extra = f"(not judged) same tokens: {c['agreed']} {extra}"
        print(f"  {verdict} {c['name']} {extra}")
    for size in ("small", "large"):
        steps = dig(rec, "parts", f"decode-{size}", "result", "engine_steps") or {}
        for label, by_batch in steps.items():
            cells = ", ".join(
                f"b{b} {r['semantic']['ms_mean']:.3f}/{r['coarse']['ms_mean']:.3f}"
                for b, r in by_batch.items()
                if r["semantic"]["ms_mean"] and r["coarse"]["ms_mean"]
            )
            print(f"  decode-{size} engine step ms (semantic/coarse), {label}: {cells}")
        for stage, row in (
            dig(rec, "parts", f"decode-{size}", "result", "model_steps") or {}
        ).items():
            eager = ", ".join(f"b{b} {ms:.3f}" for b, ms in row["eager_ms"].items())
            graphs = row["graph_replay_ms"]
            if isinstance(graphs, dict):
                graphs = ", ".join(f"b{b} {graphs[b]:.3f}" for b in row["eager_ms"] if b in graphs)
            worst = max((r["bucket_over_exact"] for r in row["buckets"]["table"]), default=0.0)
            print(
                f"  decode-{size} {stage} forward ms, eager: {eager}; graph replay: {graphs}; "
                f"a bucket costs at most {worst:.2f}x the exact batch ({row['buckets']['timed']})"
            )
        for r in dig(rec, "parts", f"e2e-{size}", "result", "results") or []:
            print(
                f"  e2e-{size} batch {r['batch']}: RTF ours {r['ours']['rtf']:.3f}, "
                f"reference {r['reference']['rtf']:.3f}, speed-up {r['speedup']:.1f}x"
            )
    for n, sides in (dig(rec, "parts", "server-small", "result", "rounds") or {}).items():
        for side, s in sides.items():
            print(
                f"  server {n} client(s) {side}: TTFA p50 {1e3 * (s['ttfa_p50_s'] or 0):.0f} ms, "
                f"p95 {1e3 * (s['ttfa_p95_s'] or 0):.0f} ms, faster than real time "
                f"{s['faster_than_real_time']}/{s['streams']}"
            )
    print("goals (issue 14):")
    for g in rec["goals"]:
        value = "-" if g["value"] is None else f"{g['value']:.3g} {g['unit']}".strip()
        why = f" ({g['why']})" if "why" in g else ""
        print(f"  {g['status']:<12} {g['goal']}: {value}{why}")
    print(f"JSON: {check.out}")


def default_out(plan: Plan) -> Path:
    name = "cpu"
    if plan.device == "cuda":
        import torch

        if torch.cuda.is_available():
            name = gpu_slug(torch.cuda.get_device_name())
    suffix = "" if plan.mode == "full" else f"-{plan.mode}"
    folder = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks" / "results"
    return folder / f"gpu-check-{name}{suffix}.json"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a subset, <= 4 minutes")
    mode.add_argument("--dry-run", action="store_true", help="on the CPU, random:tiny, float32")
    ap.add_argument("--parts", nargs="+", choices=PARTS, help="only these parts (in their order)")
    ap.add_argument("--out", type=Path, default=None, help="the JSON file (see above)")
    ap.add_argument(
        "--budget-scale",
        type=float,
        default=1.0,
        help="multiply every time budget (a slower device, a busy CPU)",
    )
    args = ap.parse_args()
    plan = DRY_RUN if args.dry_run else QUICK if args.quick else FULL
    changes: dict[str, Any] = {}
    if args.parts:
        changes["parts"] = tuple(p for p in PARTS if p in args.parts)
    if args.budget_scale != 1.0:
        changes["budgets"] = {k: v * args.budget_scale for k, v in plan.budgets.items()}
        changes["total_s"] = plan.total_s * args.budget_scale
    plan = Plan(**{**plan.__dict__, **changes})
    check = Check(plan, args.out or Path("/dev/null"))
    check.record = {
        "benchmark": "gpu_check",
        "command": " ".join(sys.argv),
        "mode": plan.mode,
        "plan": plan.__dict__,
        "environment": {},
        "engines": {},
        "parts": {},
        "goals": [],
    }
    ok = check_environment(check)
    check.out = args.out or default_out(plan)
    if ok and plan.threads:
        import torch

        torch.set_num_threads(plan.threads)
    if not ok:
        check.record["parts"] = {
            name: {"status": "skipped", "why": "the environment check failed"}
            for name in plan.parts
        }
        check.save()
        print(f"environment check failed; JSON: {check.out}")
        return 2
    check.save()
    runners: dict[str, Callable[[Check, dict[str, Any]], None]] = {
        "correctness": part_correctness,
        "decode-small": lambda c, o: part_decode(c, o, large=False),
        "e2e-small": lambda c, o: part_e2e(c, o, large=False),
        "server-small": part_server,
        "e2e-large": lambda c, o: part_e2e(c, o, large=True),
        "decode-large": lambda c, o: part_decode(c, o, large=True),
    }
    for name in plan.parts:
        if name == "e2e-large":  # the large model gets the small engines' device memory
            check.drop_engines(plan.dtype)
        run_part(check, name, runners[name])
    check.record["goals"] = goals(check)
    check.save()
    summary(check)
    parts = check.record["parts"].values()
    failed = any(p["status"] in ("failed", "error", "timeout") for p in parts)
    return 1 if failed or strict_load_errors(check.record) else 0


if __name__ == "__main__":
    sys.exit(main())

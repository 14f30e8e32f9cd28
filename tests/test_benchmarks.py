"""The benchmark scripts run, compare with the reference, and write what they measured.

Each script runs as a user runs it (a subprocess, from the repository root) on ``random:tiny``
with the smallest work it accepts; the JSON it writes must hold both sides' figures and say the
two sides did the same work. The figures themselves are not judged: on a tiny model they mean
nothing, and speed goals live in the benchmarks, not in tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, out: Path, *args: str, timeout: float = 300) -> dict[str, Any]:
    cmd = [sys.executable, f"benchmarks/{name}", "--model", "random:tiny", *args]
    proc = subprocess.run(
        [*cmd, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    assert "machine " in proc.stdout  # every script says where it ran
    record = json.loads(out.read_text())
    assert record["machine"]["decode_kernel"] in ("avx2", "onednn", "mkl")
    assert record["machine"]["device"] == "cpu"
    return record


def positive(*values: float) -> bool:
    return all(isinstance(v, float | int) and v > 0 for v in values)


def test_end_to_end(tmp_path):
    rec = run_script(
        "end_to_end.py", tmp_path / "e2e.json", "--batch", "1", "2", "--semantic-tokens", "12",
        "--repeats", "1", "--warmup", "0",
    )  # fmt: skip
    assert [r["batch"] for r in rec["results"]] == [1, 2]
    for r in rec["results"]:
        assert r["work_matches"], r  # same semantic tokens, frames and samples on both sides
        assert r["ours"]["lengths"]["semantic"] == [12] * r["batch"]
        assert positive(r["ours"]["wall_s"], r["reference"]["wall_s"], r["speedup"])
        assert r["ours"]["audio_s"] == pytest.approx(r["reference"]["audio_s"])


def test_stages(tmp_path):
    rec = run_script(
        "stages.py", tmp_path / "stages.json", "--tokens", "4", "--repeats", "1",
        "--fine-batch", "2",
    )  # fmt: skip
    for stage in ("semantic", "coarse"):
        row = rec["stages"][stage]
        assert len(row["repeats_ms"]) == 1
        assert positive(
            row["reference_ms_per_token"], row["ours_b1_ms_per_token"], row["ours_b8_ms_per_step"]
        )
    for side in ("ours", "reference"):
        assert positive(
            rec[f"fine_{side}_ms_per_window"],
            rec[f"fine_{side}_b2_ms_per_window"],
            rec[f"codec_{side}_ms_per_audio_s"],
        )


def test_breakdown(tmp_path):
    rec = run_script("breakdown.py", tmp_path / "breakdown.json", "--batch", "2")
    assert len(rec["texts"]) == 2
    for table in (rec["one_by_one_s"], rec["batch_s"]):
        assert set(table) == {"semantic", "coarse", "fine", "codec"}
    assert 0 < rec["window_share_one_by_one"] < 1
    assert positive(rec["wall_one_by_one_s"], rec["wall_batch_s"])


def test_load_against_the_naive_server_and_over_http(tmp_path):
    rec = run_script(
        "load.py", tmp_path / "load.json", "--clients", "1", "4", "--sentences", "2", "--short",
        "--warmup", "0", "--naive-max-clients", "1", "--trace", str(tmp_path / "trace"),
    )  # fmt: skip
    sides = {n: set(v) for n, v in rec["results"].items()}
    assert sides == {"1": {"ours", "naive", "http"}, "4": {"ours", "http"}}
    for n, by_side in rec["results"].items():
        for side, r in by_side.items():
            assert r["failures"] == [] and r["protocol_errors"] == 0, (n, side, r["failures"])
            assert r["done"] == r["streams"] == int(n)
            assert positive(r["ttfa_p50_s"], r["audio_s"], r["audio_s_per_wall_s"])
    for by_side in rec["results"].values():  # the same paragraphs, whole in one POST each
        http, ours = by_side["http"], by_side["ours"]
        assert (http["text_sent"], ours["text_sent"]) == ("whole", "words")
        assert [s["text"] for s in http["per_stream"]] == [s["text"] for s in ours["per_stream"]]
        for stream in http["per_stream"]:
            assert stream["end"] == "done" and positive(stream["audio_s"], stream["rtf"]), stream
            assert 0 < stream["ttfa_s"] <= stream["ended_at"] - stream["sent_at"]
    engine = rec["results"]["4"]["ours"]["engine"][0]
    assert 0 < engine["busy"] <= 1
    assert engine["stages"]["semantic"]["mean_batch"] >= 1
    # all goals are computed from this run (pass or fail is the benchmark's business)
    assert [g["value"] is not None for g in rec["goals"]] == [True] * 4
    assert [g["pass"] in (True, False) for g in rec["goals"]] == [True] * 4
    ttfa, throughput = rec["goals"][2:]
    assert "HTTP" in ttfa["goal"] and "HTTP" in throughput["goal"]
    at1, at4 = rec["results"]["1"], rec["results"]["4"]
    assert ttfa["value"] == pytest.approx(at1["http"]["ttfa_p50_s"] / at1["ours"]["ttfa_p50_s"])
    assert throughput["value"] == pytest.approx(
        at4["http"]["audio_s_per_wall_s"] / at4["ours"]["audio_s_per_wall_s"]
    )
    # judged at equal machine speed, as the 4-client goal's ratio is corrected
    assert throughput["judged"] == "value_at_equal_speed"
    assert throughput["value_at_equal_speed"] == pytest.approx(
        throughput["value"] / throughput["speed_http_over_ws"]
    )
    # and the 4-client ratio comes with the machine's speed in each round (window work)
    four = rec["goals"][0]
    assert four["value_at_equal_speed"] == pytest.approx(four["value"] / four["speed_4_over_1"])
    traces = sorted(p.name for p in tmp_path.glob("trace*.json"))
    assert len(traces) == 4, traces  # one Chrome trace per round of our server, WS and HTTP
    assert json.loads((tmp_path / traces[0]).read_text())["traceEvents"]


def test_decode_steps(tmp_path):
    rec = run_script(
        "decode_steps.py", tmp_path / "steps.json", "--stage", "coarse", "--rows", "1", "3",
        "--kv", "8", "40", "--steps", "2", "--repeats", "1",
    )  # fmt: skip
    cells = [(r["kv"], r["rows"]) for r in rec["results"]]
    assert cells == [(8, 1), (8, 3), (40, 1), (40, 3)]
    by_cell = {(r["kv"], r["rows"]): r for r in rec["results"]}
    assert all(positive(r["ms_per_step"], r["gb_per_s"]) for r in rec["results"])
    assert by_cell[8, 1]["vs_fewest_rows"] == 1.0
    # the bytes a step reads: the same weights, plus a cache that grows with rows and length
    assert by_cell[40, 3]["mb_read"] > by_cell[40, 1]["mb_read"] > by_cell[8, 1]["mb_read"]
    assert by_cell[8, 1]["mb_read"] > rec["weights_mb"]


GPU_CHECK_PARTS = [
    "correctness", "decode-small", "e2e-small", "server-small", "e2e-large", "decode-large",
]  # fmt: skip
GPU_CHECK_JUDGED = {
    "graphs_vs_eager", "reference", "pipeline_vs_generate", "float16_generates", "float16_logits",
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_gpu_check_dry_run(tmp_path):
    """The GPU check's every part on the CPU (random:tiny): the correctness checks pass, what
    needs CUDA says so, the measurements are there, the goals are computed and not judged."""
    out = tmp_path / "gpu-check.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=360,
    )  # fmt: skip
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    rec = json.loads(out.read_text())
    assert rec["mode"] == "dry-run" and rec["environment"]["missing_wheels"] == []
    assert rec["environment"]["server_missing_wheels"] == []
    parts = rec["parts"]
    assert {name: p["status"] for name, p in parts.items()} == dict.fromkeys(GPU_CHECK_PARTS, "ok")
    assert all(p["seconds"] <= p["budget_s"] for p in parts.values())
    for engine in rec["engines"].values():  # the whole decode mode, whatever keys it has
        assert {"attn", "cuda_graphs", "dtype", "fallbacks"} <= set(engine["decode_mode"])

    checks = {c["name"]: c for c in parts["correctness"]["result"]["checks"]}
    assert set(checks) == GPU_CHECK_JUDGED | {"float16_graphs_vs_eager_info"}
    for name in GPU_CHECK_JUDGED:
        assert checks[name]["passed"] is True, checks[name]
    assert checks["float16_graphs_vs_eager_info"]["judged"] is False
    mixed = checks["graphs_vs_eager"]["cases"]
    assert len(mixed) == 4 and "no CUDA" in checks["graphs_vs_eager"]["note"]
    for case in mixed + checks["reference"]["cases"] + checks["pipeline_vs_generate"]["cases"]:
        assert case["tokens_equal"] == {"semantic": True, "coarse": True, "fine": True}, case
        assert case["audio_max_diff"] <= case["audio_tol"]
    assert len(checks["reference"]["cases"]) == 2
    assert len(checks["pipeline_vs_generate"]["cases"]) == 6  # 3 texts, greedy and sampled
    for stage in ("semantic", "coarse"):
        logits = checks["float16_logits"][stage]
        assert logits["cosine_min"] >= 0.999 and logits["argmax_agreement"] >= 0.9

    for size in ("small", "large"):
        decode = parts[f"decode-{size}"]["result"]
        labels = {"graphs", "eager"} if size == "small" else {"graphs"}
        assert set(decode["engine_steps"]) == labels
        for by_batch in decode["engine_steps"].values():
            assert set(by_batch) == {"1", "4"}
            for row in by_batch.values():
                assert row["semantic"]["steps"] > 0 and row["semantic"]["ms_mean"] > 0
                assert row["coarse"]["steps"] > 0 and row["coarse"]["ms_mean"] > 0
        for stage in ("semantic", "coarse"):
            steps = decode["model_steps"][stage]
            assert steps["graph_replay_ms"] == "skipped: no CUDA"
            assert positive(*steps["eager_ms"].values(), *steps["eager_gb_per_s"].values())
            table = steps["buckets"]["table"]
            assert [(r["batch"], r["bucket"]) for r in table] == [(1, 1), (2, 2), (3, 4), (4, 4)]
            assert table[2]["ms_bucket"] == table[3]["ms_exact"]
        e2e = parts[f"e2e-{size}"]["result"]["results"]
        assert [r["batch"] for r in e2e] == [1] and e2e[0]["work_matches"]
        assert positive(e2e[0]["ours"]["rtf"], e2e[0]["reference"]["rtf"])

    rounds = parts["server-small"]["result"]["rounds"]
    assert {n: set(sides) for n, sides in rounds.items()} == {"1": {"ours", "early"}, "2": {"ours"}}
    for n, sides in rounds.items():
        for s in sides.values():
            assert s["done"] == s["streams"] == int(n) and s["protocol_errors"] == 0
            assert positive(s["ttfa_p50_s"], s["ttfa_p95_s"])
            assert 0 <= s["faster_than_real_time"] <= int(n)

    assert len(rec["goals"]) == 5
    for goal in rec["goals"]:  # computed from this run, not judged on a CPU
        assert goal["status"] == "not measured" and "dry-run" in goal["why"], goal
        assert goal["value"] is not None
    assert "goals (issue 14):" in proc.stdout

"""The game-NPC example (clients/npc/npc.py), run as a person would, against a test server."""

import asyncio
import json
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
NPC = REPO / "clients" / "npc" / "npc.py"


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as f:
        assert (f.getnchannels(), f.getsampwidth()) == (1, 2)
        pcm = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2")
        return pcm.astype(np.float32) / 32768, f.getframerate()


@pytest.mark.parametrize("fmt", ["pcm_s16le", "opus"])
async def test_npc_scene_over_one_connection(make_server, tmp_path, fmt):
    srv = await make_server()
    out = tmp_path / "scene"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(NPC),
        "--url",
        f"ws://127.0.0.1:{srv.port}",
        "--out",
        str(out),
        "--format",
        fmt,
        "--pace",
        "4",  # the pitch takes ~13 s to write: the interruption comes long before its end
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=tmp_path,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 240)
    assert proc.returncode == 0, stderr.decode()
    assert "interrupted" in stdout.decode()

    scene = json.loads((out / "scene.json").read_text())
    chars = scene["characters"]
    assert set(chars) == {"innkeeper", "bard", "merchant", "guard"}
    voices = [c["voice"] for c in chars.values()]
    assert None not in voices and len(set(voices)) == 4  # a voice each, from hello.voices
    for name, c in chars.items():
        audio, rate = read_wav(Path(c["wav"]))
        assert rate == c["sample_rate"] == 24_000
        assert len(audio) > rate // 2, name
        assert np.sqrt(np.mean(audio**2)) > 1e-3, f"{name}.wav is silent"

    lines = scene["lines"]
    # one connection: stream numbers 1, 2, 3, ... are the connection's own counter
    assert [ln["stream"] for ln in lines] == list(range(1, len(lines) + 1))
    assert [ln["character"] for ln in lines[2:]] == ["merchant", "guard", "merchant"]
    pitch, halt, reply = lines[2:]
    assert pitch["interrupted"] and pitch["outcome"] == "cancelled"
    assert pitch["audio_s"] > 0 and pitch["spoken"]
    assert len(pitch["spoken"]) < len(pitch["text"]) and pitch["text"].startswith(pitch["spoken"])
    assert all(ln["outcome"] == "done" and ln["spoken"] == ln["text"] for ln in (halt, reply))
    assert all(ln["outcome"] == "done" for ln in lines[:2])
    # the innkeeper and the bard spoke at the same time; the guard cut in before the merchant
    # had finished writing his line
    a, b = lines[:2]
    assert {a["character"], b["character"]} == {"innkeeper", "bard"}
    assert a["start_s"] < b["end_s"] and b["start_s"] < a["end_s"]
    assert halt["start_s"] >= pitch["end_s"] - 0.05
    assert pitch["end_s"] - pitch["start_s"] < len(pitch["text"].split()) / 4
    merchant, _ = read_wav(Path(chars["merchant"]["wav"]))
    gap = int(0.3 * 24_000)
    assert len(merchant) == pytest.approx(
        (pitch["audio_s"] + reply["audio_s"]) * 24_000 + gap, abs=30
    )

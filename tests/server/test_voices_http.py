"""Voices users bring: ``--voices DIR`` and ``/v1/voices`` on a real server (tiny model)."""

import io
import pickle
import zipfile

import httpx
import numpy as np
import pytest
from wire import collect

from stream_engine.bark.random_models import random_voice_preset
from stream_engine.client import Client

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(600)]


def npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def preset(seed: int = 7) -> dict[str, np.ndarray]:
    return random_voice_preset("narrator", seed)


def http(srv, token: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.port}", headers=headers, timeout=120)


def listing(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 200
    return {v["id"]: v["kind"] for v in response.json()["data"]}


async def test_add_use_delete_and_keep_across_restarts(make_server, tmp_path):
    srv = await make_server(voices_dir=str(tmp_path))
    async with await Client.connect(f"ws://127.0.0.1:{srv.port}") as before:  # opened earlier
        async with http(srv) as api:
            voices = listing(await api.get("/v1/voices"))
            assert voices["v2/en_speaker_1"] == "builtin" and "narrator" not in voices
            added = await api.post("/v1/voices/narrator", content=npz(**preset()))
            assert added.status_code == 201, added.text
            assert listing(await api.get("/v1/voices"))["narrator"] == "added"
            assert (tmp_path / "narrator.npz").is_file()
            # usable at once: the speech endpoint, a new connection, and one opened before
            speech = await api.post(
                "/v1/audio/speech",
                json={"model": "x", "input": "Hello.", "voice": "narrator", "seed": 1},
            )
            assert speech.status_code == 200 and speech.content
        async with await Client.connect(f"ws://127.0.0.1:{srv.port}") as after:
            assert "narrator" in after.hello["voices"]
            await after.speak("n", "Hello.", final=True, voice="narrator", options={"seed": 1})
            new = (await collect(after, ["n"]))["n"]
        await before.speak("n", "Hello.", final=True, voice="narrator", options={"seed": 1})
        old = (await collect(before, ["n"]))["n"]
    assert new.types[-1] == old.types[-1] == "done"
    assert [a.payload for a in new.audio] == [a.payload for a in old.audio]

    srv2 = await make_server(voices_dir=str(tmp_path))  # a restart: the file is read back
    async with http(srv2) as api:
        assert listing(await api.get("/v1/voices"))["narrator"] == "added"
        deleted = await api.delete("/v1/voices/narrator")
        assert deleted.status_code == 200 and deleted.json()["deleted"] is True
        assert "narrator" not in listing(await api.get("/v1/voices"))
        assert (await api.delete("/v1/voices/narrator")).status_code == 404
        gone = await api.post(
            "/v1/audio/speech", json={"model": "x", "input": "Hi.", "voice": "narrator"}
        )
        assert gone.status_code == 400 and gone.json()["error"]["code"] == "unknown_voice"
    assert not (tmp_path / "narrator.npz").exists()


async def test_hostile_uploads_change_nothing(make_server, tmp_path):
    srv = await make_server(voices_dir=str(tmp_path), token="s3cret")
    good = preset()
    bad_ids = dict(good, semantic_prompt=np.full(10, 10_000))  # == the vocabulary size
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        for key in good:  # each inflates to 24 MiB of zeros
            z.writestr(f"{key}.npy", b"\0" * (24 << 20))
    cases = {
        "pickle": ("narrator", npz(semantic_prompt=np.array([{"x": 1}], dtype=object)), 400),
        "raw pickle": ("narrator", pickle.dumps(good), 400),
        "keys": ("narrator", npz(semantic=good["semantic_prompt"]), 400),
        "dtype": ("narrator", npz(**dict(good, fine_prompt=good["fine_prompt"] * 0.5)), 400),
        "shape": ("narrator", npz(**dict(good, coarse_prompt=good["fine_prompt"])), 400),
        "ids": ("narrator", npz(**bad_ids), 400),
        "bomb": ("narrator", bomb.getvalue(), 413),
        "oversize": ("narrator", b"\0" * (5 << 20), 413),
        "dots": ("a.b", npz(**good), 400),
        "slash": ("a/b", npz(**good), 400),
        "traversal": ("..%2F..%2Fetc", npz(**good), 400),
        "look-alike": ("ｖoice", npz(**good), 400),
        "built-in": ("v2/en_speaker_6", npz(**good), 400),
    }
    async with http(srv, "s3cret") as api:
        before = listing(await api.get("/v1/voices"))
        for name, (voice, body, status) in cases.items():
            response = await api.post(f"/v1/voices/{voice}", content=body)
            assert response.status_code == status, (name, response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, name
            assert "Traceback" not in error["message"], name
        assert listing(await api.get("/v1/voices")) == before
    assert list(tmp_path.iterdir()) == []
    async with http(srv) as anonymous:  # the token guards the voices too
        assert (await anonymous.post("/v1/voices/x", content=npz(**good))).status_code == 401
        assert (await anonymous.get("/v1/voices")).status_code == 401
    assert list(tmp_path.iterdir()) == []


async def test_without_a_voices_directory_nothing_can_be_added(server):
    async with http(server) as api:
        response = await api.post("/v1/voices/narrator", content=npz(**preset()))
        assert response.status_code == 404
        assert (await api.delete("/v1/voices/v2/en_speaker_1")).status_code == 404
        assert "narrator" not in listing(await api.get("/v1/voices"))

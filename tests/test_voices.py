"""User voices: hostile .npz uploads are refused cleanly; the store's directory stays consistent."""

from __future__ import annotations

import contextlib
import io
import os
import struct
import time
import tracemalloc
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_engine.bark.prompts import BarkConstants, VoicePrompt
from stream_engine.bark.random_models import random_voice_preset
from stream_engine.errors import InternalError, InvalidRequest, LimitExceeded, UnknownVoice
from stream_engine.voices import (
    MAX_FRAMES,
    MAX_SEMANTIC_TOKENS,
    MAX_VOICE_BYTES,
    VOICE_NAME,
    VoiceStore,
    parse_voice,
)

C = BarkConstants()
BUILTIN = ["v2/en_speaker_6", "narrator"]


def preset(name: str = "a", **override: np.ndarray) -> dict[str, np.ndarray]:
    return {**random_voice_preset(name), **override}


def npz(arrays: dict[str, object], compressed: bool = False) -> bytes:
    buf = io.BytesIO()
    if compressed:
        np.savez_compressed(buf, **arrays)
    else:
        np.savez(buf, **arrays)
    return buf.getvalue()


VALID = npz(preset("valid"))


def same(a: VoicePrompt, b: VoicePrompt) -> bool:
    return all(
        x.dtype == np.int64 and np.array_equal(x, y)
        for x, y in ((a.semantic, b.semantic), (a.coarse, b.coarse), (a.fine, b.fine))
    )


@pytest.fixture
def store(tmp_path: Path) -> VoiceStore:
    s = VoiceStore(tmp_path / "voices", BUILTIN, C)
    s.load()
    s.add("keep", npz(preset("keep")))
    return s


def snapshot(s: VoiceStore) -> tuple[dict[str, bytes], list[str]]:
    return {p.name: p.read_bytes() for p in sorted(s.directory.iterdir())}, s.names()


def assert_refused(s: VoiceStore, name: str, data: bytes, exc: type[Exception]) -> None:
    before = snapshot(s)
    kept = s.get("keep")
    with pytest.raises(exc):
        s.add(name, data)
    assert snapshot(s) == before
    assert s.get("keep") is kept


# -- valid files ---------------------------------------------------------------------------


def test_round_trip(store: VoiceStore) -> None:
    p = preset("b")
    voice = store.add("my-voice_2", npz(p))
    assert (store.directory / "my-voice_2.npz").is_file()
    assert same(voice, VoicePrompt.from_preset(p))
    assert store.names() == ["keep", "my-voice_2"]
    loaded = VoiceStore(store.directory, BUILTIN, C).load()
    assert sorted(loaded) == ["keep", "my-voice_2"]
    assert same(loaded["my-voice_2"], voice)
    assert not [f for f in os.listdir(store.directory) if not f.endswith(".npz")]  # no temp files


def test_lenient_but_clean(store: VoiceStore) -> None:
    """Any integer dtype, byte order, Fortran order, compression, and coarse M != fine M pass;
    the file on disk is re-saved as plain int64 arrays."""
    p = preset("c")
    odd = {
        "semantic_prompt": p["semantic_prompt"].astype(">u2"),
        "coarse_prompt": np.asfortranarray(p["coarse_prompt"][:, :-3].astype(np.int16)),
        "fine_prompt": p["fine_prompt"].astype(np.uint64),
    }
    voice = store.add("odd", npz(odd, compressed=True))
    assert same(voice, VoicePrompt.from_preset(odd))
    with np.load(store.directory / "odd.npz", allow_pickle=False) as f:
        assert sorted(f.files) == ["coarse_prompt", "fine_prompt", "semantic_prompt"]
        assert all(f[k].dtype == np.int64 for k in f.files)


def test_replace_existing(store: VoiceStore) -> None:
    new = preset("other")
    store.add("keep", npz(new))
    assert same(store.get("keep"), VoicePrompt.from_preset(new))
    assert same(VoiceStore(store.directory, BUILTIN, C).load()["keep"], store.get("keep"))


def test_bounds_are_inclusive() -> None:
    edge = {
        "semantic_prompt": np.full(MAX_SEMANTIC_TOKENS, C.semantic_vocab_size - 1),
        "coarse_prompt": np.zeros((2, 1), np.uint8),
        "fine_prompt": np.full((8, MAX_FRAMES), C.codebook_size - 1),
    }
    assert parse_voice(npz(edge), C).fine.shape == (8, MAX_FRAMES)


# -- hostile files -------------------------------------------------------------------------


def zip_of(members: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name case
        with zipfile.ZipFile(buf, "w", method) as zf:
            for name, raw in members.items():
                zf.writestr(name.split("#")[0], raw)  # "#n" suffix: same name again
    return buf.getvalue()


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def npy_header(header: str, body: bytes = b"") -> bytes:
    h = header.encode("latin1") + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(h)) + h + body


def with_member(key: str, raw: bytes) -> bytes:
    return zip_of({f"{k}.npy": raw if k == key else npy(v) for k, v in preset().items()})


P = preset()
HOSTILE: dict[str, tuple[Callable[[], bytes], type[Exception]]] = {
    "pickled object array": (
        lambda: npz(preset(semantic_prompt=np.array([1, "x", None], dtype=object))),
        InvalidRequest,
    ),
    "missing key": (
        lambda: npz({k: v for k, v in P.items() if k != "fine_prompt"}),
        InvalidRequest,
    ),
    "extra key": (lambda: npz({**P, "speaker": np.zeros(3, np.int64)}), InvalidRequest),
    "renamed keys": (lambda: npz({k.upper(): v for k, v in P.items()}), InvalidRequest),
    "repeated member": (
        lambda: zip_of({**{f"{k}.npy": npy(v) for k, v in P.items()}, "fine_prompt.npy#2": b""}),
        InvalidRequest,
    ),
    "float dtype": (
        lambda: npz(preset(semantic_prompt=P["semantic_prompt"] * 1.0)),
        InvalidRequest,
    ),
    "bool dtype": (lambda: npz(preset(coarse_prompt=P["coarse_prompt"] > 5)), InvalidRequest),
    "string dtype": (
        lambda: npz(preset(fine_prompt=P["fine_prompt"].astype("U4"))),
        InvalidRequest,
    ),
    "2-D semantic": (lambda: npz(preset(semantic_prompt=np.zeros((2, 5), int))), InvalidRequest),
    "0-D semantic": (lambda: npz(preset(semantic_prompt=np.array(5))), InvalidRequest),
    "1-D coarse": (lambda: npz(preset(coarse_prompt=np.zeros(10, int))), InvalidRequest),
    "coarse with 3 rows": (
        lambda: npz(preset(coarse_prompt=np.zeros((3, 10), int))),
        InvalidRequest,
    ),
    "fine with 7 rows": (lambda: npz(preset(fine_prompt=np.zeros((7, 10), int))), InvalidRequest),
    "3-D fine": (lambda: npz(preset(fine_prompt=np.zeros((8, 10, 1), int))), InvalidRequest),
    "empty semantic": (lambda: npz(preset(semantic_prompt=np.zeros(0, int))), InvalidRequest),
    "empty coarse": (lambda: npz(preset(coarse_prompt=np.zeros((2, 0), int))), InvalidRequest),
    "empty fine": (lambda: npz(preset(fine_prompt=np.zeros((8, 0), int))), InvalidRequest),
    "too many semantic tokens": (
        lambda: npz(preset(semantic_prompt=np.zeros(MAX_SEMANTIC_TOKENS + 1, int))),
        InvalidRequest,
    ),
    "too many frames": (
        lambda: npz(preset(fine_prompt=np.zeros((8, MAX_FRAMES + 1), int))),
        InvalidRequest,
    ),
    "negative semantic": (
        lambda: npz(preset(semantic_prompt=np.array([1, -1, 2]))),
        InvalidRequest,
    ),
    "semantic == vocab size": (
        lambda: npz(preset(semantic_prompt=np.array([C.semantic_vocab_size]))),
        InvalidRequest,
    ),
    "coarse == codebook size": (
        lambda: npz(preset(coarse_prompt=np.full((2, 4), C.codebook_size))),
        InvalidRequest,
    ),
    "negative fine": (lambda: npz(preset(fine_prompt=np.full((8, 4), -1))), InvalidRequest),
    "uint64 above int64": (
        lambda: npz(preset(fine_prompt=np.full((8, 4), 2**63 + 5, np.uint64))),
        InvalidRequest,
    ),
    "header claims a huge shape": (
        lambda: with_member(
            "semantic_prompt",
            npy_header("{'descr': '<i8', 'fortran_order': False, 'shape': (1099511627776,), }"),
        ),
        InvalidRequest,
    ),
    "header longer than its data": (
        lambda: with_member(
            "semantic_prompt",
            npy_header("{'descr': '<i8', 'fortran_order': False, 'shape': (100,), }", bytes(80)),
        ),
        InvalidRequest,
    ),
    "header is not a literal": (
        lambda: with_member("semantic_prompt", npy_header("__import__('os').system('true')")),
        InvalidRequest,
    ),
    "deeply nested header": (
        lambda: with_member("semantic_prompt", npy_header("[" * 400 + "]" * 400)),
        InvalidRequest,
    ),
    "bzip2 member": (
        lambda: zip_of({f"{k}.npy": npy(v) for k, v in P.items()}, 12),
        InvalidRequest,
    ),
    "lzma member": (lambda: zip_of({f"{k}.npy": npy(v) for k, v in P.items()}, 14), InvalidRequest),
    "not an npy member": (lambda: with_member("coarse_prompt", b"hello"), InvalidRequest),
    "bare npy, not npz": (lambda: npy(P["semantic_prompt"]), InvalidRequest),
    "empty body": (lambda: b"", InvalidRequest),
    "text body": (lambda: b'{"semantic_prompt": [1, 2, 3]}', InvalidRequest),
    "body over 4 MiB": (lambda: VALID + bytes(MAX_VOICE_BYTES), LimitExceeded),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_file_refused(store: VoiceStore, case: str) -> None:
    make, exc = HOSTILE[case]
    data = make()
    assert_refused(store, "keep", data, exc)  # an existing voice is not replaced
    assert_refused(store, "newcomer", data, exc)


def deflated_zeros(n_bytes: int) -> tuple[bytes, int]:
    """A zip holding ``n_bytes`` of zeros as semantic_prompt.npy, built without allocating it,
    plus the offset of the member's entry in the central directory."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for k in ("coarse_prompt", "fine_prompt"):
            zf.writestr(f"{k}.npy", npy(P[k]))
        with zf.open("semantic_prompt.npy", "w") as f:
            chunk = bytes(1 << 20)
            for _ in range(n_bytes >> 20):
                f.write(chunk)
    data = buf.getvalue()
    return data, data.rindex(b"PK\x01\x02")


def test_zip_bomb_refused_quickly_and_cheaply(store: VoiceStore) -> None:
    bomb, _ = deflated_zeros(100 << 20)
    assert len(bomb) < 200_000
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        assert_refused(store, "bomb", bomb, LimitExceeded)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 2.0
    assert peak < 8 << 20


@pytest.mark.parametrize("claimed", [1000, 10 << 20])
def test_zip_lying_about_its_size(store: VoiceStore, claimed: int) -> None:
    """The central directory claims ``claimed`` bytes for a 50 MB member: it is inflated no
    further than the claim (and the budget), then refused."""
    data, entry = deflated_zeros(50 << 20)
    liar = bytearray(data)
    liar[entry + 24 : entry + 28] = struct.pack("<I", claimed)  # uncompressed size
    tracemalloc.start()
    try:
        assert_refused(store, "liar", bytes(liar), InvalidRequest)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < claimed + (4 << 20)


def test_unpacked_budget_is_counted_across_members() -> None:
    raw = {f"{k}.npy": npy(v) for k, v in P.items()}
    total = sum(len(v) for v in raw.values())
    data = zip_of(raw, zipfile.ZIP_DEFLATED)
    assert parse_voice(data, C, max_unpacked_bytes=total)
    with pytest.raises(LimitExceeded):
        parse_voice(data, C, max_unpacked_bytes=total - 1)
    with pytest.raises(LimitExceeded):
        parse_voice(data, C, max_bytes=len(data) - 1)


def refused_cleanly(data: bytes) -> None:
    with contextlib.suppress(InvalidRequest, LimitExceeded):
        parse_voice(data, C)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000) | st.binary(max_size=40).map(lambda b: b"PK\x03\x04" + b))
def test_random_bytes_never_crash(data: bytes) -> None:
    with pytest.raises((InvalidRequest, LimitExceeded)):
        parse_voice(data, C)


SMALL = npz(
    {"semantic_prompt": np.arange(5), "coarse_prompt": np.ones((2, 3)).astype(int)}
    | {"fine_prompt": np.ones((8, 3), np.int16)}
)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_corrupted_valid_files_never_crash(data: st.DataObject) -> None:
    raw = bytearray(data.draw(st.sampled_from([SMALL, npz(P, compressed=True)])))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    refused_cleanly(bytes(raw))  # may still be valid (a changed token id), but never crashes


@pytest.mark.parametrize("data", [SMALL, npz(P, compressed=True)], ids=["stored", "deflated"])
def test_truncated_files_refused(data: bytes) -> None:
    for n in range(0, len(data), max(1, len(data) // 300)):
        with pytest.raises(InvalidRequest):
            parse_voice(data[:n], C)


# -- names ---------------------------------------------------------------------------------

BAD_NAMES = ["../x", "a/b", "a\\b", "a.b", "", "x" * 65, "é", "ｖoice", "a\n", "a b", ".npz"]


@pytest.mark.parametrize("name", [*BAD_NAMES, "v2/en_speaker_6", "narrator"])
def test_bad_or_builtin_name_refused(store: VoiceStore, name: str) -> None:
    assert_refused(store, name, VALID, InvalidRequest)


def test_voice_name_pattern() -> None:
    assert VOICE_NAME.fullmatch("x" * 64) and VOICE_NAME.fullmatch("A-b_9")
    assert not any(VOICE_NAME.fullmatch(n) for n in BAD_NAMES)


def test_names_differing_only_in_case_refused(store: VoiceStore) -> None:
    assert_refused(store, "KEEP", VALID, InvalidRequest)


# -- remove and load -----------------------------------------------------------------------


def test_remove(store: VoiceStore) -> None:
    store.add("gone", VALID)
    store.remove("gone")
    assert store.names() == ["keep"]
    assert not (store.directory / "gone.npz").exists()
    assert sorted(VoiceStore(store.directory, BUILTIN, C).load()) == ["keep"]
    with pytest.raises(UnknownVoice):
        store.get("gone")


@pytest.mark.parametrize(
    ("name", "exc"),
    [("gone", UnknownVoice), ("../keep", UnknownVoice), ("narrator", InvalidRequest)],
)
def test_remove_refused(store: VoiceStore, name: str, exc: type[Exception]) -> None:
    before = snapshot(store)
    with pytest.raises(exc):
        store.remove(name)
    assert snapshot(store) == before


def test_load_skips_bad_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / "voices"
    d.mkdir()
    (d / "good.npz").write_bytes(VALID)
    (d / "corrupt.npz").write_bytes(VALID[: len(VALID) // 2])
    (d / "pickled.npz").write_bytes(HOSTILE["pickled object array"][0]())
    (d / "bad.name.npz").write_bytes(VALID)
    (d / "narrator.npz").write_bytes(VALID)  # would shadow a built-in
    (d / "README.txt").write_text("not a voice")
    (d / ".voice-abc.tmp").write_bytes(VALID[:10])  # left by a crash mid-write
    voices = VoiceStore(d, BUILTIN, C).load()
    assert list(voices) == ["good"]
    assert same(voices["good"], parse_voice(VALID, C))
    assert not (d / ".voice-abc.tmp").exists()
    assert "corrupt.npz" in caplog.text and "bad.name.npz" in caplog.text


def test_load_creates_directory(tmp_path: Path) -> None:
    d = tmp_path / "a" / "b"
    assert VoiceStore(d, BUILTIN, C).load() == {}
    assert d.is_dir()


def test_failed_write_leaves_nothing(store: VoiceStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken)
    assert_refused(store, "keep", npz(preset("new")), InternalError)
    assert_refused(store, "newcomer", VALID, InternalError)

"""User voices: Bark history prompts uploaded as ``.npz`` files, checked and kept in a directory.

A voice file is an ``.npz`` (a zip of ``.npy`` members) with exactly three integer arrays:
``semantic_prompt`` (N,) in [0, semantic_vocab_size), ``coarse_prompt`` (2, M) and
``fine_prompt`` (8, M') in [0, codebook_size). That is the history-prompt format of the original
Bark and of transformers' ``BarkProcessor``.

Uploads are hostile input, so :func:`parse_voice` never hands them to ``np.load``, which would
trust the zip headers for sizes and the ``.npy`` header for the allocation it makes:

* the body is capped (``max_bytes``); members must be stored or deflated (bz2/lzma members
  cannot be inflated in bounded steps); the sum of the members' declared sizes is capped
  (``max_unpacked_bytes``) before anything is inflated, and each member is then read through
  ``zipfile`` with the remaining byte budget, so a header that lies about its size cannot
  inflate past the cap either (zip bombs cost at most the budget);
* each ``.npy`` header is parsed on its own: object dtypes (pickles) are refused without
  unpickling anything, only signed/unsigned integer dtypes pass (bool and floats do not), the
  shape is bounded before any array exists and must match the data's length exactly;
* keys, shapes and token ranges are checked, so that the models never index out of range.

Anything malformed raises :class:`InvalidRequest`; anything too big :class:`LimitExceeded`.
transformers validates only the keys and the number of dimensions; the original Bark also
asserts that coarse frames ~ 1.5 x semantic tokens, which transformers and our prompts
(:func:`stream_engine.bark.prompts.coarse_histories` trims any lengths) do not need, so coarse
and fine frame counts may differ from each other and from that ratio.

:class:`VoiceStore` keeps the valid voices as ``NAME.npz`` files, re-saved from the checked
arrays (never the uploaded bytes), written atomically. Its methods may run in worker threads
(``asyncio.to_thread``): a lock keeps the directory and the in-memory dict in step.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import tempfile
import threading
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Final

import numpy as np
from numpy.lib import format as npy

from stream_engine.bark.prompts import BarkConstants, VoicePrompt
from stream_engine.errors import InternalError, InvalidRequest, LimitExceeded, UnknownVoice

log = logging.getLogger(__name__)

VOICE_NAME: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")  # use .fullmatch; ASCII only
MAX_VOICE_BYTES: Final = 4 << 20  # an uploaded .npz (real presets are ~30-100 KiB)
MAX_UNPACKED_BYTES: Final = 16 << 20  # all members inflated (the largest valid file: ~0.7 MiB)
MAX_SEMANTIC_TOKENS: Final = 4096  # ~82 s of speech at 49.9 tokens/s; Bark reads the last 256
MAX_FRAMES: Final = 8192  # ~109 s at 75 frames/s; Bark reads the last 315 (coarse) / 512 (fine)
KEYS: Final = ("semantic_prompt", "coarse_prompt", "fine_prompt")
_CHUNK: Final = 1 << 20  # bytes inflated per read
_TMP_PREFIX, _TMP_SUFFIX = ".voice-", ".tmp"  # never "*.npz", so load() cannot pick one up


def _shorten(text: str, n: int = 120) -> str:
    # member names and parser messages come from the upload: keep error messages short
    return text if len(text) <= n else text[: n - 3] + "..."


def _read_members(data: bytes, max_unpacked: int) -> dict[str, bytes]:
    """The archive's members by key, inflated within ``max_unpacked`` bytes in all."""
    budget = max_unpacked
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = zf.infolist()
        keys = [i.filename.removesuffix(".npy") for i in infos]
        missing, extra = [k for k in KEYS if k not in keys], sorted(set(keys) - set(KEYS))
        if missing or extra:
            raise InvalidRequest(
                f"a voice file holds exactly the arrays {', '.join(KEYS)}; missing: "
                f"{', '.join(missing) or 'none'}; extra: {_shorten(', '.join(extra)) or 'none'}"
            )
        if len(keys) != len(set(keys)):
            raise InvalidRequest("a voice file holds each array once; this one repeats some")
        # bz2 and lzma members are inflated whole, whatever read() asks for: refuse them (np.savez
        # stores, np.savez_compressed deflates, and deflate honours read()'s bound)
        if any(i.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) for i in infos):
            raise InvalidRequest(
                "voice file members must be stored or deflated, as np.savez writes"
            )
        if sum(i.file_size for i in infos) > budget:
            raise LimitExceeded(f"voice file inflates past {max_unpacked} bytes")
        members = {}
        for key, info in zip(keys, infos, strict=True):
            # deflate inflates only about what read() asks for, whatever the header claims, and
            # stops at the claimed size (a short claim then fails the CRC check): small reads keep
            # a lying member to its claim plus one chunk, a bomb to the budget plus one chunk
            chunks = []
            with zf.open(info) as f:
                while chunk := f.read(_CHUNK):
                    chunks.append(chunk)
                    budget -= len(chunk)
                    if budget < 0:
                        raise LimitExceeded(f"voice file inflates past {max_unpacked} bytes")
            members[key] = b"".join(chunks)
        return members


def _read_array(key: str, raw: bytes, lead: int, max_len: int, vocab: int) -> np.ndarray:
    """One ``.npy`` member as int64, shape (lead, 1..max_len) or (1..max_len,) if lead is 0."""
    f = io.BytesIO(raw)
    version = npy.read_magic(f)
    if version not in ((1, 0), (2, 0)):
        raise InvalidRequest(f"{key}: unsupported .npy version {version}")
    read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
    shape, fortran, dtype = read_header(f, max_header_size=1024)
    if dtype.hasobject:
        raise InvalidRequest(f"{key}: object arrays (pickles) are not accepted")
    if dtype.kind not in ("i", "u"):  # "b" (bool), "f", "c", "V", "U"... are not token ids
        raise InvalidRequest(f"{key} must hold integers, not {_shorten(str(dtype))}")
    want, n = ("(N,)", "N") if lead == 0 else (f"({lead}, M)", "M")
    ok_lead = len(shape) == 1 if lead == 0 else len(shape) == 2 and shape[0] == lead
    if not ok_lead or not 1 <= shape[-1] <= max_len:
        raise InvalidRequest(
            f"{key} has shape {_shorten(str(shape))}; want {want} with 1 <= {n} <= {max_len}"
        )
    body = raw[f.tell() :]
    if len(body) != int(np.prod(shape)) * dtype.itemsize:
        raise InvalidRequest(f"{key}: data length does not match its header")
    arr = np.frombuffer(body, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    # compare in the file's own dtype: a uint64 above 2**63 would wrap when cast first
    if arr.min() < 0 or arr.max() >= vocab:
        raise InvalidRequest(f"{key} holds ids outside [0, {vocab})")
    return np.ascontiguousarray(arr, dtype=np.int64)


def parse_voice(
    data: bytes,
    consts: BarkConstants,
    *,
    max_bytes: int = MAX_VOICE_BYTES,
    max_unpacked_bytes: int = MAX_UNPACKED_BYTES,
) -> VoicePrompt:
    """Check an uploaded ``.npz`` voice file; raise InvalidRequest / LimitExceeded if it is bad."""
    if len(data) > max_bytes:
        raise LimitExceeded(f"voice file is {len(data)} bytes; the limit is {max_bytes}")
    c = consts
    try:
        members = _read_members(data, max_unpacked_bytes)
        return VoicePrompt(
            semantic=_read_array(
                KEYS[0], members[KEYS[0]], 0, MAX_SEMANTIC_TOKENS, c.semantic_vocab_size
            ),
            coarse=_read_array(
                KEYS[1], members[KEYS[1]], c.n_coarse_codebooks, MAX_FRAMES, c.codebook_size
            ),
            fine=_read_array(
                KEYS[2], members[KEYS[2]], c.n_fine_codebooks, MAX_FRAMES, c.codebook_size
            ),
        )
    except (InvalidRequest, LimitExceeded):
        raise
    except Exception as e:
        # zipfile, zlib/bz2/lzma and numpy's header parser raise many types (BadZipFile,
        # zlib.error, EOFError, ValueError, SyntaxError, ...) on malformed bytes: all mean "bad file"
        raise InvalidRequest(
            f"not a valid .npz voice file ({type(e).__name__}: {_shorten(str(e))})"
        ) from e


class VoiceStore:
    """User voices kept as ``NAME.npz`` in one directory, mirrored in memory."""

    def __init__(
        self, directory: str | os.PathLike[str], builtin: Iterable[str], consts: BarkConstants
    ) -> None:
        self.directory = Path(directory)
        self._builtin = frozenset(builtin)
        self._consts = consts
        self._voices: dict[str, VoicePrompt] = {}
        self._lock = threading.Lock()  # one writer at a time, even from worker threads

    def load(self) -> dict[str, VoicePrompt]:
        """(Re)read the directory, creating it if missing; bad files are skipped with a warning."""
        with self._lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            voices: dict[str, VoicePrompt] = {}
            for path in sorted(self.directory.iterdir()):
                if path.name.startswith(_TMP_PREFIX) and path.name.endswith(_TMP_SUFFIX):
                    with contextlib.suppress(OSError):  # left by a crash mid-write
                        path.unlink()
                    continue
                if path.suffix != ".npz":
                    continue
                if not VOICE_NAME.fullmatch(path.stem) or path.stem in self._builtin:
                    log.warning("skipping voice file %s: bad or built-in name", path)
                    continue
                try:
                    with path.open("rb") as f:
                        data = f.read(MAX_VOICE_BYTES + 1)
                    voices[path.stem] = parse_voice(data, self._consts)
                except (OSError, InvalidRequest, LimitExceeded) as e:
                    log.warning("skipping voice file %s: %s", path, e)
            self._voices = voices
            return dict(voices)

    def names(self) -> list[str]:
        return sorted(self._voices)

    def get(self, name: str) -> VoicePrompt:
        try:
            return self._voices[name]
        except KeyError:
            raise UnknownVoice(f"unknown user voice {name!r}") from None

    def add(self, name: str, data: bytes) -> VoicePrompt:
        """Check ``name`` and ``data``, then save the voice (replacing a user voice of that name)."""
        if not isinstance(name, str) or not VOICE_NAME.fullmatch(name):
            raise InvalidRequest(
                f"invalid voice name {name!r}: use 1-64 ASCII letters, digits, '_' or '-'"
            )
        if name in self._builtin:
            raise InvalidRequest(f"{name!r} is a built-in voice; choose another name")
        voice = parse_voice(data, self._consts)  # everything is checked before the disk is touched
        with self._lock:
            # "Ab" and "ab" would be one file on a case-insensitive file system
            if any(n.lower() == name.lower() and n != name for n in self._voices):
                raise InvalidRequest(f"voice {name!r} differs from an existing one only in case")
            self._write(name, voice)
            self._voices[name] = voice
        self._sync_directory()
        return voice

    def remove(self, name: str) -> None:
        if name in self._builtin:
            raise InvalidRequest(f"{name!r} is a built-in voice and cannot be deleted")
        with self._lock:
            if name not in self._voices:  # only valid names get in, so the path below is safe
                raise UnknownVoice(f"unknown user voice {name!r}")
            try:
                (self.directory / f"{name}.npz").unlink(missing_ok=True)
            except OSError as e:
                raise InternalError(f"could not delete voice {name!r}: {e}") from e
            del self._voices[name]
        self._sync_directory()

    def _write(self, name: str, voice: VoicePrompt) -> None:
        """Temp file in the same directory, fsync, rename over ``NAME.npz``: all or nothing."""
        try:
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=_TMP_PREFIX, suffix=_TMP_SUFFIX)
        except OSError as e:
            raise InternalError(f"could not save voice {name!r}: {e}") from e
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(  # plain int64 arrays: nothing to pickle
                    f,
                    semantic_prompt=voice.semantic,
                    coarse_prompt=voice.coarse,
                    fine_prompt=voice.fine,
                )
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.directory / f"{name}.npz")
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(e, OSError):
                raise InternalError(f"could not save voice {name!r}: {e}") from e
            raise

    def _sync_directory(self) -> None:
        # makes the rename / unlink itself durable; the change has happened either way, so a
        # failure here is logged rather than reported as a failed request
        try:
            fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            log.warning("could not fsync voice directory %s: %s", self.directory, e)

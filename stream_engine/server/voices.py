"""The voices a server offers, and ``/v1/voices``.

Three kinds (``GET /v1/voices`` says which is which):

* built in: the model's presets;
* added: Bark history prompts users bring, ``NAME.npz`` in ``--voices DIR``
  (:class:`~stream_engine.voices.VoiceStore` checks and keeps them); ``POST`` and ``DELETE
  /v1/voices/{name}`` add and remove them, only when the server has such a directory;
* aliases (``--voice-alias alloy=v2/en_speaker_6``): other names for the voices above, for
  clients that only know OpenAI's names; the speech endpoint reads them.

A voice added here is in the next ``hello`` and usable at once by new streams (on open
connections too) and requests; a stream keeps the voice it opened with if it is deleted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from ..bark.prompts import VoicePrompt
from ..engine import Engine
from ..errors import InvalidOption, LimitExceeded, StreamEngineError, UnknownVoice
from ..voices import MAX_VOICE_BYTES, VoiceStore
from .http_errors import ApiError


class VoiceRegistry:
    def __init__(
        self,
        engine: Engine,
        directory: str | Path | None = None,
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        self.builtin = frozenset(engine.voices)
        self.prompts: dict[str, VoicePrompt] = dict(engine.voices)  # built in and added
        self.store: VoiceStore | None = None
        if directory is not None:
            self.store = VoiceStore(directory, self.builtin, engine.consts)
            self.prompts.update(self.store.load())
        self.aliases = dict(aliases or {})
        for alias, target in self.aliases.items():
            if alias in self.prompts:
                raise InvalidOption(f"voice alias {alias!r} is already a voice's name")
            if target not in self.prompts:
                raise InvalidOption(f"voice alias {alias!r} names an unknown voice {target!r}")

    def describe(self) -> list[dict[str, Any]]:
        voices: list[dict[str, Any]] = [
            {"id": name, "object": "voice", "kind": "builtin" if name in self.builtin else "added"}
            for name in sorted(self.prompts)
        ]
        voices += [
            {"id": alias, "object": "voice", "kind": "alias", "voice": target}
            for alias, target in sorted(self.aliases.items())
        ]
        return voices

    async def add(self, name: str, data: bytes) -> None:
        if self.store is None:
            raise ApiError(404, "this server keeps no added voices (see serve --voices)")
        if name in self.aliases:
            raise ApiError(
                400, f"{name!r} is a voice alias; choose another name", code="bad_request"
            )
        self.prompts[name] = await asyncio.to_thread(self.store.add, name, data)

    async def remove(self, name: str) -> None:
        if self.store is None:
            raise ApiError(404, "this server keeps no added voices (see serve --voices)")
        await asyncio.to_thread(self.store.remove, name)
        self.prompts.pop(name, None)


def _registry(request: Request) -> VoiceRegistry:
    service = request.app.state.service
    denied = service.check_access(request.headers)
    if denied is not None:
        raise ApiError(denied.status, denied.message, code="invalid_api_key")
    registry: VoiceRegistry = service.voices
    return registry


async def list_voices(request: Request) -> Response:
    try:
        registry = _registry(request)
    except ApiError as exc:
        return exc.response()
    return JSONResponse({"object": "list", "data": registry.describe()})


async def add_voice(request: Request) -> Response:
    name = request.path_params["name"]
    try:
        registry = _registry(request)
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_VOICE_BYTES:
                raise ApiError(413, f"a voice file may hold {MAX_VOICE_BYTES} bytes", code="limit")
        await registry.add(name, bytes(data))
    except ClientDisconnect:
        return Response(status_code=400)
    except ApiError as exc:
        return exc.response()
    except LimitExceeded as exc:  # the file, or what it inflates to, is too large
        return ApiError(413, str(exc), code=exc.code).response()
    except StreamEngineError as exc:
        return ApiError.of(exc, "name" if "name" in str(exc) else None).response()
    return JSONResponse({"id": name, "object": "voice", "kind": "added"}, 201)


async def remove_voice(request: Request) -> Response:
    name = request.path_params["name"]
    try:
        await _registry(request).remove(name)
    except ApiError as exc:
        return exc.response()
    except UnknownVoice as exc:
        return ApiError(404, str(exc), "name", exc.code).response()
    except StreamEngineError as exc:
        return ApiError.of(exc).response()
    return JSONResponse({"id": name, "object": "voice", "deleted": True})

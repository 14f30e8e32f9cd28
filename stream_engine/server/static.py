"""The browser client's files (``clients/browser/``), served at ``/`` and ``/NAME.EXT``.

Starlette's :class:`~starlette.staticfiles.StaticFiles` does the serving (paths, links that lead
outside the folder, conditional requests); this module narrows it to the page's own files:
names directly inside the folder, with one of :data:`TYPES`' extensions, and adds the headers
the page wants (its content security policy, no MIME sniffing, no caching).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

FOLDER = Path(__file__).resolve().parents[2] / "clients" / "browser"
TYPES = {  # the only files served, by extension
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
# The page loads nothing but its own files and talks only to the server it came from.
CSP = (
    "default-src 'self'; connect-src 'self'; img-src 'self' data:; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'self'"
)


class BrowserFiles(StaticFiles):
    def __init__(self, folder: Path = FOLDER) -> None:
        super().__init__(directory=folder, html=True, check_dir=False)

    async def get_response(self, path: str, scope: Scope) -> Response:
        name = "index.html" if path in ("", ".") else path
        if not _NAME.fullmatch(name) or os.path.splitext(name)[1] not in TYPES:
            raise HTTPException(404)
        return await super().get_response(name, scope)

    def file_response(self, full_path: Any, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(full_path, *args, **kwargs)
        suffix = os.path.splitext(str(full_path))[1]
        if suffix not in TYPES:  # a link inside the folder to a file of another type
            raise HTTPException(404)
        response.headers["Content-Type"] = TYPES[suffix]
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Cache-Control"] = "no-store"
        if suffix == ".html":
            response.headers["Content-Security-Policy"] = CSP
        return response

"""Every exception stream-engine raises on purpose.

The tree, with the protocol error code each maps to (see ``docs/protocol.md``)::

    StreamEngineError                      internal
    ├── InvalidRequest                     bad_request
    │   ├── EmptyText                      bad_request
    │   ├── TextTooLong                    text_too_long
    │   ├── UnknownVoice                   unknown_voice
    │   ├── InvalidOption                  bad_request
    │   └── UnsupportedFormat              unsupported_format
    ├── ModelLoadError                     internal
    │   ├── ModelNotFound                  internal
    │   └── GpuCheckFailed                 internal
    ├── Busy                               busy
    ├── LimitExceeded                      limit
    ├── Cancelled                          (not an error on the wire: ``cancelled``)
    ├── InternalError                      internal
    └── ServerError                        (client side) the code the server sent

Code inside the package raises these (never a bare ``ValueError``) for anything a caller
can get wrong, so that the server can turn each into one error message for one stream.
:class:`ServerError` goes the other way: the client (:mod:`stream_engine.client`) raises it
for an ``error`` message it received.
"""

from __future__ import annotations

#: The HTTP status that answers each protocol error code (the speech endpoint, and the
#: integrations' errors for frameworks that speak HTTP statuses).
HTTP_STATUS = {
    "bad_request": 400,
    "unknown_voice": 400,
    "unsupported_format": 400,
    "text_too_long": 400,
    "limit": 429,
    "busy": 503,
    "internal": 500,
}


class StreamEngineError(Exception):
    """Base of every error raised on purpose by stream-engine."""

    code: str = "internal"


class InvalidRequest(StreamEngineError):
    """The request itself is wrong: the caller can fix it."""

    code = "bad_request"


class EmptyText(InvalidRequest):
    """The text is empty or holds only whitespace."""


class TextTooLong(InvalidRequest):
    """The text needs more tokens than Bark reads in one generation (256)."""

    code = "text_too_long"


class UnknownVoice(InvalidRequest):
    """The voice is not in the model's registry of presets."""

    code = "unknown_voice"


class InvalidOption(InvalidRequest):
    """A generation option has the wrong type or is out of range."""


class UnsupportedFormat(InvalidRequest):
    """An audio format or sample rate the engine cannot encode."""

    code = "unsupported_format"


class ModelLoadError(StreamEngineError):
    """A model could not be loaded or saved."""


class ModelNotFound(ModelLoadError):
    """The model id is neither a local directory, a reachable hub model, nor ``random:*``."""


class GpuCheckFailed(ModelLoadError):
    """A load-time GPU check failed under ``strict_gpu`` (without it, the engine falls back)."""


class Busy(StreamEngineError):
    """The engine has no room for more work right now; try again later."""

    code = "busy"


class LimitExceeded(StreamEngineError):
    """A configured limit (message size, streams, rate) was exceeded."""

    code = "limit"


class Cancelled(StreamEngineError):
    """The request was cancelled before it finished."""

    code = "cancelled"


class InternalError(StreamEngineError):
    """A failure inside the engine; details go to the server log, not to the client."""


class ServerError(StreamEngineError):
    """An ``error`` message from the server, raised by the client.

    ``code`` is the protocol's code (``bad_request``, ``unknown_voice``, ``unsupported_format``,
    ``text_too_long``, ``busy``, ``limit``, ``internal``), or ``connection_closed`` when the
    connection ended before the stream did. ``id`` is the stream's id (None: the connection's).
    """

    def __init__(self, code: str, message: str, id: str | int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.id = id

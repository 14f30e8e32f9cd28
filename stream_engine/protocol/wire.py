"""What both sides of protocol v1 agree on: the endpoint, the frame header, the message fields.

``docs/protocol.md`` is the specification.
"""

from __future__ import annotations

import struct
from typing import Final

PROTOCOL_VERSION: Final = 1
PATH: Final = "/v1/tts"


def endpoint(url: str) -> str:
    """``ws://HOST:PORT`` (or the endpoint's own URL) -> the endpoint's URL."""
    url = url.rstrip("/")
    return url if url.endswith(PATH) else url + PATH


#: Binary frame header: stream number, segment index, sequence number (uint32, little-endian).
HEADER: Final = struct.Struct("<III")
UINT32_MAX: Final = 0xFFFF_FFFF
#: Integer ids are limited to what a JavaScript number holds exactly.
MAX_INT_ID: Final = 2**53 - 1
#: Longest error message sent to a client (longer ones are cut, ending in "...").
MAX_MESSAGE_CHARS: Final = 200

StreamId = str | int

ERROR_CODES: Final = (
    "bad_request",
    "unknown_voice",
    "unsupported_format",
    "text_too_long",
    "busy",
    "limit",
    "internal",
)
OPTION_KEYS: Final = ("text_temp", "waveform_temp", "top_k", "top_p", "min_eos_p", "seed")
OPEN_KEYS: Final = ("voice", "format", "sample_rate", "options", "early_audio")
MESSAGE_KEYS: Final = {
    "speak": frozenset({"type", "id", "text", "final", *OPEN_KEYS}),
    "flush": frozenset({"type", "id"}),
    "cancel": frozenset({"type", "id"}),
}
#: The server's message types; the last three end a stream.
SERVER_TYPES: Final = ("hello", "started", "segment", "segment_end", "done", "cancelled", "error")
TERMINAL: Final = ("done", "cancelled", "error")
#: Bytes per sample of each format's payload: binary frames never split a sample.
SAMPLE_BYTES: Final = {"pcm_s16le": 2, "pcm_f32le": 4, "mulaw": 1, "opus": 1}

"""Protocol v1 (``docs/protocol.md``), both sides, without I/O.

* :mod:`.wire`: what both sides agree on (the endpoint, the binary frame header, the fields);
* :mod:`.server`: :class:`Session`, the server's side of one connection;
* :mod:`.client`: :class:`ClientSession`, the client's side of one connection.
"""

from .client import (
    AudioReceived,
    ClientSession,
    Hello,
    SegmentEnded,
    SegmentStarted,
    Started,
    StreamCancelled,
    StreamDone,
    StreamError,
    Violation,
)
from .server import (
    AppendText,
    CancelStream,
    Event,
    FlushStream,
    OpenStream,
    ProtocolLimits,
    Session,
    StreamSpec,
)
from .wire import (
    ERROR_CODES,
    HEADER,
    MAX_INT_ID,
    MAX_MESSAGE_CHARS,
    MESSAGE_KEYS,
    OPEN_KEYS,
    OPTION_KEYS,
    PATH,
    PROTOCOL_VERSION,
    SAMPLE_BYTES,
    SERVER_TYPES,
    TERMINAL,
    UINT32_MAX,
    StreamId,
    endpoint,
)

__all__ = [
    "ERROR_CODES",
    "HEADER",
    "MAX_INT_ID",
    "MAX_MESSAGE_CHARS",
    "MESSAGE_KEYS",
    "OPEN_KEYS",
    "OPTION_KEYS",
    "PATH",
    "PROTOCOL_VERSION",
    "SAMPLE_BYTES",
    "SERVER_TYPES",
    "TERMINAL",
    "UINT32_MAX",
    "AppendText",
    "AudioReceived",
    "CancelStream",
    "ClientSession",
    "Event",
    "FlushStream",
    "Hello",
    "OpenStream",
    "ProtocolLimits",
    "SegmentEnded",
    "SegmentStarted",
    "Session",
    "Started",
    "StreamCancelled",
    "StreamDone",
    "StreamError",
    "StreamId",
    "StreamSpec",
    "Violation",
    "endpoint",
]

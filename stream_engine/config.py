"""Typed settings, each with its default, its rule and what it does, in one place.

:class:`GenerationOptions` are per request (what a client may choose); :class:`EngineConfig`
(per engine), :class:`ServerConfig` (the server), :class:`ProtocolLimits` (per connection) and
:class:`SegmenterConfig` (how text is cut) are what an operator chooses, with ``stream-engine
serve`` flags or a TOML file (:func:`load_settings`).

Each field is declared with :func:`setting`: its default, its bounds or choices and its help
text. Its type is the annotation. :func:`check_settings` validates any of these dataclasses
from that alone (each calls it on construction) and raises
:class:`~stream_engine.errors.InvalidOption` with a message that names the field; the CLI
derives its flags from the same fields.
"""

from __future__ import annotations

import functools
import math
import os
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Final, TypeVar, Union, get_args, get_origin, get_type_hints

from .errors import InvalidOption

__all__ = [
    "CPU_DECODE_KERNELS",
    "DEFAULT_ABBREVIATIONS",
    "GRAPH_BATCHES",
    "SECTIONS",
    "EngineConfig",
    "GenerationOptions",
    "ProtocolLimits",
    "Rule",
    "SegmenterConfig",
    "ServerConfig",
    "Setting",
    "Settings",
    "check_settings",
    "load_settings",
    "setting",
    "setting_fields",
    "settings_from",
]

# -- declaring and validating settings --------------------------------------------------------

T = TypeVar("T")


@dataclass(frozen=True)
class Rule:
    """What a field allows beyond its type, and how it reads as a command-line flag."""

    help: str = ""
    lo: float | None = None  # numbers: the least value allowed (excluded with lo_open)
    hi: float | None = None  # numbers: the largest value allowed
    lo_open: bool = False
    choices: tuple[str, ...] | None = None  # strings: the values allowed
    nonempty: bool = False  # strings: "" is refused
    flag: str | None = None  # the flag's name when not --field-name
    metavar: str | None = None
    sep: str | None = None  # lists of strings: one flag value split here (else repeatable)


def setting(
    default: T,
    help: str = "",
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    choices: tuple[str, ...] | None = None,
    nonempty: bool = False,
    flag: str | None = None,
    metavar: str | None = None,
    sep: str | None = None,
) -> T:
    """A dataclass field with its default and its :class:`Rule` (in the field's metadata)."""
    rule = Rule(help, lo, hi, lo_open, choices, nonempty, flag, metavar, sep)
    value: T = field(default=default, metadata={"rule": rule})
    return value


# The shapes of type a setting may have (``optional``: ``X | None``).
KINDS: Final = ("bool", "int", "float", "str", "strings", "pairs", "set")


@dataclass(frozen=True)
class Setting:
    """One field of a settings dataclass, as the validator and the CLI see it."""

    name: str
    kind: str  # one of KINDS
    optional: bool  # None is allowed
    default: Any
    rule: Rule


def _kind(cls: type, name: str, tp: Any) -> tuple[str, bool]:
    optional = False
    if get_origin(tp) in (Union, types.UnionType):
        members = [a for a in get_args(tp) if a is not type(None)]
        if len(members) != 1:
            raise TypeError(f"{cls.__name__}.{name}: unsupported type {tp}")
        optional, tp = True, members[0]
    simple = {bool: "bool", int: "int", float: "float", str: "str"}
    if tp in simple:
        return simple[tp], optional
    origin, args = get_origin(tp), get_args(tp)
    if origin is tuple and args == (str, ...):
        return "strings", optional
    if origin is tuple and len(args) == 2 and args[1] is ... and get_args(args[0]) == (str, str):
        return "pairs", optional
    if origin is frozenset and args == (str,):
        return "set", optional
    raise TypeError(f"{cls.__name__}.{name}: unsupported type {tp}")


def setting_fields(cls: type) -> tuple[Setting, ...]:
    """The fields of a settings dataclass with their kind and rule."""
    return _setting_fields(cls)


@functools.cache
def _setting_fields(cls: Any) -> tuple[Setting, ...]:
    hints = get_type_hints(cls)
    out = []
    for f in fields(cls):
        kind, optional = _kind(cls, f.name, hints[f.name])
        rule = f.metadata.get("rule", Rule())
        out.append(Setting(f.name, kind, optional, f.default, rule))
    return tuple(out)


def _range_text(rule: Rule, integer: bool) -> str:
    lo, hi = rule.lo, rule.hi
    if lo is not None and hi is not None:
        return f"in {'(' if rule.lo_open else '['}{lo}, {hi}]"
    if hi is None and lo is not None:
        if integer and lo == 1 and not rule.lo_open:
            return "a positive integer"
        if lo == 0 and rule.lo_open:
            return "a positive number"
        return f"{'>' if rule.lo_open else '>='} {lo}"
    return f"<= {hi}"


def _in_range(value: float, rule: Rule) -> bool:
    if rule.lo is not None and (value < rule.lo or (rule.lo_open and value == rule.lo)):
        return False
    return rule.hi is None or value <= rule.hi


def _check(s: Setting, value: Any) -> Any:
    """``value`` if it is allowed for ``s`` (lists as tuples, a mapping of pairs as pairs)."""
    name, rule = s.name, s.rule
    if value is None and s.optional:
        return None
    if s.kind == "bool":
        if not isinstance(value, bool):
            raise InvalidOption(f"{name} must be true or false, got {value!r}")
    elif s.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidOption(f"{name} must be an integer, got {value!r}")
        if not _in_range(value, rule):
            raise InvalidOption(f"{name} must be {_range_text(rule, True)}, got {value!r}")
    elif s.kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidOption(f"{name} must be a finite number, got {value!r}")
        if isinstance(value, int) and abs(value) > 2**53:  # math.isfinite overflows on huge ints
            raise InvalidOption(
                f"{name} must be {_range_text(rule, False)}, got a {value.bit_length()}-bit integer"
            )
        if not math.isfinite(value):
            raise InvalidOption(f"{name} must be a finite number, got {value!r}")
        if not _in_range(value, rule):
            raise InvalidOption(f"{name} must be {_range_text(rule, False)}, got {value!r}")
    elif s.kind == "str":
        if not isinstance(value, str) or (rule.nonempty and not value):
            what = "a non-empty string" if rule.nonempty else "a string"
            raise InvalidOption(f"{name} must be {what}, got {value!r}")
        if rule.choices is not None and value not in rule.choices:
            raise InvalidOption(f"{name} must be one of {', '.join(rule.choices)}, got {value!r}")
    elif s.kind == "strings":
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise InvalidOption(f"{name} must be a list of strings, got {value!r}")
        return tuple(value)
    elif s.kind == "pairs":
        if isinstance(value, Mapping):
            value = tuple(value.items())
        if not isinstance(value, list | tuple) or not all(
            isinstance(p, list | tuple) and len(p) == 2 and all(isinstance(v, str) for v in p)
            for p in value
        ):
            raise InvalidOption(
                f"{name} must be pairs of strings (a table of strings), got {value!r}"
            )
        return tuple((a, b) for a, b in value)
    elif s.kind == "set":
        if not isinstance(value, frozenset | set | list | tuple) or not all(
            isinstance(v, str) for v in value
        ):
            raise InvalidOption(f"{name} must be a set of strings, got {value!r}")
        return frozenset(value)
    return value


def check_settings(obj: Any) -> None:
    """Validate every field of a settings dataclass by its type and :class:`Rule`.

    Raises :class:`InvalidOption` naming the first bad field. Lists become tuples (and sets
    frozensets; a mapping of strings becomes pairs), so that the object stays hashable.
    """
    for s in setting_fields(type(obj)):
        value = getattr(obj, s.name)
        checked = _check(s, value)
        if checked is not value:
            object.__setattr__(obj, s.name, checked)


# -- per request ------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationOptions:
    """How one request is generated. Defaults are Bark's own (``generate_audio``)."""

    text_temp: float = setting(
        0.7, "semantic model temperature (Bark's text_temp)", lo=0.0, hi=5.0, lo_open=True
    )
    coarse_temp: float = setting(
        0.7, "coarse model temperature (Bark's waveform_temp)", lo=0.0, hi=5.0, lo_open=True
    )
    fine_temp: float = setting(
        0.5,
        "fine model temperature; 1.0 means argmax, as in transformers",
        lo=0.0,
        hi=5.0,
        lo_open=True,
    )
    top_k: int | None = setting(
        None, "keep the k likeliest tokens (semantic and coarse); None is off", lo=1, hi=1_000_000
    )
    top_p: float | None = setting(
        None, "nucleus sampling (semantic and coarse); None is off", lo=0.0, hi=1.0, lo_open=True
    )
    min_eos_p: float | None = setting(
        None,
        "end when P(EOS) exceeds this (Bark suggests 0.05-0.2)",
        lo=0.0,
        hi=1.0,
        lo_open=True,
    )
    max_semantic_tokens: int | None = setting(
        None, "cap on semantic tokens; None: 768 (rule for random:*)", lo=1, hi=768
    )
    seed: int | None = setting(
        None, "makes sampling reproducible; None draws one", lo=0, hi=2**31 - 1
    )
    greedy: bool = setting(
        False, "argmax everywhere (semantic, coarse and fine): the exactness mode"
    )

    def __post_init__(self) -> None:
        check_settings(self)

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> GenerationOptions:
        """Build from keyword options, accepting Bark's ``waveform_temp`` for ``coarse_temp``."""
        options = dict(options)
        if "waveform_temp" in options:
            options["coarse_temp"] = options.pop("waveform_temp")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise InvalidOption(f"unknown option(s) {unknown}; known: {sorted(known)}")
        return cls(**options)

    def with_seed(self, seed: int) -> GenerationOptions:
        return replace(self, seed=seed)


# -- per engine -------------------------------------------------------------------------------

CPU_DECODE_KERNELS = ("auto", "avx2", "onednn", "mkl")  # see stream_engine.bark.cpu_kernels
GRAPH_BATCHES = ("powers", "slots")  # batch sizes with decode graphs: see runtime/cuda.py


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs. Sizes are fixed at start: caches and buffers are allocated once."""

    semantic_slots: int = setting(8, "requests the semantic stage decodes together", lo=1, hi=4096)
    coarse_slots: int = setting(8, "requests the coarse stage decodes together", lo=1, hi=4096)
    fine_batch: int = setting(
        8, "requests whose fine windows run in one forward pass", lo=1, hi=4096
    )
    codec_batch: int = setting(4, "requests decoded by EnCodec per step", lo=1, hi=4096)
    attn: str = setting(
        "sdpa",
        "attention implementation (flash_attention_2: CUDA with flash-attn only)",
        choices=("sdpa", "eager", "flash_attention_2"),
    )
    cuda_graphs: bool = setting(
        True, "on CUDA: capture each decode step (forward pass and sampling) per shape bucket"
    )
    cuda_graph_batches: str = setting(
        "powers",
        "batch sizes that get decode graphs: powers (1, 2, 4, ..., slots: a step pads to the "
        "next one) or slots (one: every step runs all slots)",
        choices=GRAPH_BATCHES,
    )
    gpu_self_check: bool = setting(
        True,
        "on CUDA at load: choose attention kernels and check the decode graphs against eager "
        "decode; what fails falls back (see strict_gpu)",
    )
    # avx2: linears near the memory bandwidth and a per-slot attention, built on first use;
    # onednn: a packed copy of the weights; mkl: plain F.linear; auto: avx2 if it builds here
    cpu_decode_kernel: str = setting(
        "auto",
        "on CPU in float32, the kernels of decode steps: avx2 (built on first use), onednn, "
        "mkl, or auto (avx2 if it builds here, else onednn)",
        choices=CPU_DECODE_KERNELS,
    )
    strict_gpu: bool = setting(
        False,
        "turn the load's fallbacks (flash_attention_2 -> sdpa, graphs -> eager, ...) into "
        "errors: for tests and benchmarks that must run what they asked for",
    )
    max_queue: int = setting(
        256, "requests waiting for a stage before submit() raises Busy", lo=1, hi=4096
    )

    def __post_init__(self) -> None:
        check_settings(self)


# -- the server -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerConfig:
    """How the server listens and what it allows each client (see docs/protocol.md)."""

    host: str = setting("127.0.0.1", "address to listen on", metavar="HOST")
    port: int = setting(8765, "port to listen on (0 picks a free port)", lo=0, hi=65535)
    max_connections: int = setting(
        64,
        "WebSocket connections and speech requests open at once, in all",
        lo=1,
        hi=1_000_000,
    )
    # a game server or a proxy carries many players' connections from one address
    max_connections_per_ip: int | None = setting(
        None,
        "open WebSocket connections from one client address (none: no limit)",
        lo=1,
        hi=1_000_000,
    )
    forwarded_allow_ips: tuple[str, ...] = setting(
        (),
        "proxies whose X-Forwarded-For / X-Forwarded-Proto are believed (uvicorn's "
        "forwarded_allow_ips: addresses, networks, or *); none: the peer is the client",
        sep=",",
        metavar="IP,...",
    )
    max_message_bytes: int = setting(
        64 * 1024,
        "larger client frames close the connection with 1009",
        lo=1024,
        hi=64 * 1024 * 1024,
    )
    max_unsent_bytes: int = setting(
        8 * 1024 * 1024,
        "audio queued for a client that does not read, before it is dropped",
        lo=64 * 1024,
        hi=1024 * 1024 * 1024,
    )
    token: str | None = setting(
        None,
        "require this bearer token for /v1/* (Authorization header; /v1/tts: ?token=)",
        nonempty=True,
        metavar="TOKEN",
    )
    allowed_origins: tuple[str, ...] | None = setting(
        None,
        "a browser Origin allowed (repeatable); none given: any",
        flag="--allow-origin",
        metavar="ORIGIN",
    )
    shutdown_timeout_s: float = setting(
        10.0, "on SIGTERM: seconds streams get to finish", lo=0.0, hi=3600.0
    )
    continuity: bool = setting(True, "condition each segment on the previous one's tokens")
    # early audio: a preview at the first coarse window's end, then one per this many new
    # coarse frames; each costs a fine and a codec pass
    early_audio_frames: int = setting(
        75,
        "streams with early_audio: coarse frames between previews (75 = 1 s of audio)",
        lo=1,
        hi=100_000,
    )
    server_name: str | None = setting(
        None,
        "this server's name in every hello and in /healthz (default: HOST-PID; on Ray Serve, "
        "the replica's id)",
        metavar="NAME",
    )
    voices_dir: str | None = setting(
        None,
        "users' voices (NAME.npz), loaded, added and deleted here",
        flag="--voices",
        metavar="DIR",
    )
    # other names for voices, for the speech endpoint: (("alloy", "v2/en_speaker_6"), ...)
    voice_aliases: tuple[tuple[str, str], ...] = setting(
        (),
        "another name for a voice, for the speech endpoint (repeatable)",
        flag="--voice-alias",
        metavar="ALIAS=VOICE",
    )

    def __post_init__(self) -> None:
        check_settings(self)


@dataclass(frozen=True)
class ProtocolLimits:
    """Per-connection limits. Exceeding any of them gets an error with code ``limit``."""

    max_streams: int = setting(8, "streams open at once on one connection", lo=1)
    max_text_chars: int = setting(
        20_000, "characters of text per stream, over all its speak messages", lo=1
    )
    max_chars_per_second: float = setting(
        2_000.0, "text characters accepted per second, per connection", lo=0.0, lo_open=True
    )
    char_burst: int = setting(20_000, "text characters accepted at once (token bucket size)", lo=1)
    max_messages_per_second: float = setting(
        200.0, "client frames per second, per connection", lo=0.0, lo_open=True
    )
    message_burst: int = setting(400, "client frames accepted at once", lo=1)
    max_id_chars: int = setting(128, "longest string id", lo=1)

    def __post_init__(self) -> None:
        check_settings(self)

    def as_dict(self) -> dict[str, int | float]:
        return {
            "max_streams": self.max_streams,
            "max_text_chars": self.max_text_chars,
            "max_chars_per_second": self.max_chars_per_second,
            "char_burst": self.char_burst,
            "max_messages_per_second": self.max_messages_per_second,
            "message_burst": self.message_burst,
            "max_id_chars": self.max_id_chars,
        }


# -- text segmentation (stream_engine.text.segmenter) -----------------------------------------

# Words after which "." is no sentence end, casefolded, without their final dot. Words that
# often end a sentence ("no", "etc", "inc", "mm") are left out: "No. 5" is caught by the digit.
DEFAULT_ABBREVIATIONS: Final = frozenset(
    {
        # en
        "mr", "mrs", "ms", "mx", "dr", "prof", "rev", "hon", "sr", "jr", "st", "mt", "capt",
        "col", "gen", "lt", "sgt", "gov", "sen", "rep", "pres", "vs", "cf", "approx", "ca",
        "dept", "univ", "assn", "bros", "pp",
        # de
        "bzw", "vgl", "sog", "ggf", "inkl", "evtl", "nr", "hr", "fr", "dipl", "ing", "str",
        # es, pt, it, fr
        "sra", "srta", "sres", "dra", "ud", "uds", "lic", "profa", "av", "exmo", "sig",
        "sig.ra", "sigg", "dott", "dott.ssa", "avv", "mme", "mlle", "pr", "ste",
        # ru
        "г", "гг", "ул", "стр", "см", "напр", "тыс", "проф", "акад", "им", "т.е", "т.к",
        # pl, tr, hi
        "np", "tzw", "mgr", "inż", "ul", "al", "godz", "tj", "św", "doç", "sn", "örn", "डॉ",
    }
)  # fmt: skip


@dataclass(frozen=True)
class SegmenterConfig:
    """How text is cut into segments. Every field has a default; see stream_engine.text.segmenter."""

    max_tokens: int = setting(
        230, "most tokens in a segment (a margin under Bark's 256)", lo=1, hi=1_000_000
    )
    max_chars: int = setting(
        2000, "most characters in a segment, whatever the tokenizer says", lo=1, hi=1_000_000
    )
    max_tokens_per_char: float = setting(
        1.0, "most tokens one character adds (1.0: BERT WordPiece)", lo=0.0, lo_open=True
    )
    short_first: bool = setting(True, "cut the first segment early so audio starts early")
    first_min_words: int = setting(
        3,
        "the first segment ends at a clause boundary after this many words",
        lo=1,
        hi=10_000,
    )
    first_max_words: int = setting(
        8,
        "... or after this many words when no clause boundary came (>= first_min_words)",
        lo=1,
        hi=10_000,
    )
    max_cue_chars: int = setting(
        40, 'a "[" closed within this many characters is a cue', lo=1, hi=10_000
    )
    max_lyric_chars: int = setting(
        300, 'a "♪" closed by "♪" within this many characters is a lyric', lo=1, hi=100_000
    )
    abbreviations: frozenset[str] = setting(
        DEFAULT_ABBREVIATIONS, 'words a "." does not end (matched without case)'
    )

    def __post_init__(self) -> None:
        check_settings(self)
        if self.first_max_words < self.first_min_words:
            raise InvalidOption(
                f"first_max_words must be >= first_min_words ({self.first_min_words}), "
                f"got {self.first_max_words!r}"
            )
        folded = frozenset(a.casefold().rstrip(".") for a in self.abbreviations)
        object.__setattr__(self, "abbreviations", folded)


# -- all of an operator's settings ------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Everything ``stream-engine serve`` is configured with."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    limits: ProtocolLimits = field(default_factory=ProtocolLimits)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)


#: The tables of a settings file (and the fields of :class:`Settings`) and their dataclasses.
SECTIONS: Final[Mapping[str, type]] = {
    "engine": EngineConfig,
    "server": ServerConfig,
    "limits": ProtocolLimits,
    "segmenter": SegmenterConfig,
}


def settings_from(
    data: Mapping[str, Any],
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    source: str | None = None,
) -> Settings:
    """Build :class:`Settings` from ``data`` (tables named as :data:`SECTIONS`, keys the
    fields' names) with ``overrides`` (the same shape) over it, over the defaults.

    Unknown tables or keys and bad values raise :class:`InvalidOption`; ``source`` (a file
    name) is named in the messages.
    """
    where = f"{source}: " if source else ""
    overrides = overrides or {}
    for what, given in (("table", data), ("section", overrides)):
        unknown = sorted(set(given) - set(SECTIONS))
        if unknown:
            raise InvalidOption(f"{where}unknown {what}(s) {unknown}; known: {', '.join(SECTIONS)}")
    built: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        table = data.get(section, {})
        if not isinstance(table, Mapping):
            raise InvalidOption(f"{where}[{section}] must be a table, got {table!r}")
        values = {**table, **overrides.get(section, {})}
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise InvalidOption(
                f"{where}unknown key(s) {unknown} in [{section}]; known: {', '.join(known)}"
            )
        try:
            built[section] = cls(**values)
        except InvalidOption as exc:
            if not source:
                raise
            raise InvalidOption(f"{where}[{section}] {exc}") from None
    return Settings(**built)


def load_settings(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Settings:
    """:class:`Settings` from the TOML file at ``path`` (none: the defaults) and ``overrides``.

    The file's tables are ``[engine]``, ``[server]``, ``[limits]`` and ``[segmenter]``, all
    optional; their keys are the fields' names (lists for tuples, a table for
    ``voice_aliases``). Precedence: defaults < file < overrides.
    """
    if path is None:
        return settings_from({}, overrides)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise InvalidOption(f"cannot read the config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidOption(f"{path} is not valid TOML: {exc}") from None
    return settings_from(data, overrides, source=os.fspath(path))

"""The settings dataclasses: one validator driven by each field's rule, and TOML loading."""

from __future__ import annotations

import dataclasses
import math

import pytest

from stream_engine.config import (
    DEFAULT_ABBREVIATIONS,
    SECTIONS,
    EngineConfig,
    GenerationOptions,
    ProtocolLimits,
    SegmenterConfig,
    ServerConfig,
    Settings,
    load_settings,
    setting_fields,
    settings_from,
)
from stream_engine.errors import InvalidOption

# (class, field, bad value): each must raise InvalidOption naming the field
BAD = [
    # ints: wrong type, bool, out of range
    (ServerConfig, "port", 70000),
    (ServerConfig, "port", -1),
    (ServerConfig, "port", "80"),
    (ServerConfig, "port", 80.0),
    (ServerConfig, "max_connections", True),
    (ServerConfig, "max_connections", 0),
    (ServerConfig, "max_message_bytes", 1023),
    (ServerConfig, "max_unsent_bytes", 2**40),
    (ServerConfig, "early_audio_frames", None),
    (ServerConfig, "max_connections_per_ip", 0),
    (ServerConfig, "max_connections_per_ip", False),
    (EngineConfig, "semantic_slots", 0),
    (EngineConfig, "max_queue", 4097),
    (EngineConfig, "codec_batch", 1.5),
    (ProtocolLimits, "max_streams", 0),
    (ProtocolLimits, "max_id_chars", True),
    (SegmenterConfig, "max_tokens", 0),
    (SegmenterConfig, "max_lyric_chars", -1),
    (SegmenterConfig, "first_min_words", 0),
    (GenerationOptions, "top_k", 0),
    (GenerationOptions, "seed", 2**31),
    # floats: open and closed bounds, non-finite, bool, strings, huge ints
    (ServerConfig, "shutdown_timeout_s", -0.1),
    (ServerConfig, "shutdown_timeout_s", 3600.5),
    (ServerConfig, "shutdown_timeout_s", math.nan),
    (ServerConfig, "shutdown_timeout_s", True),
    (ProtocolLimits, "max_chars_per_second", 0),
    (ProtocolLimits, "max_chars_per_second", math.inf),
    (ProtocolLimits, "max_messages_per_second", "fast"),
    (SegmenterConfig, "max_tokens_per_char", 0),
    (SegmenterConfig, "max_tokens_per_char", 2**60),
    (GenerationOptions, "text_temp", 0),
    (GenerationOptions, "top_p", 1.01),
    (GenerationOptions, "min_eos_p", 10**400),
    # bools
    (ServerConfig, "continuity", 1),
    (EngineConfig, "cuda_graphs", "yes"),
    (SegmenterConfig, "short_first", None),
    (GenerationOptions, "greedy", 0),
    # strings, choices, non-empty
    (ServerConfig, "host", None),
    (ServerConfig, "host", 127),
    (ServerConfig, "token", ""),
    (ServerConfig, "token", 5),
    (ServerConfig, "voices_dir", 3),
    (EngineConfig, "attn", "flash"),
    (EngineConfig, "cpu_decode_kernel", "fast"),
    (EngineConfig, "attn", None),
    # tuples of strings, pairs, sets
    (ServerConfig, "allowed_origins", "https://a.example"),
    (ServerConfig, "allowed_origins", ("https://a.example", 1)),
    (ServerConfig, "forwarded_allow_ips", None),
    (ServerConfig, "forwarded_allow_ips", "10.0.0.1"),
    (ServerConfig, "voice_aliases", (("alloy",),)),
    (ServerConfig, "voice_aliases", {"alloy": 6}),
    (ServerConfig, "voice_aliases", "alloy=v2/en_speaker_6"),
    (SegmenterConfig, "abbreviations", "dr"),
    (SegmenterConfig, "abbreviations", frozenset({1})),
]


@pytest.mark.parametrize(("cls", "name", "value"), BAD)
def test_a_bad_value_names_its_field(cls, name, value):
    with pytest.raises(InvalidOption, match=name):
        cls(**{name: value})


def test_none_only_where_the_type_is_optional():
    for cls in (*SECTIONS.values(), GenerationOptions):
        for s in setting_fields(cls):
            if s.optional:
                assert getattr(cls(**{s.name: None}), s.name) is None
            else:
                with pytest.raises(InvalidOption, match=s.name):
                    cls(**{s.name: None})


def test_every_default_is_valid_and_the_fields_are_unchanged():
    assert Settings() == Settings(
        EngineConfig(), ServerConfig(), ProtocolLimits(), SegmenterConfig()
    )
    assert [f.name for f in dataclasses.fields(ServerConfig)] == [
        "host",
        "port",
        "max_connections",
        "max_connections_per_ip",
        "forwarded_allow_ips",
        "max_message_bytes",
        "max_unsent_bytes",
        "token",
        "allowed_origins",
        "shutdown_timeout_s",
        "continuity",
        "early_audio_frames",
        "server_name",
        "voices_dir",
        "voice_aliases",
    ]
    server = ServerConfig()
    assert (server.port, server.max_connections, server.early_audio_frames) == (8765, 64, 75)
    assert (server.allowed_origins, server.voice_aliases, server.forwarded_allow_ips) == (
        None,
        (),
        (),
    )
    assert ProtocolLimits().as_dict()["max_chars_per_second"] == 2_000.0
    assert SegmenterConfig().abbreviations == DEFAULT_ABBREVIATIONS


def test_good_values_pass_and_lists_become_tuples():
    cfg = ServerConfig(
        port=0,
        max_connections_per_ip=3,
        allowed_origins=["https://a.example"],  # type: ignore[arg-type]
        forwarded_allow_ips=["10.0.0.1", "10.0.0.2"],  # type: ignore[arg-type]
        voice_aliases={"alloy": "v2/en_speaker_6"},  # type: ignore[arg-type]
        shutdown_timeout_s=0,
        token="s3cret",
    )
    assert cfg.allowed_origins == ("https://a.example",)
    assert cfg.forwarded_allow_ips == ("10.0.0.1", "10.0.0.2")
    assert cfg.voice_aliases == (("alloy", "v2/en_speaker_6"),)
    assert hash(cfg) == hash(dataclasses.replace(cfg))
    from_lists = ServerConfig(voice_aliases=[["a", "b"]])  # type: ignore[arg-type]
    assert from_lists.voice_aliases == (("a", "b"),)
    assert EngineConfig(attn="eager", cpu_decode_kernel="mkl").attn == "eager"
    assert ProtocolLimits(max_chars_per_second=1).max_chars_per_second == 1
    assert GenerationOptions(text_temp=5.0, top_p=1.0, seed=0).seed == 0


def test_segmenter_extra_rules():
    with pytest.raises(InvalidOption, match="first_max_words"):
        SegmenterConfig(first_min_words=5, first_max_words=4)
    assert SegmenterConfig(first_min_words=5, first_max_words=5).first_max_words == 5
    folded = SegmenterConfig(abbreviations=["Dr.", "ETC"])  # type: ignore[arg-type]
    assert folded.abbreviations == {"dr", "etc"}


def test_the_old_import_paths_still_work():
    from stream_engine import config
    from stream_engine.protocol import ProtocolLimits as Limits
    from stream_engine.text import DEFAULT_ABBREVIATIONS as Abbreviations
    from stream_engine.text import SegmenterConfig as TextSegmenterConfig
    from stream_engine.text.segmenter import DEFAULT_ABBREVIATIONS as SegAbbreviations
    from stream_engine.text.segmenter import SegmenterConfig as SegSegmenterConfig

    assert Limits is config.ProtocolLimits
    assert TextSegmenterConfig is SegSegmenterConfig is config.SegmenterConfig
    assert Abbreviations is SegAbbreviations is config.DEFAULT_ABBREVIATIONS


# -- TOML ------------------------------------------------------------------------------------

TOML = """
[engine]
semantic_slots = 4
attn = "eager"
cuda_graphs = false

[server]
host = "0.0.0.0"
port = 9000
max_connections_per_ip = 10
forwarded_allow_ips = ["10.0.0.1", "10.0.0.0/8"]
allowed_origins = ["https://a.example"]
shutdown_timeout_s = 5
voices_dir = "/srv/voices"
voice_aliases = {alloy = "v2/en_speaker_6", echo = "v2/en_speaker_1"}

[limits]
max_streams = 2
max_chars_per_second = 100.5

[segmenter]
first_max_words = 12
abbreviations = ["Dr", "etc."]
"""


def write(tmp_path, text):
    path = tmp_path / "serve.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_load_every_table(tmp_path):
    settings = load_settings(write(tmp_path, TOML))
    assert settings.engine == EngineConfig(semantic_slots=4, attn="eager", cuda_graphs=False)
    assert settings.server == ServerConfig(
        host="0.0.0.0",
        port=9000,
        max_connections_per_ip=10,
        forwarded_allow_ips=("10.0.0.1", "10.0.0.0/8"),
        allowed_origins=("https://a.example",),
        shutdown_timeout_s=5,
        voices_dir="/srv/voices",
        voice_aliases=(("alloy", "v2/en_speaker_6"), ("echo", "v2/en_speaker_1")),
    )
    assert settings.limits == ProtocolLimits(max_streams=2, max_chars_per_second=100.5)
    assert settings.segmenter.first_max_words == 12
    assert settings.segmenter.abbreviations == {"dr", "etc"}


def test_voice_aliases_as_a_sub_table(tmp_path):
    text = '[server.voice_aliases]\nalloy = "v2/en_speaker_6"\n'
    settings = load_settings(write(tmp_path, text))
    assert settings.server.voice_aliases == (("alloy", "v2/en_speaker_6"),)


def test_no_file_and_empty_file_give_the_defaults(tmp_path):
    assert load_settings() == Settings()
    assert load_settings(None, {}) == Settings()
    assert load_settings(write(tmp_path, "")) == Settings()
    assert load_settings(write(tmp_path, "[server]\n[limits]\n")) == Settings()


def test_precedence_defaults_then_file_then_overrides(tmp_path):
    path = write(tmp_path, TOML)
    settings = load_settings(
        path, {"server": {"port": 9100, "allowed_origins": None}, "limits": {"max_streams": 3}}
    )
    assert settings.server.port == 9100  # flag over file
    assert settings.server.allowed_origins is None
    assert settings.server.host == "0.0.0.0"  # file over default
    assert settings.server.max_connections == 64  # default
    assert settings.limits.max_streams == 3
    assert settings.limits.max_chars_per_second == 100.5
    assert load_settings(None, {"engine": {"max_queue": 9}}).engine.max_queue == 9


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[sever]\nport = 1\n", "sever"),
        ("port = 1\n", "port"),  # a key outside any table
        ("[server]\nprot = 1\n", "prot"),
        ("[limits]\nport = 1\n", "port"),  # a key of another table
        ("[server]\nport = '80'\n", "port"),
        ("[server]\nport = 80.0\n", "port"),
        ("[server]\nport = 70000\n", "port"),
        ("[server]\ncontinuity = 1\n", "continuity"),
        ("[server]\nallowed_origins = 'https://a.example'\n", "allowed_origins"),
        ("[server]\nvoice_aliases = ['alloy']\n", "voice_aliases"),
        ("[server]\nvoice_aliases = {alloy = 6}\n", "voice_aliases"),
        ("[engine]\nattn = 'fast'\n", "attn"),
        ("[limits]\nmax_streams = 0\n", "max_streams"),
        ("[segmenter]\nshort_first = 'no'\n", "short_first"),
        ("[segmenter]\nfirst_min_words = 9\n", "first_max_words"),
        ("[server]\nhost = 1979-05-27\n", "host"),
        ("[server]\nport = \n", "TOML"),
    ],
)
def test_bad_files_are_invalid_options(tmp_path, text, match):
    path = write(tmp_path, text)
    with pytest.raises(InvalidOption, match=match) as info:
        load_settings(path)
    assert str(path) in str(info.value)


def test_a_missing_file_and_unknown_overrides_are_invalid_options(tmp_path):
    with pytest.raises(InvalidOption, match=r"nothing\.toml"):
        load_settings(tmp_path / "nothing.toml")
    with pytest.raises(InvalidOption, match="prot"):
        load_settings(None, {"server": {"prot": 1}})
    with pytest.raises(InvalidOption, match="web"):
        settings_from({}, {"web": {"port": 1}})
    with pytest.raises(InvalidOption, match="server"):
        settings_from({"server": 5})

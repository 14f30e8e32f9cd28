"""``stream-engine serve``: flags derived from the settings dataclasses (no model is loaded)."""

from __future__ import annotations

import sys
import types

import pytest

from stream_engine import cli
from stream_engine.config import (
    SECTIONS,
    EngineConfig,
    ProtocolLimits,
    SegmenterConfig,
    ServerConfig,
    Settings,
    load_settings,
    setting_fields,
)


def settings_for(*argv: str) -> Settings:
    args = cli.parser().parse_args(["serve", *argv])
    return load_settings(args.config, cli.setting_overrides(args))


def test_no_flags_give_the_dataclass_defaults():
    args = cli.parser().parse_args(["serve"])
    assert cli.setting_overrides(args) == {}
    assert settings_for() == Settings()
    assert (args.model, args.device, args.dtype, args.trace, args.log_level, args.config) == (
        "suno/bark-small",
        None,
        None,
        None,
        "info",
        None,
    )


def test_every_scalar_field_has_a_flag(capsys):
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["serve", "--help"])
    text = capsys.readouterr().out
    for cls in SECTIONS.values():
        for s in setting_fields(cls):
            if s.kind == "set":
                assert s.name == "abbreviations"
                continue
            flag = s.rule.flag or "--" + s.name.replace("_", "-")
            assert f"{flag} " in text or f"{flag}," in text, flag


@pytest.mark.parametrize(
    ("argv", "section", "name", "value"),
    [
        (["--host", "0.0.0.0"], "server", "host", "0.0.0.0"),
        (["--port", "9000"], "server", "port", 9000),
        (["--token", "s3cret"], "server", "token", "s3cret"),
        (["--max-connections", "5"], "server", "max_connections", 5),
        (["--early-audio-frames", "25"], "server", "early_audio_frames", 25),
        (["--max-connections-per-ip", "3"], "server", "max_connections_per_ip", 3),
        (["--max-connections-per-ip", "none"], "server", "max_connections_per_ip", None),
        (
            ["--forwarded-allow-ips", "10.0.0.1,10.0.0.2"],
            "server",
            "forwarded_allow_ips",
            ("10.0.0.1", "10.0.0.2"),
        ),
        (["--forwarded-allow-ips", "*"], "server", "forwarded_allow_ips", ("*",)),
        (
            ["--allow-origin", "https://a.example", "--allow-origin", "https://b.example"],
            "server",
            "allowed_origins",
            ("https://a.example", "https://b.example"),
        ),
        (
            ["--voice-alias", "alloy=v2/en_speaker_6", "--voice-alias", "echo=mine"],
            "server",
            "voice_aliases",
            (("alloy", "v2/en_speaker_6"), ("echo", "mine")),
        ),
        (["--voices", "/tmp/x"], "server", "voices_dir", "/tmp/x"),
        (["--no-continuity"], "server", "continuity", False),
        (["--continuity"], "server", "continuity", True),
        (["--shutdown-timeout-s", "2.5"], "server", "shutdown_timeout_s", 2.5),
        (["--max-message-bytes", "4096"], "server", "max_message_bytes", 4096),
        (["--max-unsent-bytes", "65536"], "server", "max_unsent_bytes", 65536),
        (["--max-streams", "2"], "limits", "max_streams", 2),
        (["--max-chars-per-second", "50"], "limits", "max_chars_per_second", 50.0),
        (["--message-burst", "7"], "limits", "message_burst", 7),
        (["--semantic-slots", "4"], "engine", "semantic_slots", 4),
        (["--attn", "eager"], "engine", "attn", "eager"),
        (["--cpu-decode-kernel", "mkl"], "engine", "cpu_decode_kernel", "mkl"),
        (["--no-cuda-graphs"], "engine", "cuda_graphs", False),
        (["--max-queue", "9"], "engine", "max_queue", 9),
        (["--first-max-words", "9"], "segmenter", "first_max_words", 9),
        (["--no-short-first"], "segmenter", "short_first", False),
        (["--max-tokens-per-char", "0.5"], "segmenter", "max_tokens_per_char", 0.5),
    ],
)
def test_each_flag_sets_its_field(argv, section, name, value):
    settings = settings_for(*argv)
    assert getattr(getattr(settings, section), name) == value
    # and nothing else moved
    defaults = {
        "engine": EngineConfig(),
        "server": ServerConfig(),
        "limits": ProtocolLimits(),
        "segmenter": SegmenterConfig(),
    }
    for other, config in defaults.items():
        got = getattr(settings, other)
        for s in setting_fields(type(config)):
            if (other, s.name) != (section, name):
                assert getattr(got, s.name) == getattr(config, s.name), (other, s.name)


def test_flags_override_the_config_file(tmp_path):
    path = tmp_path / "serve.toml"
    path.write_text(
        '[server]\nport = 9000\nhost = "0.0.0.0"\n[limits]\nmax_streams = 2\n'
        '[server.voice_aliases]\nalloy = "v2/en_speaker_6"\n',
        encoding="utf-8",
    )
    settings = settings_for("--config", str(path), "--port", "9100", "--max-streams", "3")
    assert (settings.server.port, settings.server.host) == (9100, "0.0.0.0")
    assert settings.server.voice_aliases == (("alloy", "v2/en_speaker_6"),)
    assert settings.limits.max_streams == 3


@pytest.fixture
def no_model(monkeypatch):
    """Make loading a model (or starting a server) fail the test."""

    class Engine:
        @classmethod
        def load(cls, *args, **kwargs):
            raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setitem(sys.modules, "stream_engine.engine", types.SimpleNamespace(Engine=Engine))


@pytest.mark.parametrize(
    "argv",
    [
        ["--port", "70000"],
        ["--max-streams", "0"],
        ["--first-min-words", "20"],  # over first_max_words
        ["--shutdown-timeout-s", "nan"],
        ["--token", ""],
    ],
)
def test_a_bad_value_exits_2_before_loading_a_model(no_model, capsys, argv):
    assert cli.main(["serve", "--model", "random:tiny", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")


def test_a_bad_config_file_exits_2(no_model, capsys, tmp_path):
    path = tmp_path / "serve.toml"
    path.write_text("[server]\nprot = 1\n", encoding="utf-8")
    assert cli.main(["serve", "--config", str(path)]) == 2
    assert "error: " in capsys.readouterr().err
    assert cli.main(["serve", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--port", "eighty"],
        ["--attn", "fast"],
        ["--voice-alias", "alloy"],
        ["--max-connections-per-ip", "1.5"],
        ["--continuity", "yes"],
    ],
)
def test_unparseable_flags_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as info:
        cli.parser().parse_args(["serve", *argv])
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_serve_hands_the_settings_to_the_engine_and_the_server(monkeypatch):
    seen: dict[str, object] = {}

    class Engine:
        runtime = types.SimpleNamespace(observers=[])

        @classmethod
        def load(cls, model, device=None, dtype=None, config=None):
            seen["load"] = (model, device, dtype, config)
            return cls()

    class Server:
        def __init__(self, engine, config=None, limits=None, voices=None, segmenting=None):
            seen["server"] = (config, limits, voices, segmenting)

        async def serve_forever(self):
            seen["served"] = True

    monkeypatch.setitem(sys.modules, "stream_engine.engine", types.SimpleNamespace(Engine=Engine))
    monkeypatch.setitem(
        sys.modules, "stream_engine.server.app", types.SimpleNamespace(Server=Server)
    )
    argv = ["serve", "--model", "random:tiny", "--port", "0", "--semantic-slots", "2"]
    assert cli.main([*argv, "--max-streams", "3", "--first-max-words", "9"]) == 0
    assert seen["load"] == ("random:tiny", None, None, EngineConfig(semantic_slots=2))
    assert seen["server"] == (
        ServerConfig(port=0),
        ProtocolLimits(max_streams=3),
        None,
        SegmenterConfig(first_max_words=9),
    )
    assert seen["served"] is True


@pytest.mark.parametrize(
    "argv",
    [
        ["--ray", "--replicas", "2", "--max-replicas", "3"],
        ["--ray", "--min-replicas", "3", "--max-replicas", "2"],
        ["--ray", "--replicas", "0"],
        ["--ray", "--trace", "steps.json"],
    ],
)
def test_bad_ray_flags_exit_2_before_starting_ray(no_model, monkeypatch, capsys, argv):
    from stream_engine.server import ray_serve

    def run(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray_serve, "run", run)
    assert cli.main(["serve", "--model", "random:tiny", *argv]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_serve_ray_hands_every_setting_to_the_replicas(no_model, monkeypatch):
    from stream_engine.server import ray_serve

    seen: dict[str, object] = {}

    def run(replica, scaling, host, port, address=None, temp_dir=None):
        seen.update(replica=replica, scaling=scaling, at=(host, port, address))

    monkeypatch.setattr(ray_serve, "run", run)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    argv = ["serve", "--ray", "--model", "random:tiny", "--port", "8000", "--max-streams", "3"]
    argv += ["--min-replicas", "1", "--max-replicas", "4", "--target-connections", "3"]
    assert cli.main(argv) == 0
    replica, scaling = seen["replica"], seen["scaling"]
    assert replica.model == "random:tiny" and replica.settings["limits"]["max_streams"] == 3
    assert (scaling.replicas, scaling.min_replicas, scaling.max_replicas) == (None, 1, 4)
    assert scaling.target_connections == 3.0
    assert seen["at"] == ("127.0.0.1", 8000, None)
    options = scaling.deployment_options(cluster_gpus=0)
    assert options["autoscaling_config"]["max_replicas"] == 4
    assert options["ray_actor_options"]["num_gpus"] == 0
    assert scaling.deployment_options(cluster_gpus=8)["ray_actor_options"]["num_gpus"] == 1
    # every table reaches the replicas in a form the settings loader reads back
    assert ray_serve.settings_from(replica.settings).limits.max_streams == 3

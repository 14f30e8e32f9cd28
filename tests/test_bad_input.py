import pytest

from stream_engine.errors import (
    EmptyText,
    InvalidOption,
    ModelNotFound,
    TextTooLong,
    UnknownVoice,
)


@pytest.mark.parametrize("text", ["", "   \n"])
def test_empty_text(tiny, text):
    with pytest.raises(EmptyText):
        tiny.generate(text)


def test_text_too_long(tiny):
    with pytest.raises(TextTooLong, match="256"):
        tiny.generate("word " * 400)


@pytest.mark.parametrize("voice", ["nope", "../../etc/passwd", "/etc/passwd"])
def test_unknown_voice(tiny, voice):
    with pytest.raises(UnknownVoice):
        tiny.generate("Hi.", voice=voice)


@pytest.mark.parametrize(
    "options",
    [
        {"text_temp": 0},
        {"text_temp": float("nan")},
        {"text_temp": 10**400},
        {"top_k": 0},
        {"top_p": 1.5},
        {"min_eos_p": -1},
        {"max_semantic_tokens": 10_000},
        {"seed": "x"},
        {"greedy": "yes"},
        {"bogus": 1},
    ],
)
def test_invalid_options(tiny, options):
    with pytest.raises(InvalidOption):
        tiny.generate("Hi.", **options)


def test_unknown_random_model():
    from stream_engine import Engine

    with pytest.raises(ModelNotFound, match="random:tiny"):
        Engine.load("random:huge", device="cpu")


def test_offload_is_refused_rather_than_silently_running_on_the_cpu():
    from stream_engine import Engine

    with pytest.raises(InvalidOption, match="offload"):
        Engine.load("random:tiny", device="cpu", offload=True)

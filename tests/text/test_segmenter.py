"""The incremental text segmenter: sentence ends, cues, length limit, first segment, streaming."""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_engine.errors import InvalidOption
from stream_engine.text import Segmenter, SegmenterConfig, estimate_tokens, normalize_text

_SPEAKABLE = re.compile(r"[^\W_]")


def words(text: str) -> int:
    return len(text.split())


def run(
    pieces: str | Sequence[str],
    count_tokens: Callable[[str], int] = estimate_tokens,
    **config: object,
) -> tuple[list[str], int]:
    """Push the pieces (a str is one piece), end the stream; return (segments, dropped)."""
    seg = Segmenter(count_tokens, SegmenterConfig(**config))  # type: ignore[arg-type]
    out: list[str] = []
    for piece in [pieces] if isinstance(pieces, str) else pieces:
        out += seg.push(piece)
    out += seg.end()
    return out, seg.dropped


def whole(text: str, **config: object) -> list[str]:
    """Segments of ``text`` without the short-first-segment rule."""
    return run(text, short_first=False, **config)[0]


def assert_reassembles(segments: list[str], text: str, dropped: int) -> None:
    """Segments are the normalised text in order, joined by a space or nothing, except for
    dropped unspeakable stretches (and only those)."""
    norm = normalize_text(text)
    pos = 0
    for segment in segments:
        assert segment and segment == normalize_text(segment)
        assert _SPEAKABLE.search(segment)
        at = norm.find(segment, pos)
        assert at >= 0, (segment, norm[pos:])
        gap = norm[pos:at]
        if dropped == 0:
            assert gap == ("" if pos == 0 else gap) and gap in ("", " "), gap
        else:
            assert not _SPEAKABLE.search(gap), gap
        pos = at + len(segment)
    if dropped == 0:
        assert norm[pos:] == ""
    else:
        assert not _SPEAKABLE.search(norm[pos:])


# -- streaming ---------------------------------------------------------------------------------


def test_streamed_pieces_emit_each_sentence_once_complete():
    seg = Segmenter(config=SegmenterConfig(short_first=False))
    assert seg.push("Hel") == []
    assert seg.push("lo wor") == []
    assert seg.push("ld. How") == ["Hello world."]
    assert seg.buffered == "How"
    assert seg.push(" are you?") == []  # "?" waits: "?" then lowercase would go on
    assert seg.push(" I am") == ["How are you?"]
    assert seg.end() == ["I am"]
    assert seg.buffered == ""


def test_latin_end_waits_for_the_next_characters():
    seg = Segmenter(config=SegmenterConfig(short_first=False))
    assert seg.push("It is 3.") == []
    assert seg.push("5 km. Dr.") == ["It is 3.5 km."]
    assert seg.push(" Smith left.") == []
    assert seg.push(" ") == []
    assert seg.push("Bye") == ["Dr. Smith left."]
    assert seg.end() == ["Bye"]


def test_cjk_end_needs_no_space_only_the_next_character():
    seg = Segmenter()
    assert seg.push("你好。") == []  # a closing quote could still follow
    assert seg.push("我") == ["你好。"]
    assert seg.push("们走吧！”他") == ["我们走吧！”"]
    assert seg.flush() == ["他"]


def test_flush_returns_the_buffer_and_the_stream_goes_on():
    seg = Segmenter()
    assert seg.push("Dr.") == []
    assert seg.flush() == ["Dr."]
    assert seg.flush() == []
    assert seg.push("  Smith is here") == []
    assert seg.buffered == "Smith is here"
    assert seg.flush(final=True) == ["Smith is here"]
    assert seg.ended


def test_end_closes_the_stream():
    seg = Segmenter()
    seg.push("Hello")
    assert seg.end() == ["Hello"]
    assert seg.end() == []
    assert seg.flush() == []
    with pytest.raises(InvalidOption):
        seg.push("more")


@pytest.mark.parametrize("piece", [None, b"bytes", 5, ["a"]])
def test_a_piece_that_is_not_a_str_is_an_invalid_option(piece):
    with pytest.raises(InvalidOption):
        Segmenter().push(piece)


def test_empty_pieces_and_empty_stream():
    seg = Segmenter()
    assert seg.push("") == []
    assert seg.push("   \n\t") == []
    assert seg.end() == []
    assert seg.dropped == 0


# -- normalisation and unspeakable segments ----------------------------------------------------


def test_whitespace_is_collapsed_and_control_characters_removed():
    assert whole("  Hello \n\n world\t!  ") == ["Hello world !"]
    assert whole("Hel\x00lo\x07 world.\x1b Bye\x7f.") == ["Hello world.", "Bye."]
    assert whole("Hello\ud800 world\udfff.") == ["Hello world."]
    assert normalize_text(" a \u2028\u00a0 b\x0b") == "a b"


def test_unspeakable_segments_are_dropped_and_counted():
    segments, dropped = run("Hello. ... !!! 🙂 World.")
    assert segments == ["Hello.", "🙂 World."]
    assert dropped == 1
    assert run("🙂 ✨ ... ♪ ♪", short_first=False) == ([], 1)


# -- sentence ends, abbreviations, numbers -----------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Dr. Smith is here.",
        "Mr. and Mrs. Jones came home.",
        "Use a tool, e.g. a hammer.",
        "Use a tool, e.g. The Hammer.",
        "He moved to the U.S. Army base.",
        "The road is 3.5 km long.",
        "It costs 1,000.50 dollars.",
        "Version 2.0.1 is out, see v3.1.4 too.",
        "J. K. Rowling wrote it.",
        "See approx. 5 items on p. 12 today.",
        "Wir treffen uns am 3. Oktober im 19. Jahrhundert.",
        "Das ist z.B. gut, bzw. sehr gut.",
        "Gracias, Sra. López.",
        "Всё хорошо, т.е. отлично.",
        "Visit example.com.au today.",
        '"Stop!" he said.',
        "Really? yes, really.",
        "Well... I think so.",
        "Well... I'm not sure.",
        "Ok... maybe later.",
        "我想……然后我们走吧。",
    ],
)
def test_one_sentence(text):
    assert whole(text) == [text]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hello world. How are you? I am fine!", ["Hello world.", "How are you?", "I am fine!"]),
        ('He said "Stop." Then he left.', ['He said "Stop."', "Then he left."]),
        ("I see... Then we go.", ["I see...", "Then we go."]),
        ("Hmm... Is it?", ["Hmm...", "Is it?"]),
        ("Wait?! No way.", ["Wait?!", "No way."]),
        ("It was 1990. Then it ended.", ["It was 1990.", "Then it ended."]),
        ("I said no. Then I left, etc. Fine.", ["I said no.", "Then I left, etc.", "Fine."]),
        ("See No. 5 and Fig. 7 on page 112. Done.", ["See No. 5 and Fig. 7 on page 112.", "Done."]),
        ("Update to 2.0.1. Then restart.", ["Update to 2.0.1.", "Then restart."]),
        ("你好!我们走吧。", ["你好!", "我们走吧。"]),
    ],
)
def test_sentence_ends(text, expected):
    assert whole(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("今天天气很好。我们去公园吧！你呢？", ["今天天气很好。", "我们去公园吧！", "你呢？"]),
        ("他说：“你好。”然后走了。", ["他说：“你好。”", "然后走了。"]),
        (
            "こんにちは。元気ですか？はい、元気です。",
            ["こんにちは。", "元気ですか？", "はい、元気です。"],
        ),
        ("नमस्ते। आप कैसे हैं? मैं ठीक हूँ।", ["नमस्ते।", "आप कैसे हैं?", "मैं ठीक हूँ।"]),
        ("Привет. Как дела? Всё хорошо.", ["Привет.", "Как дела?", "Всё хорошо."]),
        (
            "Das ist gut. Wir treffen uns am 3. Oktober in Berlin.",
            ["Das ist gut.", "Wir treffen uns am 3. Oktober in Berlin."],
        ),
        ("¿Qué tal? ¡Muy bien! Gracias.", ["¿Qué tal?", "¡Muy bien!", "Gracias."]),
        ("Bonjour M. Dupont. Comment allez-vous ?", ["Bonjour M. Dupont.", "Comment allez-vous ?"]),
        ("안녕하세요. 잘 지내요?", ["안녕하세요.", "잘 지내요?"]),
        ("To jest np. kot. Dobrze.", ["To jest np. kot.", "Dobrze."]),
        ("Merhaba. Nasılsın? İyiyim.", ["Merhaba.", "Nasılsın?", "İyiyim."]),
        ("Ciao, sig. Rossi. Come va?", ["Ciao, sig. Rossi.", "Come va?"]),
        ("Olá, Sr. Silva. Tudo bem?", ["Olá, Sr. Silva.", "Tudo bem?"]),
    ],
)
def test_languages(text, expected):
    assert whole(text) == expected


def test_abbreviations_are_configurable():
    text = "Call Acme Corp. Then wait."
    assert whole(text) == ["Call Acme Corp.", "Then wait."]
    assert whole(text, abbreviations=frozenset({"Corp."})) == [text]


# -- Bark's cues -------------------------------------------------------------------------------


def test_cues_stay_whole_and_their_inside_ends_nothing():
    assert whole("[laughter] That is funny. [sighs] Anyway.") == [
        "[laughter] That is funny.",
        "[sighs] Anyway.",
    ]
    assert whole("Hello [clears throat. coughs] there. Bye.") == [
        "Hello [clears throat. coughs] there.",
        "Bye.",
    ]


def test_a_lyric_between_notes_is_one_unit_and_its_closing_note_ends_it():
    assert whole("♪ In the jungle. The mighty jungle. ♪ Then he left.") == [
        "♪ In the jungle. The mighty jungle. ♪",
        "Then he left.",
    ]
    assert whole("She sang ♪ la la. ♪ and smiled.") == ["She sang ♪ la la. ♪ and smiled."]


def test_an_opener_without_its_closer_within_the_bound_is_plain_text():
    assert whole("[ unclosed. Next sentence.") == ["[ unclosed.", "Next sentence."]
    lyric = "♪ Unclosed note. Next sentence."
    assert whole(lyric, max_lyric_chars=10) == ["♪ Unclosed note.", "Next sentence."]
    seg = Segmenter(config=SegmenterConfig(short_first=False))
    assert seg.push(lyric) == []  # its closing note could still come within 300 characters
    assert seg.end() == ["♪ Unclosed note.", "Next sentence."]  # now it cannot


def test_a_cue_waits_for_its_closer_when_streamed():
    seg = Segmenter(config=SegmenterConfig(short_first=False))
    assert seg.push("Hi [sighs. Again") == []
    assert seg.push("] there. Now") == ["Hi [sighs. Again] there."]
    assert seg.end() == ["Now"]


def test_the_length_limit_does_not_cut_inside_a_cue_or_an_ellipsis_or_before_a_dash():
    segments, _ = run("one two [clears throat loudly now] three four five", words, max_tokens=4)
    assert segments == ["one two", "[clears throat loudly now]", "three four five"]
    dashes = whole("a — b — c — d — e — f — g — h", max_tokens=5, count_tokens=words)
    assert dashes == ["a — b —", "c — d —", "e — f —", "g — h"]
    dots = whole(
        "wait... wait... wait... wait... wait... wait...", max_tokens=4, count_tokens=words
    )
    assert dots == ["wait... wait... wait... wait...", "wait... wait..."]
    lyric = whole("Go ♪ la la la la la ♪ now", max_tokens=8, count_tokens=len)
    assert lyric == ["Go", "♪ la la", "la la la", "♪ now"]  # a lyric longer than the limit


# -- the length limit --------------------------------------------------------------------------


def test_long_sentences_split_at_clause_boundaries_then_words():
    text = "one two three, four five six seven, eight nine ten eleven twelve thirteen."
    assert whole(text, count_tokens=words, max_tokens=5) == [
        "one two three,",
        "four five six seven,",
        "eight nine ten eleven twelve",
        "thirteen.",
    ]


def test_cjk_without_spaces_splits_between_characters():
    text = "今天天气很好我们去公园散步吧然后回家吃饭睡觉"
    segments = whole(text, count_tokens=len, max_tokens=10)
    assert segments == ["今天天气很好我们去公", "园散步吧然后回家吃饭", "睡觉"]
    assert "".join(segments) == text
    assert whole("今天天气很好，我们去公园散步吧", count_tokens=len, max_tokens=10) == [
        "今天天气很好，",
        "我们去公园散步吧",
    ]


def test_max_chars_bounds_a_segment_whatever_the_token_count():
    segments = whole("word " * 100, count_tokens=lambda _: 0, max_chars=50)
    assert all(len(s) <= 50 for s in segments)
    assert " ".join(segments) == normalize_text("word " * 100)


def test_a_word_longer_than_the_limit_is_cut_between_characters():
    text = "x" * 25 + "e\u0301" * 8  # e + combining acute accent: never cut apart
    segments = whole(text, count_tokens=len, max_tokens=10)
    assert segments == ["x" * 10, "x" * 10, "x" * 5 + "e\u0301" * 2, "e\u0301" * 5, "e\u0301"]


def test_tokens_per_character_above_one():
    segments = whole(
        "ab cd ef gh ij", count_tokens=lambda t: 2 * len(t), max_tokens=10, max_tokens_per_char=2
    )
    assert segments == ["ab cd", "ef gh", "ij"]


def test_count_tokens_is_called_sparingly_and_never_on_short_text():
    calls: list[str] = []

    def count(text: str) -> int:
        calls.append(text)
        return estimate_tokens(text)

    sentence = "This sentence has a few words and ends here. "
    seg = Segmenter(count)
    segments: list[str] = []
    for i in range(0, 200 * len(sentence), 7):
        segments += seg.push((sentence * 200)[i : i + 7])
    segments += seg.flush()
    assert len(segments) == 200
    assert calls == []  # every sentence is far under 230 characters
    long = " ".join(["word"] * 2000)
    for i in range(0, len(long), 10):
        segments += seg.push(long[i : i + 10])
    segments += seg.end()
    assert all(len(text) > 230 for text in calls)
    assert len(calls) < 40 * len(segments)
    assert all(estimate_tokens(s) <= 230 for s in segments)


def test_count_tokens_must_return_an_int():
    seg = Segmenter(lambda _: "many")  # type: ignore[arg-type, return-value]
    with pytest.raises(InvalidOption):
        seg.push("word " * 100)


# -- the first segment -------------------------------------------------------------------------


def test_first_segment_ends_at_the_first_clause_after_three_words():
    text = "Well, I think, that we should go to the park today, and then eat. Then we sleep, late."
    assert run(text)[0] == [
        "Well, I think,",
        "that we should go to the park today, and then eat.",
        "Then we sleep, late.",
    ]


def test_first_segment_rule_in_other_scripts():
    assert run("今天天气很好，我们去公园散步吧。你觉得呢，好吗？")[0] == [
        "今天天气很好，",
        "我们去公园散步吧。",
        "你觉得呢，好吗？",
    ]
    assert run("Ну что же, давайте начнём, друзья мои.")[0] == [
        "Ну что же,",
        "давайте начнём, друзья мои.",
    ]


def test_first_segment_without_a_clause_ends_after_eight_words():
    text = " ".join(f"w{i}" for i in range(1, 16)) + "."
    segments = run(text)[0]
    assert segments == [" ".join(f"w{i}" for i in range(1, 9)), "w9 w10 w11 w12 w13 w14 w15."]
    seg = Segmenter()
    got: list[str] = []
    pushed = 0
    for word in text.split():
        got += seg.push(word + " ")
        pushed += 1
        if got:
            break
    assert got == segments[:1]
    # decided once three more words (w9..w11, no sentence end among them) were complete
    assert pushed == 11
    assert seg.buffered.strip() == "w9 w10 w11"


@pytest.mark.parametrize("extra", [1, 2, 3])
def test_a_sentence_just_over_the_word_limit_is_not_cut(extra):
    sentence = " ".join(f"w{i}" for i in range(1, 9 + extra)) + "."
    text = sentence + " Then another sentence follows here."
    assert run(text)[0] == [sentence, "Then another sentence follows here."]
    final_only = " ".join(f"w{i}" for i in range(1, 9 + extra))  # no sentence end, then end()
    assert run(final_only)[0] == [final_only]


def test_a_clause_just_after_the_word_limit_ends_the_first_segment():
    text = "w1 w2 w3 w4 w5 w6 w7 w8 w9, w10 w11 w12 w13 w14."
    assert run(text)[0] == ["w1 w2 w3 w4 w5 w6 w7 w8 w9,", "w10 w11 w12 w13 w14."]


def test_first_segment_settings():
    text = "Yes, I agree, we should leave now before it gets dark outside tonight."
    assert run(text)[0] == [
        "Yes, I agree,",
        "we should leave now before it gets dark outside tonight.",
    ]
    assert run(text, first_min_words=1)[0][0] == "Yes,"
    assert run(text, short_first=False)[0] == [text]
    assert run(text, first_min_words=5, first_max_words=6)[0][0] == "Yes, I agree, we should leave"


def test_a_sentence_end_before_the_first_clause_ends_the_first_segment():
    assert run("Hi. How are you doing today, my dear friend?")[0] == [
        "Hi.",
        "How are you doing today, my dear friend?",
    ]


def test_first_segment_rule_does_not_apply_after_a_flush():
    seg = Segmenter()
    seg.push("Hi")
    assert seg.flush() == ["Hi"]
    assert seg.push("We went home, and then we slept. ") == []
    assert seg.end() == ["We went home, and then we slept."]


def test_first_segment_rule_applies_until_something_speakable_came_out():
    assert run("... We went home, and then we slept.") == (
        ["We went home,", "and then we slept."],
        1,  # "..." ended before "We" and was dropped
    )


# -- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"max_tokens": 0},
        {"max_tokens": 2.5},
        {"max_chars": True},
        {"max_tokens_per_char": 0},
        {"max_tokens_per_char": float("nan")},
        {"short_first": 1},
        {"first_min_words": 0},
        {"first_min_words": 5, "first_max_words": 4},
        {"max_cue_chars": 0},
        {"max_lyric_chars": -1},
        {"abbreviations": "dr"},
        {"abbreviations": frozenset({1})},
    ],
)
def test_bad_config_is_an_invalid_option(options):
    with pytest.raises(InvalidOption):
        SegmenterConfig(**options)


def test_bad_segmenter_arguments_are_invalid_options():
    with pytest.raises(InvalidOption):
        Segmenter(count_tokens=5)  # type: ignore[arg-type]
    with pytest.raises(InvalidOption):
        Segmenter(config={"max_tokens": 10})  # type: ignore[arg-type]


def test_estimate_tokens_never_exceeds_the_characters():
    assert estimate_tokens("") == 0
    assert estimate_tokens("the cat") == 2
    assert estimate_tokens("internationalization") == 5
    assert estimate_tokens("今天好") == 3
    assert estimate_tokens("hi, there!") == 5
    assert estimate_tokens("नमस्ते") == 2  # combining vowel signs stay in the word


# -- invariants, for any text and any pieces ---------------------------------------------------

_VOCAB = [
    "Hello", "world", "I", "It", "I'm", "see", "Then", "then", "Dr.", "Mr.", "U.S.", "e.g.",
    "z.B.", "3.5", "1,000.50", "v2.0.1", "3.", "am", "Oktober", "12", "a", "Z", "é", "\u0301",
    ".", "...", "…", "!", "?", "?!", ",", ";", ":", "—", "–", "-", "。", "，", "、", "！", "？",
    "।", "[laughter]", "[", "]", "♪", "今天", "天气", "很好", "こんにちは", "नमस्ते", "Привет",
    '"', "”", "“", ")", "(", "🙂", "👍🏽", " ", " ", " ", "  ", "\n", "\t", "\x00", "\ud800",
]  # fmt: skip

_vocab_text = st.lists(
    st.tuples(st.sampled_from(_VOCAB), st.sampled_from(["", " "])), max_size=80
).map(lambda parts: "".join(a + b for a, b in parts))

_COUNTERS: list[Callable[[str], int]] = [estimate_tokens, len, words]


@st.composite
def _cut_up(draw: st.DrawFn, text: str) -> list[str]:
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=max(len(text), 1))))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


@st.composite
def _case(draw: st.DrawFn, text_strategy: st.SearchStrategy[str]) -> tuple:
    text = draw(text_strategy)
    pieces = draw(_cut_up(text))
    counter = draw(st.sampled_from(_COUNTERS))
    first_max = draw(st.sampled_from([3, 5, 12]))
    config = {
        "max_tokens": draw(st.sampled_from([3, 5, 8, 20, 230])),
        "max_chars": draw(st.sampled_from([10, 40, 2000])),
        "first_max_words": first_max,
        "first_min_words": draw(st.integers(1, first_max)),
        "max_cue_chars": draw(st.sampled_from([5, 40])),
        "max_lyric_chars": draw(st.sampled_from([10, 300])),
        "short_first": draw(st.booleans()),
    }
    return text, pieces, counter, config


def _check_invariants(text, pieces, counter, config) -> None:
    at_once, dropped = run(text, counter, **config)
    streamed, dropped_streamed = run(pieces, counter, **config)
    assert streamed == at_once
    assert dropped_streamed == dropped
    assert_reassembles(at_once, text, dropped)
    for segment in at_once:
        assert len(segment) <= config["max_chars"]
        # the limit holds unless one character alone is over it
        assert counter(segment) <= config["max_tokens"] or len(segment) <= 2


@settings(max_examples=300, deadline=None)
@given(_case(_vocab_text))
def test_pieces_do_not_change_the_segments_and_nothing_speakable_is_lost(case):
    _check_invariants(*case)


@settings(max_examples=200, deadline=None)
@given(_case(st.text(max_size=120)))
def test_any_unicode_in_any_pieces(case):
    _check_invariants(*case)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.sampled_from(["Hello", "world", "Dr.", "3.5", "e.g.", "yes,", "no;", "so."]), max_size=60
    )
)
def test_latin_segments_joined_by_spaces_give_the_normalised_text(parts):
    text = "  ".join(parts)
    segments, dropped = run(text)
    assert dropped == 0
    assert " ".join(segments) == normalize_text(text)


# -- cost --------------------------------------------------------------------------------------


def _timed(pieces: list[str]) -> tuple[float, list[str]]:
    seg = Segmenter()
    start = time.perf_counter()
    out: list[str] = []
    for piece in pieces:
        out += seg.push(piece)
    out += seg.end()
    return time.perf_counter() - start, out


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox, Dr. Smith, jumps 3.5 km... Well — really? 今天很好。 " * 1400,
        "word " * 20_000,
        "x" * 100_000,
        "天" * 100_000,
        "[" * 100_000,
    ],
    ids=["prose", "no-punctuation", "no-spaces", "cjk", "openers"],
)
def test_100_kb_in_10_character_pieces_is_fast(text):
    text = text[:100_000]
    seconds, streamed = _timed([text[i : i + 10] for i in range(0, len(text), 10)])
    assert seconds < 5, seconds  # well under a second on an idle core
    seconds, at_once = _timed([text])
    assert seconds < 5, seconds
    assert streamed == at_once

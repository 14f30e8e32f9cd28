"""Cut streamed text into segments that Bark can say in one generation, as soon as each is known.

One job: :class:`Segmenter` takes text in pieces (often a few characters at a time, as an LLM
writes it) and returns each segment as soon as the text that decides it has arrived. It is
pure: no I/O, no threads, no model; the caller passes the tokenizer as ``count_tokens``.

Rules
-----
Normalisation
    Control characters (and lone surrogates, and the byte-order mark) are removed; every run of
    whitespace becomes one space; segments are stripped. Segments with nothing speakable (no
    letter or digit in any script: only punctuation, symbols, emoji) are dropped and counted in
    :attr:`Segmenter.dropped`.

Sentence ends
    * ``。！？｡`` (CJK), ``।॥`` (Devanagari danda), ``؟۔`` (Arabic script) and ``።`` end a
      sentence wherever they stand; closing quotes and brackets right after them stay with the
      sentence (``“你好。”`` is one unit).
    * ``.``, ``!``, ``?`` (and ``‼⁇⁈⁉``) end a sentence only when followed by a space, so
      ``3.5``, ``1,000.50``, ``v2.0.1``, ``e.g.,`` and ``example.com`` never end one. A
      ``!``/``?`` directly followed by Han or kana (``你好!我们``) ends one too.
    * After the space, a lowercase letter means the sentence goes on (``"Stop!" he said``,
      ``etc. and``); for ``.`` a digit does too (``approx. 5``, ``No. 7``).
    * A single ``.`` is not an end after an abbreviation: a known one
      (:data:`DEFAULT_ABBREVIATIONS`, matched without case: ``Dr.``, ``Mr.``, ``Prof.``, ``bzw.``,
      ``Sra.``, ``т.е.``...), a single letter (initials: ``J. K. Rowling``, ``M. Dupont``),
      letters joined by dots with at most two letters each (``U.S.``, ``e.g.``, ``z.B.``,
      ``Ph.D.``), or a number of one or two digits (ordinals: ``am 3. Oktober``, ``19.
      Jahrhundert``). The cost of this rule is that "I am 25. Then..." stays one segment; a
      missed end only makes a segment longer, a wrong one breaks a sentence in two.

Ellipses (``...``, ``..``, ``…``, ``⋯``, and runs of them)
    Bark reads them as hesitation, so they are *not* sentence ends by default: "Well... I
    think so" and "我想……然后" are one segment. An ellipsis ends a sentence only when it is
    followed by a space and a capitalised word other than the pronoun "I" ("I see... Then we
    go." is two segments; "Well... I'm not sure" is one; "Hmm... Is it?" is two). An ellipsis
    followed by a space is still a clause boundary (for the first segment and the length
    limit). A run with ``!`` or ``?`` in it (``?!..``) is a ``?``/``!`` end.

Cues
    ``[laughter]``-style cues (a ``[`` closed by ``]`` within :attr:`SegmenterConfig.max_cue_chars`)
    and lyrics (a ``♪`` closed by another ``♪`` within ``max_lyric_chars``) are never cut inside,
    and nothing inside them ends a sentence; a closing ``♪`` followed by a space and a
    non-lowercase character ends the sentence (like ``!``). An opener without its closer within
    the bound is plain text. Dashes and ellipses stay whole: cuts fall after them.

Length limit
    No segment has more than ``max_tokens`` tokens (by ``count_tokens``) or ``max_chars``
    characters. A segment over the limit is cut at the longest prefix that fits, at (in order of
    preference) the last clause boundary (``, ; :`` + space, ``—``, `` – ``, `` - ``, an ellipsis
    or an unended ``!``/``?`` + space, ``、，；：``) if it lies in the second half of that prefix,
    else the last word boundary (a space, or a boundary between Han/kana characters), else a
    word boundary inside a lyric, else any boundary between characters (never inside a
    combining sequence). The same cuts are made whether the text arrives at once or in pieces:
    when over the limit the cut is the longest fitting prefix of the text, whoever sees it.

First segment
    So that audio starts early, the first segment of a stream ends at the first clause boundary
    with at least ``first_min_words`` words before it, or else after ``first_max_words`` words
    (at the word boundary after them, moved past a cue or lyric it falls in), unless the
    sentence ends first. That word-limit cut waits for ``first_min_words`` more words: if the
    sentence ends (or a clause boundary comes) among them, the segment ends there instead, so
    that no tail of a word or two is left to be spoken alone. Words are runs without spaces; each Han or kana character counts as a
    word. The rule holds until the first speakable segment has been returned (by ``push`` or
    ``flush``); later segments are whole sentences, split only for the length limit.

Pieces do not matter
    Every decision depends only on the characters of the stream (waiting for the few
    characters of look-ahead it needs), never on where the pieces were cut: pushing a text in
    any pieces and then calling :meth:`Segmenter.end` gives the same segments as pushing it
    all at once, provided ``count_tokens`` never counts fewer tokens for a longer prefix and
    adds at most ``max_tokens_per_char`` per added character (true of word and character
    counts, and of Bark's BERT tokenizer in practice). ``flush`` in the middle of a stream is
    a decision of the caller and does change the segments.

Cost
    Each push costs time proportional to the new text plus a bound set by ``max_chars`` and
    the cue bounds (the buffer never holds much more than one segment). ``count_tokens`` is
    called only when a segment is longer than ``max_tokens / max_tokens_per_char`` characters,
    then again only after enough characters were added to possibly exceed the limit, and with
    a bisection (about ``log2(max_chars)`` calls) to find a cut.
"""

from __future__ import annotations

import bisect
import math
import operator
import re
import unicodedata
from collections.abc import Callable
from typing import Final

# the configuration lives with the others' (re-exported here)
from ..config import DEFAULT_ABBREVIATIONS, SegmenterConfig
from ..errors import InvalidOption

__all__ = [
    "DEFAULT_ABBREVIATIONS",
    "Segmenter",
    "SegmenterConfig",
    "estimate_tokens",
    "normalize_text",
]

# ---------------------------------------------------------------------------------------------
# Character classes


def _class(chars: str) -> str:
    return "[" + "".join(re.escape(c) for c in chars) + "]"


def _combining_mark_ranges() -> str:
    """Regex class body of the combining marks (Mn, Mc, Me) of the Basic Multilingual Plane."""
    ranges: list[str] = []
    first = last = -2
    for cp in range(0x300, 0x10000):
        if unicodedata.category(chr(cp))[0] != "M":
            continue
        if cp != last + 1:
            if first >= 0:
                ranges.append(f"{chr(first)}-{chr(last)}")
            first = cp
        last = cp
    ranges.append(f"{chr(first)}-{chr(last)}")
    return "".join(ranges)


_MARKS: Final = _combining_mark_ranges()
# Scripts written without spaces between words (Han, kana): each character is a word of its own.
_NOSPACE: Final = (
    "\u3005-\u3007\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
    "\uff66-\uff9f\U00020000-\U0003134f"
)
_NOSPACE_RE: Final = re.compile(f"[{_NOSPACE}]")

_ELLIPSIS: Final = ".…⋯"
_STRONG: Final = "!?‼⁇⁈⁉"
_NOSPACE_TERM: Final = "。！？｡।॥؟۔።"  # end a sentence with or without a space after
_TERMINATORS: Final = _ELLIPSIS + _STRONG + _NOSPACE_TERM
_CLOSERS: Final = "\"'”’»›)）」』】〕〉》〗〙〛"
_OPENING: Final = "\"'“‘«‹(（[「『【¿¡"
_SPACED_CLAUSE: Final = ",;:،؛–"  # clause boundaries when a space follows
_NOSPACE_CLAUSE: Final = "、，；：､"  # clause boundaries as they stand
_CUE_OPENERS: Final = "[♪"
_ZWJ: Final = "\u200d"

_END_EVENTS: Final = re.compile(_class(_TERMINATORS + _CUE_OPENERS))
_FIRST_EVENTS: Final = re.compile(
    _class(_TERMINATORS + _CUE_OPENERS + _SPACED_CLAUSE + _NOSPACE_CLAUSE + "—-")
)
_CLOSER_CLASS: Final = _class(_CLOSERS)
# Clause cuts for the length limit; the cut falls at the end of the match.
_CLAUSE_CUT: Final = re.compile(
    rf"(?:[,;:،؛–!?‼⁇⁈⁉]|(?<= )-|\.{{2,}}|[…⋯]+){_CLOSER_CLASS}*(?= )"
    rf"|—{_CLOSER_CLASS}*"
    rf"|{_class(_NOSPACE_CLAUSE)}{_CLOSER_CLASS}*"
)
# A word: one Han/kana character with the punctuation after it, or a run without spaces.
_UNIT: Final = re.compile(rf"[{_NOSPACE}][^\s\w]*|[^\s{_NOSPACE}]+")
_SPEAKABLE: Final = re.compile(r"[^\W_]")
_ESTIMATE: Final = re.compile(rf"[{_NOSPACE}]|(?:[^\W_{_NOSPACE}]|[{_MARKS}])+|\S")
_CONTROL: Final = re.compile(
    "["
    + "".join(
        re.escape(chr(c)) for c in range(0xA0) if not chr(c).isprintable() and not chr(c).isspace()
    )
    + "\ud800-\udfff\ufeff]"
)
_WHITESPACE: Final = re.compile(r"\s+")

# Sentence-end kinds of a run of terminators.
_KIND_NOSPACE: Final = 0
_KIND_STRONG: Final = 1
_KIND_PERIOD: Final = 2
_KIND_ELLIPSIS: Final = 3

# What an event handler returns instead of the position to go on from.
_WAIT: Final = -1  # needs more text to decide
_RESTART: Final = -2  # length-limit cuts moved the segment start: decide again


def _is_nospace(ch: str) -> bool:
    return _NOSPACE_RE.match(ch) is not None


def _run_kind(run: str) -> int:
    if any(c in _NOSPACE_TERM for c in run):
        return _KIND_NOSPACE
    if any(c in _STRONG for c in run):
        return _KIND_STRONG
    return _KIND_PERIOD if run == "." else _KIND_ELLIPSIS


def _char_boundary(text: str, i: int) -> bool:
    """Whether a cut between ``text[i - 1]`` and ``text[i]`` keeps every character whole."""
    ch = text[i]
    return not (
        unicodedata.category(ch)[0] == "M"
        or ch == _ZWJ
        or text[i - 1] == _ZWJ
        or 0x1F3FB <= ord(ch) <= 0x1F3FF  # emoji skin tones
        or 0xFE00 <= ord(ch) <= 0xFE0F  # variation selectors
    )


def normalize_text(text: str) -> str:
    """``text`` as the segmenter sees it: control characters removed, whitespace collapsed."""
    return _WHITESPACE.sub(" ", _CONTROL.sub("", text)).strip(" ")


def estimate_tokens(text: str) -> int:
    """A cautious stand-in for Bark's BERT tokenizer: the default ``count_tokens``.

    Each Han/kana character, punctuation mark or symbol counts one token, and each run of
    letters and digits one token per four characters (rounded up). It over-counts most words
    (safe: segments come out shorter) and never gives more tokens than characters. Pass the
    real tokenizer for exact limits.
    """
    return sum((len(m) + 3) // 4 for m in _ESTIMATE.findall(text))


# ---------------------------------------------------------------------------------------------
# The segmenter


class Segmenter:
    """Cuts a stream of text into segments; see the module docstring for the rules.

    ``push`` returns the segments a piece completes, ``flush`` everything buffered now,
    ``end`` everything buffered and closes the stream. ``count_tokens`` counts the tokens of a
    segment (the model's tokenizer); it is called on segments only, never per character.
    """

    def __init__(
        self,
        count_tokens: Callable[[str], int] = estimate_tokens,
        config: SegmenterConfig | None = None,
    ) -> None:
        if not callable(count_tokens):
            raise InvalidOption(f"count_tokens must be callable, got {count_tokens!r}")
        if config is None:
            config = SegmenterConfig()
        elif not isinstance(config, SegmenterConfig):
            raise InvalidOption(f"config must be a SegmenterConfig, got {config!r}")
        self._count_tokens = count_tokens
        self._cfg = config
        self._cheap = min(int(config.max_tokens / config.max_tokens_per_char), config.max_chars)
        self.dropped = 0  # segments dropped as unspeakable
        self._buf = ""  # normalised text; the current segment starts at _start
        self._start = 0
        self._pos = 0  # every event before _pos is decided
        self._regions: list[tuple[int, int, bool]] = []  # cues/lyrics: (opener, closer, lyric)
        self._check_len = self._cheap + 1  # count tokens when the segment reaches this length
        self._first = config.short_first  # the short-first-segment rule still applies
        self._ended = False
        self._out: list[str] = []
        self._limit_key: tuple[int, int, bool] | None = None
        self._limit_value: tuple[int, int] | None = None

    # -- public API ---------------------------------------------------------------------------

    @property
    def buffered(self) -> str:
        """The normalised text waiting for more input."""
        return self._buf[self._start :].strip(" ")

    @property
    def ended(self) -> bool:
        """Whether :meth:`end` (or ``flush(final=True)``) was called."""
        return self._ended

    @property
    def config(self) -> SegmenterConfig:
        return self._cfg

    def push(self, text: str) -> list[str]:
        """Add a piece of text; return the segments it completes, in order."""
        if not isinstance(text, str):
            raise InvalidOption(f"text must be a str, got {type(text).__name__}")
        if self._ended:
            raise InvalidOption("text pushed after the end of the stream")
        clean = _WHITESPACE.sub(" ", _CONTROL.sub("", text))
        if clean:
            if self._start >= len(self._buf) or self._buf.endswith(" "):
                clean = clean.lstrip(" ")
            self._buf += clean
        self._advance(final=False)
        self._compact()
        return self._take()

    def flush(self, final: bool = False) -> list[str]:
        """Return everything buffered as segments now; ``final=True`` also ends the stream."""
        if self._ended:
            return []
        while True:
            self._advance(final=True)
            if self._start >= len(self._buf) or self._cut(len(self._buf)):
                break
        self._compact()
        self._ended = final
        return self._take()

    def end(self) -> list[str]:
        """Return everything buffered as segments and end the stream (push then raises)."""
        return self.flush(final=True)

    # -- scanning -----------------------------------------------------------------------------

    def _advance(self, final: bool) -> None:
        """Decide every event that the text so far decides, cutting segments on the way."""
        i = self._pos
        again = False  # re-decide the event at i although the segment now starts after it
        while True:
            buf, n = self._buf, len(self._buf)
            if not again:
                i = max(i, self._start)
            again = False
            first = self._first
            m = (_FIRST_EVENTS if first else _END_EVENTS).search(buf, i)
            j = m.start() if m else n
            if first:
                limit = self._word_limit(final)
                if limit is not None and limit[1] <= j:
                    w = self._past_region(limit[0])
                    if self._cut(w):
                        i = w
                    continue
            if m is None:
                if self._enforce(n, force=False):
                    continue
                self._pos = n
                return
            nxt = self._event(m.group(), j, final)
            if nxt == _WAIT:
                if self._enforce(j, force=False):
                    continue
                self._pos = j
                return
            if nxt == _RESTART:  # decide the same event again, as a whole (a run of "...")
                i, again = j, True
            else:
                i = nxt

    def _event(self, ch: str, j: int, final: bool) -> int:
        if ch in _CUE_OPENERS:
            return self._cue(j, final)
        if ch in _TERMINATORS:
            return self._terminator(j, final)
        return self._clause(j, final)

    def _terminator(self, j: int, final: bool) -> int:
        """A run of sentence-end marks (and closing quotes) starting at ``j``."""
        buf, n = self._buf, len(self._buf)
        r = j
        while r < n and buf[r] in _TERMINATORS:
            r += 1
        kind = _run_kind(buf[j:r])
        while r < n and buf[r] in _CLOSERS:
            r += 1
        if r >= n and not final:
            return _WAIT
        nxt = buf[r] if r < n else ""
        if kind == _KIND_NOSPACE:
            end = True
        elif nxt != " ":
            end = kind == _KIND_STRONG and nxt != "" and _is_nospace(nxt)
        elif r + 1 >= n:
            if not final:
                return _WAIT
            end = False
        else:
            after = buf[r + 1]
            if kind == _KIND_STRONG:
                end = not after.islower()
            elif kind == _KIND_ELLIPSIS:
                if after == "I":  # "Well... I think" goes on, "I see... It is" ends
                    if r + 2 >= n and not final:
                        return _WAIT
                    end = r + 2 < n and buf[r + 2].isalpha()
                else:
                    end = after.isupper() or after.istitle()
            elif after.islower() or after.isdigit():
                end = False
            else:
                if self._enforce(r, force=False):
                    return _RESTART
                end = not self._abbreviation_before(j)
        if end:
            return r if self._cut(r) else _RESTART
        if kind == _KIND_ELLIPSIS and nxt == " " and self._first:
            return self._first_clause(r)
        return r

    def _clause(self, j: int, final: bool) -> int:
        """A clause mark at ``j``; only looked at while the first segment is open."""
        buf, n = self._buf, len(self._buf)
        ch = buf[j]
        r = j + 1
        while r < n and buf[r] in _CLOSERS:
            r += 1
        if r >= n and not final:
            return _WAIT
        nxt = buf[r] if r < n else ""
        if ch in _NOSPACE_CLAUSE or ch == "—":
            boundary = True
        elif ch == "-":
            boundary = j > self._start and buf[j - 1] == " " and nxt == " "
        else:
            boundary = nxt == " "
        return self._first_clause(r) if boundary else r

    def _first_clause(self, cut: int) -> int:
        """A clause boundary at ``cut``: the end of the first segment if enough words precede it."""
        if self._enforce(cut, force=False):
            return _RESTART
        if self._first and self._words_at_least(self._start, cut, self._cfg.first_min_words):
            return cut if self._cut(cut) else _RESTART
        return cut

    def _cue(self, j: int, final: bool) -> int:
        """A ``[`` or ``♪`` at ``j``: a cue/lyric if closed within its bound, else plain text."""
        buf, n = self._buf, len(self._buf)
        lyric = buf[j] == "♪"
        closer, bound = (
            ("♪", self._cfg.max_lyric_chars) if lyric else ("]", self._cfg.max_cue_chars)
        )
        limit = j + 1 + bound
        q = buf.find(closer, j + 1, min(n, limit))
        if q < 0:
            return j + 1 if n >= limit or final else _WAIT
        if not lyric:
            self._add_region(j, q, lyric=False)
            return q + 1
        r = q + 1  # the closing note ends a sentence like "!" does
        if r >= n or (buf[r] == " " and r + 1 >= n):
            if not final:
                return _WAIT
            end = False
        elif buf[r] == " ":
            end = not buf[r + 1].islower()
        else:
            end = _is_nospace(buf[r])
        self._add_region(j, q, lyric=True)
        if end:
            return r if self._cut(r) else _RESTART
        return r

    def _past_region(self, c: int) -> int:
        """``c``, or just after the cue or lyric that a cut at ``c`` would fall inside."""
        for opener, closer, _ in reversed(self._regions):
            if opener < c <= closer:
                return closer + 1
            if closer < c:
                break
        return c

    def _add_region(self, opener: int, closer: int, lyric: bool) -> None:
        if not self._regions or self._regions[-1][0] != opener:
            self._regions.append((opener, closer, lyric))

    def _abbreviation_before(self, j: int) -> bool:
        """Whether the word before the ``.`` at ``j`` makes it no sentence end."""
        k = max(self._buf.rfind(" ", self._start, j) + 1, self._start)
        word = self._buf[k:j].lstrip(_OPENING).rstrip(_CLOSERS)
        if not word:
            return False
        if word.isdigit():
            return len(word) <= 2  # an ordinal: "am 3. Oktober"
        if len(word) == 1:
            return word.isalpha()  # an initial
        if word.casefold() in self._cfg.abbreviations:
            return True
        parts = word.split(".")
        return len(parts) > 1 and all(p.isalpha() and len(p) <= 2 for p in parts)

    def _word_limit(self, final: bool) -> tuple[int, int] | None:
        """Where the ``first_max_words``-th word of the segment ends, once that cut is decided.

        The cut is decided once ``first_min_words`` more words have arrived without a sentence
        end or clause boundary among them, so that a sentence a little longer than the limit
        is not cut into a long segment and a tail of a word or two. Returns ``(cut, seen)``,
        ``seen`` being where the last of those words ends: the cut holds if no event comes
        before ``seen``. None while undecided, or when the text ends before those words.
        """
        key = (self._start, len(self._buf), final)
        if key != self._limit_key:
            self._limit_key = key
            self._limit_value = None
            n = len(self._buf)
            bound = self._start + self._cfg.max_chars  # beyond it the length limit cuts first
            units = _UNIT.finditer(self._buf, self._start, min(n, bound + 1))
            cut = -1
            for words, m in enumerate(units, 1):
                if m.end() > bound or (m.end() == n and not final):
                    break
                if words == self._cfg.first_max_words:
                    cut = m.end()
                if words == self._cfg.first_max_words + self._cfg.first_min_words:
                    if m.end() < n:  # the text's last word ends the segment anyway
                        self._limit_value = (cut, m.end())
                    break
        return self._limit_value

    def _words_at_least(self, a: int, b: int, k: int) -> bool:
        return any(words >= k for words, _ in enumerate(_UNIT.finditer(self._buf, a, b), 1))

    # -- cutting ------------------------------------------------------------------------------

    def _cut(self, c: int) -> bool:
        """End the segment at ``c``. False if length-limit cuts came first (decide again)."""
        if self._enforce(c, force=True):
            return False
        self._emit(c)
        return True

    def _emit(self, c: int) -> None:
        if c <= self._start:
            return
        segment = self._buf[self._start : c].strip(" ")
        if segment:
            if _SPEAKABLE.search(segment):
                self._out.append(segment)
                self._first = False
            else:
                self.dropped += 1
        self._start = c + 1 if c < len(self._buf) and self._buf[c] == " " else c
        self._check_len = self._cheap + 1

    def _tokens(self, a: int, b: int) -> int | None:
        """Tokens of the segment ``[a, b)`` if it fits the limits, else None."""
        segment = self._buf[a:b].strip(" ")
        size = len(segment)
        if size > self._cfg.max_chars:
            return None
        if size <= self._cheap:
            return math.ceil(size * self._cfg.max_tokens_per_char)
        try:
            tokens = operator.index(self._count_tokens(segment))
        except TypeError:
            raise InvalidOption("count_tokens must return an int") from None
        return tokens if tokens <= self._cfg.max_tokens else None

    def _enforce(self, end: int, force: bool) -> bool:
        """Cut off a prefix if the segment up to ``end`` is over the limit; True if cut.

        At most one cut per call: the caller decides again with the new segment start (whose
        first-segment rule or events may now apply), and calls again. Without ``force``, tokens
        are counted only once the segment may have outgrown the limit since the last count
        (each character adds at most ``max_tokens_per_char`` tokens).
        """
        length = end - self._start
        if length <= 0 or (not force and length < self._check_len):
            return False
        tokens = self._tokens(self._start, end)
        if tokens is None:
            self._emit(self._longest_fit(self._start, end))
            return True
        slack = int((self._cfg.max_tokens - tokens) / self._cfg.max_tokens_per_char)
        self._check_len = max(min(length + 1 + slack, self._cfg.max_chars + 1), length + 1)
        return False

    def _longest_fit(self, a: int, end: int) -> int:
        """Where to cut ``[a, end)``, which is over the limit: see "Length limit" above."""
        lo, hi = a + min(self._cheap, end - a - 1), end  # [a, lo) fits, [a, hi) does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._tokens(a, mid) is None:
                hi = mid
            else:
                lo = mid
        return self._best_cut(a, lo, end)

    def _best_cut(self, a: int, fit: int, end: int) -> int:
        """The preferred cut in ``(a, fit]``, or the first character boundary if none."""
        buf = self._buf
        openers = [p for p, _, _ in self._regions]

        def region(c: int) -> tuple[int, int, bool] | None:
            k = bisect.bisect_left(openers, c) - 1
            return self._regions[k] if k >= 0 and c <= self._regions[k][1] else None

        clause = 0
        for m in _CLAUSE_CUT.finditer(buf, a, fit + 1):
            if a < m.start() and m.end() <= fit and region(m.end()) is None:
                clause = m.end()
        if clause and 2 * (clause - a) >= fit - a:
            return clause
        word = lyric = 0
        c = buf.rfind(" ", a + 1, fit + 1)
        while c > a and (word == 0 or lyric == 0):
            inside = region(c)
            if inside is None:
                word = word or c
            elif inside[2]:
                lyric = lyric or c
            c = buf.rfind(" ", a + 1, c)
        for c in range(fit, max(a, word, clause), -1):
            if (
                (_is_nospace(buf[c - 1]) or _is_nospace(buf[c]))
                and (buf[c].isalnum() and unicodedata.category(buf[c]) != "Lm")
                and buf[c - 1] not in _OPENING
                and region(c) is None
            ):
                return c
        if word or clause:
            return max(word, clause)
        if lyric:
            return lyric
        for c in range(fit, a, -1):
            if _char_boundary(buf, c):
                return c
        for c in range(a + 1, end):
            if _char_boundary(buf, c):
                return c
        return end

    # -- bookkeeping --------------------------------------------------------------------------

    def _compact(self) -> None:
        """Drop the text before the current segment, so the buffer stays about one segment."""
        s = self._start
        if s == 0:
            return
        self._buf = self._buf[s:]
        self._pos = max(self._pos - s, 0)
        self._start = 0
        self._regions = [(p - s, q - s, lyric) for p, q, lyric in self._regions if q >= s]
        self._limit_key = None

    def _take(self) -> list[str]:
        out, self._out = self._out, []
        return out

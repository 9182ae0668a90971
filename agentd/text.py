"""Speakable pieces of streamed text, and transcript heuristics; Hebrew-aware.

Theory of operation. The LLM streams tokens; TTS wants whole sentences (good
prosody) as early as possible (low latency). `SentenceSplitter` scans its
buffer left to right for the first *decidable* boundary:

* a run of `. ? ! …` (e.g. "?!", "..."), optionally followed by closing quotes
  or brackets, then whitespace. If the buffer ends inside that pattern the
  splitter waits for the next character: "3." may become "3.5". Only the
  end of a flushed stream counts as "followed by the end".
* a blank line ("\\n\\n", spaces allowed in between);
* for the first piece only, when asked: a clause boundary (", " ";" ":" or a
  spaced dash) once the piece is long enough, so the first audio starts
  sooner.

Because a boundary decision depends only on text already seen plus a bounded
look-ahead, and scanning never skips an undecided position, feeding the same
text char by char or in one push gives the same pieces.

What never splits, and why it falls out of the rules: geresh/gershayim
(`וכו'`, `צה"ל`) and maqaf (`בית־ספר`, `054-1234567`) are not terminators;
decimals, times, money and in-word ellipses ("3.5", "9:00", "1,200.50",
"wait...what") have no whitespace after the mark. Two rules are explicit: a
dot after a common English abbreviation ("Dr.", "e.g.") and a list number at
the start of a line ("1. ") do not end a sentence.
"""

import enum
import types
import unicodedata
from collections.abc import Mapping

_TERMINATORS = frozenset(".?!…")
_ELLIPSIS = frozenset(".…")
# What may follow a terminator and still belong to the sentence: closing quotes and brackets
# (ASCII and typographic; gershayim/geresh double as quotes in Hebrew text).
_CLOSERS = frozenset("\"'”’»)]}״׳")
_CLAUSE_MARKS = frozenset(",;:")
_CLAUSE_DASHES = frozenset("-–—")  # NOT the maqaf "־": that joins words
_HSPACE = frozenset(" \t\r\f\v\u00a0")
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "st", "sr", "jr", "mt", "vs", "e.g", "i.e", "cf"})
_MAX_LIST_DIGITS = 2

_WAIT, _NO, _CUT = "wait", "no", "cut"

# --- shared look-behind rules ------------------------------------------------


def _is_ascii_digit(ch: str) -> bool:
    return "0" <= ch <= "9"


def _abbreviation_before(text: str, dot: int) -> bool:
    """True when text[dot] == "." closes a known abbreviation ("Dr", "e.g")."""
    start = dot
    while start > 0 and (text[start - 1].isalpha() or text[start - 1] == "."):
        start -= 1
    return text[start:dot].lower() in _ABBREVIATIONS


def _list_number_before(text: str, dot: int) -> bool:
    """True for "1." / "12." standing alone at the start of the text or of a line."""
    start = dot
    while start > 0 and _is_ascii_digit(text[start - 1]):
        start -= 1
    if not 0 < dot - start <= _MAX_LIST_DIGITS:
        return False
    line_prefix = text[:start].rpartition("\n")[2]
    return not line_prefix.strip()


# --- boundary checks: each returns (verdict, index) ------------------------------
# _CUT: cut the buffer at index. _NO: no boundary here, resume scanning at index.
# _WAIT: undecidable until more text arrives (index unused).


def _at_terminator(buf: str, i: int, final: bool) -> tuple[str, int]:
    n = len(buf)
    run_end = i
    while run_end < n and buf[run_end] in _TERMINATORS:
        run_end += 1
    end = run_end
    while end < n and buf[end] in _CLOSERS:
        end += 1
    if end == n:
        return (_CUT, n) if final else (_WAIT, i)
    if not buf[end].isspace():
        return _NO, run_end  # "3.5", "wait...what", "example.com"
    if run_end - i == 1 and buf[i] == "." and (_abbreviation_before(buf, i) or _list_number_before(buf, i)):
        return _NO, run_end
    return _CUT, end


def _at_newline(buf: str, i: int, final: bool) -> tuple[str, int]:
    n = len(buf)
    after = i + 1
    while after < n and buf[after] in _HSPACE:
        after += 1
    if after == n:
        return (_NO, n) if final else (_WAIT, i)
    if buf[after] == "\n":
        return _CUT, after + 1
    return _NO, after


def _at_clause(buf: str, i: int, final: bool, min_chars: int) -> tuple[str, int]:
    """A clause mark or a spaced dash, followed by whitespace and then more text."""
    if buf[i] in _CLAUSE_DASHES and (i == 0 or not buf[i - 1].isspace()):
        return _NO, i + 1  # "054-1234567", "9:00-17:00", "well-known"
    if len(buf[: i + 1].strip()) < min_chars:
        return _NO, i + 1
    n = len(buf)
    text_at = i + 1
    while text_at < n and buf[text_at].isspace():
        text_at += 1
    if text_at == n:
        return (_NO, n) if final else (_WAIT, i)
    if text_at == i + 1:
        return _NO, i + 1  # "9:00", "1,200": no space after the mark
    return _CUT, i + 1


class SentenceSplitter:
    """Cut streamed text into speakable pieces (see the module docstring).

    `push` returns the pieces completed by the new text; `flush` ends the
    stream and returns the rest. Pieces are stripped and never empty. After
    `flush` the splitter is ready for a new stream (first-clause rule included).
    """

    def __init__(self, first_clause_min_chars: int = 0) -> None:
        if first_clause_min_chars < 0:
            raise ValueError(f"first_clause_min_chars must be >= 0, got {first_clause_min_chars}")
        self._first_clause_min_chars = first_clause_min_chars
        self._buffer = ""
        self._scanned = 0  # buffer[:_scanned] holds no boundary, whatever follows
        self._emitted = False

    def __repr__(self) -> str:
        return f"SentenceSplitter(pending={self._buffer!r}, first_piece_done={self._emitted})"

    def push(self, text: str) -> list[str]:
        """Add streamed text; return the pieces it completes (maybe none)."""
        self._buffer += text
        return self._drain(final=False)

    def flush(self) -> list[str]:
        """End of stream: return every remaining piece, then reset."""
        pieces = self._drain(final=True)
        rest = self._buffer.strip()
        if rest:
            pieces.append(rest)
        self._buffer, self._scanned, self._emitted = "", 0, False
        return pieces

    def _drain(self, final: bool) -> list[str]:
        pieces = []
        while (cut := self._find_cut(final)) is not None:
            piece = self._buffer[:cut].strip()
            self._buffer, self._scanned = self._buffer[cut:], 0
            if piece:
                pieces.append(piece)
                self._emitted = True
        return pieces

    def _find_cut(self, final: bool) -> int | None:
        """Index of the first boundary in the buffer, or None (none yet / must wait)."""
        buf = self._buffer
        clause_min = self._first_clause_min_chars if not self._emitted else 0
        i = self._scanned
        while i < len(buf):
            ch = buf[i]
            if ch in _TERMINATORS:
                verdict, index = _at_terminator(buf, i, final)
            elif ch == "\n":
                verdict, index = _at_newline(buf, i, final)
            elif clause_min and (ch in _CLAUSE_MARKS or ch in _CLAUSE_DASHES):
                verdict, index = _at_clause(buf, i, final, clause_min)
            else:
                i += 1
                continue
            if verdict == _CUT:
                return index
            if verdict == _WAIT:
                self._scanned = i
                return None
            i = index
        self._scanned = len(buf)
        return None


def split_sentences(text: str, *, first_clause_min_chars: int = 0) -> list[str]:
    """All speakable pieces of a complete text (push + flush in one go)."""
    splitter = SentenceSplitter(first_clause_min_chars)
    return splitter.push(text) + splitter.flush()


# --- transcript comparison -------------------------------------------------------

# Hebrew points and cantillation marks (niqqud, te'amim): combining marks in U+0591..U+05C7.
# The punctuation in that range (maqaf, paseq, sof pasuq) is left to the P* rule.
_NIQQUD = {cp: None for cp in range(0x0591, 0x05C8) if unicodedata.category(chr(cp)) == "Mn"}
_SEPARATING_PUNCT = frozenset({"Pd", "Ps", "Pe", "Pc"})  # dashes/maqaf, brackets, underscores


def normalize_for_match(text: str) -> str:
    """Canonical form for comparing two transcripts of the same speech.

    NFKC, casefold, Hebrew niqqud removed, punctuation (Unicode P*) dropped,
    whitespace collapsed. Dashes, maqaf and brackets become spaces ("בית־ספר"
    matches "בית ספר"); other punctuation vanishes in place, so "צה"ל"
    matches "צהל" and "don't" matches "dont".
    """
    text = unicodedata.normalize("NFKC", text).casefold().translate(_NIQQUD)
    kept = []
    for ch in text:
        category = unicodedata.category(ch)
        if category[0] != "P":
            kept.append(ch)
        elif category in _SEPARATING_PUNCT:
            kept.append(" ")
    return " ".join("".join(kept).split())


# --- strong partials ---------------------------------------------------------------

# Last words after which a caller is mid-phrase, whatever the pause says. One table, by kind, so
# someone who knows the language can review a list at a glance. Matched against the last word
# casefolded, niqqud and edge punctuation removed. Left out on purpose: words that also end
# sentences ("in", "on", "up", "by", "so", "that", "like"; Hebrew "לפני", "אחרי", "מאז", "גם").
UNFINISHED_ENDINGS: Mapping[str, frozenset[str]] = types.MappingProxyType({
    # A Hebrew prefix letter written as a word of its own: the recogniser has heard the particle
    # (ו "and", ה "the", ב "in", ל "to", מ "from", כ "as", ש "that") but not the word it joins.
    "hebrew prefix particle": frozenset("והבלמכש"),
    # Prefix letters stacked with nothing after them ("ושה..." = "and that the ..."). Not "מה",
    # "לה", "בה", "כה", "של", "שב": those are whole words.
    "hebrew prefix cluster": frozenset({"וה", "וב", "ול", "ומ", "וכ", "וש", "שה", "ושה", "שמ", "כש", "וכש", "מש"}),
    "hebrew conjunction": frozenset({"אבל", "או", "כי", "אם", "אלא", "וגם", "כדי", "כאשר", "למרות", "בגלל"}),
    "hebrew relative": frozenset({"אשר"}),  # the bare ש is a prefix particle above
    "hebrew preposition": frozenset({"את", "על", "של", "עם", "אל", "בין", "כמו", "בשביל", "לגבי", "אצל",
                                     "עד", "בלי", "לפי", "ליד", "מול", "לקראת"}),
    "english conjunction": frozenset({"and", "or", "but", "nor", "because", "if", "than", "unless", "whether",
                                      "although"}),
    "english preposition": frozenset({"to", "for", "with", "of", "at", "from", "about", "into", "onto", "between",
                                      "without", "until", "towards", "toward"}),
    "english article": frozenset({"the", "a", "an", "my", "your", "our", "their", "every"}),
    "english title": frozenset({"mr", "mrs", "ms", "dr", "prof"}),  # "... talk to Dr." - a name must follow
})
# A question may end on a stranded preposition ("Where are you from?", "What is it for?") or on
# "את" as the pronoun "you" ("מי את?"): after these, a question mark means the sentence is done.
_STRANDABLE = UNFINISHED_ENDINGS["english preposition"] | {"את"}
_UNFINISHED = frozenset().union(*UNFINISHED_ENDINGS.values())
# Stripped from both ends of the last word; the apostrophe and geresh are kept, because "ב'"
# (grade/letter two) is a whole word, unlike the particle "ב".
_WORD_EDGE_PUNCT = ".,;:!?…\"“”„«»()[]{}״-–—־"


class Strength(enum.Enum):
    """How complete an interim transcript looks (see `partial_strength`)."""

    WEAK = "weak"  # too short, or the last word leaves the phrase open: only silence ends the turn
    BARE = "bare"  # long enough but without sentence punctuation: the caller may well go on
    PUNCTUATED = "punctuated"  # ends a sentence: the strongest evidence a transcript gives


def _last_word(text: str) -> str:
    for token in reversed(text.split()):
        core = token.translate(_NIQQUD).strip(_WORD_EDGE_PUNCT).casefold()
        if core:
            return core
    return ""


def ends_unfinished(text: str) -> bool:
    """Does the transcript stop mid-phrase (its last word is in `UNFINISHED_ENDINGS`)?

    A question mark after a word that questions may end on (a stranded English
    preposition, Hebrew "את" as "you") counts as finished.
    """
    word = _last_word(text)
    if word not in _UNFINISHED:
        return False
    return not (word in _STRANDABLE and text.rstrip().rstrip("".join(_CLOSERS)).endswith("?"))


def ends_with_sentence_punct(text: str) -> bool:
    """The stripped text ends a sentence per the splitter's rules, conservatively.

    Stricter than the splitter in two ways that suit a partial transcript: a
    digit before the final dot may still grow into a decimal in the next
    partial, and a trailing ellipsis means the caller is trailing off.
    """
    text = text.strip().rstrip("".join(_CLOSERS))
    end = len(text)
    start = end
    while start > 0 and text[start - 1] in _TERMINATORS:
        start -= 1
    run = text[start:end]
    if not run:
        return False
    if run == ".":
        digit_before = start > 0 and _is_ascii_digit(text[start - 1])
        return not (digit_before or _abbreviation_before(text, start))
    return not set(run) <= _ELLIPSIS  # "...", "…" (but "?.." and "!!" are fine)


def partial_strength(text: str, *, punct_min_chars: int = 12, bare_min_chars: int = 18) -> Strength:
    """Classify an interim transcript for end-of-turn decisions.

    WEAK when the stripped text is empty, `ends_unfinished`, or too short;
    PUNCTUATED when it has >= punct_min_chars and `ends_with_sentence_punct`;
    BARE when it has >= bare_min_chars without such punctuation (Hebrew
    transcripts often carry none, and a caller who hesitates mid-sentence
    leaves an unpunctuated partial behind, so the FSM waits longer on BARE).
    """
    text = text.strip()
    if not text or ends_unfinished(text):
        return Strength.WEAK
    if len(text) >= punct_min_chars and ends_with_sentence_punct(text):
        return Strength.PUNCTUATED
    return Strength.BARE if len(text) >= bare_min_chars else Strength.WEAK


def is_strong_partial(text: str, *, punct_min_chars: int = 12, bare_min_chars: int = 18) -> bool:
    """Is this interim transcript likely a complete utterance (`partial_strength` is not WEAK)?"""
    strength = partial_strength(text, punct_min_chars=punct_min_chars, bare_min_chars=bare_min_chars)
    return strength is not Strength.WEAK

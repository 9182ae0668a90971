"""Speakable pieces from streamed LLM text, transcript matching and strong partials."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentd.text import (
    UNFINISHED_ENDINGS,
    SentenceSplitter,
    Strength,
    ends_unfinished,
    is_strong_partial,
    normalize_for_match,
    partial_strength,
    split_sentences,
)


def char_by_char(text: str, **kwargs) -> list[str]:
    splitter = SentenceSplitter(**kwargs)
    pieces = [piece for ch in text for piece in splitter.push(ch)]
    return pieces + splitter.flush()


# --- sentence ends ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "pieces"),
    [
        ("Hello there. How are you? Fine!", ["Hello there.", "How are you?", "Fine!"]),
        ("Really?! Yes... Okay. Wait… what", ["Really?!", "Yes...", "Okay.", "Wait…", "what"]),
        ('He said "stop." Then left.', ['He said "stop."', "Then left."]),
        ("(See above.) Next.", ["(See above.)", "Next."]),
        ("First part\n\nSecond part", ["First part", "Second part"]),
        ("First part\n  \nSecond part", ["First part", "Second part"]),
        ("no punctuation at all", ["no punctuation at all"]),
        ("   ", []),
        ("", []),
        ("Done.\n\n\n\nNext.", ["Done.", "Next."]),
    ],
)
def test_sentence_ends(text, pieces):
    assert split_sentences(text) == pieces


@pytest.mark.parametrize(
    ("text", "pieces"),
    [
        ("שלום! מה שלומך? אני בסדר.", ["שלום!", "מה שלומך?", "אני בסדר."]),
        ("הזמנתי לך תור. נתראה מחר!", ["הזמנתי לך תור.", "נתראה מחר!"]),
    ],
)
def test_hebrew_sentence_ends(text, pieces):
    assert split_sentences(text) == pieces


NEVER_SPLIT = [
    ("geresh ASCII", "יש פירות, ירקות וכו' במבצע היום."),
    ("geresh Hebrew", "יש פירות וכו׳ ועוד הרבה."),
    ("letter with geresh", "הוא בכיתה ג' בבית הספר."),
    ("gershayim ASCII", 'הוא שירת בצה"ל שלוש שנים.'),
    ("gershayim Hebrew", "ד״ר כהן יקבל אותך מחר."),
    ("gershayim company", 'החברה בע"מ נמצאת בתל אביב.'),
    ("maqaf", "אני בבית־ספר עכשיו."),
    ("hyphen hours", "אנחנו פתוחים 9:00-17:00 כל יום."),
    ("decimal", "The price rose 3.5 percent today."),
    ("time", "See you at 17:30 tomorrow."),
    ("phone", "Call me at 054-1234567 any time."),
    ("shekels", "It costs ₪1,200 per month."),
    ("money with cents", "That is 1,200.50 in total."),
    ("Dr.", "Dr. Cohen will see you now."),
    ("Mr. and Mrs.", "Mr. and Mrs. Levi are here."),
    ("e.g.", "Bring something, e.g. a passport."),
    ("i.e.", "Come early, i.e. before nine."),
    ("St.", "We are on Herzl St. near the park."),
    ("ellipsis inside a word", "It was good...ish overall."),
    ("url", "Visit example.com/help?q=1 for more."),
    ("list number at start", "1. Book a table for two."),
]


@pytest.mark.parametrize("text", [t for _, t in NEVER_SPLIT], ids=[name for name, _ in NEVER_SPLIT])
def test_traps_that_never_split(text):
    assert split_sentences(text) == [text]
    assert char_by_char(text) == [text]


def test_a_trailing_dot_waits_for_the_next_character():
    splitter = SentenceSplitter()
    assert splitter.push("It costs 3.") == []  # could be "3.5"
    assert splitter.push("5 shekels. And") == ["It costs 3.5 shekels."]
    assert splitter.flush() == ["And"]


def test_a_dot_at_the_end_of_a_flushed_stream_ends_the_sentence():
    splitter = SentenceSplitter()
    assert splitter.push("I have 3.") == []
    assert splitter.flush() == ["I have 3."]


def test_a_number_then_dot_mid_sentence_still_ends_it():
    assert split_sentences("I have 3. Then more.") == ["I have 3.", "Then more."]


def test_a_single_newline_does_not_end_a_piece():
    assert split_sentences("We have:\n- pizza\n- pasta") == ["We have:\n- pizza\n- pasta"]


def test_list_items_on_their_own_lines_are_not_cut_after_their_number():
    text = "Options:\n\n1. Pizza.\n2. Pasta."
    assert split_sentences(text) == ["Options:", "1. Pizza.", "2. Pasta."]


def test_pieces_are_stripped_and_never_empty():
    assert split_sentences("  Hi.   \n\n\n  Bye.  ") == ["Hi.", "Bye."]


def test_push_returns_pieces_as_soon_as_they_are_decidable():
    splitter = SentenceSplitter()
    assert splitter.push("Hello") == []
    assert splitter.push(" there.") == []
    assert splitter.push(" How") == ["Hello there."]
    assert splitter.push(" are you?\n") == ["How are you?"]
    assert splitter.flush() == []


def test_flush_resets_for_a_new_stream():
    splitter = SentenceSplitter(first_clause_min_chars=5)
    assert splitter.push("First reply, with a clause.") == ["First reply,"]
    assert splitter.flush() == ["with a clause."]
    assert splitter.push("Second reply, also early. ") == ["Second reply,", "also early."]


# --- first clause -------------------------------------------------------------------------


def test_first_piece_may_end_at_a_comma_once_long_enough():
    text = "Sure, I can book that for you, what time works? Great, thanks."
    assert split_sentences(text, first_clause_min_chars=10) == [
        "Sure, I can book that for you,",
        "what time works?",
        "Great, thanks.",
    ]


def test_first_clause_rule_is_off_by_default():
    assert split_sentences("Sure, I can book that for you, what time works?") == [
        "Sure, I can book that for you, what time works?"
    ]


@pytest.mark.parametrize(
    ("text", "first"),
    [
        ("כמובן, אשמח לעזור לך עם ההזמנה, לאיזו שעה?", "כמובן, אשמח לעזור לך עם ההזמנה,"),
        ("Let me check the calendar; one moment please.", "Let me check the calendar;"),
        ("Here is what I found: two free slots.", "Here is what I found:"),
        ("I'd love to help you – what is your name?", "I'd love to help you –"),
    ],
)
def test_first_clause_boundaries(text, first):
    assert split_sentences(text, first_clause_min_chars=12)[0] == first


@pytest.mark.parametrize(
    "text",
    [
        "We open at 9:00 and close at 17:00 every day.",
        "It costs ₪1,200 for the whole package deal.",
        "Call 054-1234567 to reach the front desk now.",
        "Our well-known chef cooks every evening here.",
        "בבית־ספר הזה לומדים עד השעה שלוש בצהריים.",
    ],
)
def test_first_clause_never_cuts_inside_numbers_or_words(text):
    assert split_sentences(text, first_clause_min_chars=5) == [text]


def test_first_clause_waits_for_text_after_the_comma():
    splitter = SentenceSplitter(first_clause_min_chars=5)
    assert splitter.push("Of course,") == []
    assert splitter.push(" ") == []
    assert splitter.push("I") == ["Of course,"]


def test_a_comma_at_the_very_end_is_not_a_separate_piece():
    assert split_sentences("Of course, ", first_clause_min_chars=5) == ["Of course,"]


def test_first_clause_needs_the_minimum_length():
    assert split_sentences("Yes, of course. Bye.", first_clause_min_chars=10) == ["Yes, of course.", "Bye."]


def test_only_the_first_piece_ends_early():
    text = "Okay. Well, then, we are done, thanks."
    assert split_sentences(text, first_clause_min_chars=3) == ["Okay.", "Well, then, we are done, thanks."]


# --- streaming equivalence ------------------------------------------------------------------

STREAM_SAMPLES = [
    "Dr. Cohen said 3.5 is fine... Really?! Yes. Call 054-1234567 at 9:00. Done",
    'שלום, הגעתם לצה"ל. ד״ר כהן וכו\' יחזרו אליכם בשעה 17:30. תודה!\n\nלהתראות',
    "Options:\n\n1. Pizza.\n2. Pasta.\n\n₪1,200.50 total, e.g. cash.",
    'He said "go." (Then left.) Okay… fine',
]


@pytest.mark.parametrize("text", STREAM_SAMPLES)
@pytest.mark.parametrize("first_clause_min_chars", [0, 8])
def test_char_by_char_gives_the_same_pieces_as_one_push(text, first_clause_min_chars):
    whole = split_sentences(text, first_clause_min_chars=first_clause_min_chars)
    assert len(whole) > 1
    assert char_by_char(text, first_clause_min_chars=first_clause_min_chars) == whole


SPLITTER_ALPHABET = st.sampled_from(list("ab אב 39.?!…,;:-–־'\"״׳\n()") + ["Dr", "e.g", "St"])


@given(st.lists(SPLITTER_ALPHABET, max_size=60).map("".join), st.integers(0, 6))
def test_any_chunking_gives_the_same_pieces(text, first_clause_min_chars):
    whole = split_sentences(text, first_clause_min_chars=first_clause_min_chars)
    assert char_by_char(text, first_clause_min_chars=first_clause_min_chars) == whole
    assert all(piece and piece == piece.strip() for piece in whole)


@given(st.lists(SPLITTER_ALPHABET, max_size=60).map("".join), st.data())
def test_random_chunk_boundaries_give_the_same_pieces(text, data):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    splitter = SentenceSplitter()
    pieces = []
    for start, end in zip([0, *cuts], [*cuts, len(text)]):
        pieces += splitter.push(text[start:end])
    assert pieces + splitter.flush() == split_sentences(text)


@given(st.lists(SPLITTER_ALPHABET, max_size=60).map("".join))
def test_splitting_loses_no_text_but_whitespace(text):
    def squeeze(s: str) -> str:
        return "".join(s.split())

    assert squeeze("".join(split_sentences(text))) == squeeze(text)


# --- normalize_for_match -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Hello, World!", "hello world"),
        ("שָׁלוֹם עוֹלָם", "שלום עולם"),
        ('צה"ל', "צהל"),
        ("צה״ל", "צהל"),
        ("בית־ספר", "בית ספר"),
        ("  many   spaces\n", "many spaces"),
        ("Don't STOP…", "dont stop"),
        ("מה השעה?", "מה השעה"),
    ],
)
def test_normalize_for_match_makes_equivalent_transcripts_equal(a, b):
    assert normalize_for_match(a) == normalize_for_match(b) == b


def test_normalize_keeps_digits_and_currency():
    assert normalize_for_match("₪1,200 at 9:00") == "₪1200 at 900"


def test_normalize_tells_different_words_apart():
    assert normalize_for_match("אני רוצה לבטל") != normalize_for_match("אני רוצה להזמין")


# --- is_strong_partial ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "I need a table.",  # punctuated, >= 12
        "Is it open today?",
        "אני רוצה להזמין שולחן",  # bare Hebrew, >= 18
        "מתי אתם פותחים מחר?",
        "I'd like to book a room for tonight",  # bare English, >= 18
        "אני בכיתה ב' עכשיו",  # "ב'" is a word, not a particle
        "כן, זה מתאים לי.",
    ],
)
def test_strong_partials(text):
    assert is_strong_partial(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Hello.",  # punctuated but short
        "I need a table",  # bare and short
        "אני רוצה להזמין ו",  # bare prefix particle
        "אני רוצה לדבר עם ה",
        "אני רוצה לשלוח ל",
        "אני רוצה לבטל את",  # את at the end
        "אני רוצה לדבר על",
        "I would like to book a table and",
        "I would like to book the",
        "Could you connect me to",
        "I'm calling about a reservation for",
        "Near Herzl St.",  # abbreviation, not a sentence end
        "Bring an ID, e.g.",
        "I want to talk to Dr.",  # long enough, but a name must follow
        "The total was 3.",  # may still grow into "3.5"
        "I was thinking...",  # trailing off, and short
    ],
)
def test_weak_partials(text):
    assert not is_strong_partial(text)


def test_dangling_word_check_ignores_trailing_punctuation():
    assert not is_strong_partial("I would like a table for two, and.")
    assert not is_strong_partial("אני רוצה לבטל את.")


def test_thresholds_are_configurable():
    assert not is_strong_partial("Yes please.")
    assert is_strong_partial("Yes please.", punct_min_chars=5)
    assert is_strong_partial("yes please", bare_min_chars=10)
    assert not is_strong_partial("yes please", bare_min_chars=11)


# --- partial_strength: unfinished sentences -------------------------------------------------

WEAK, BARE, PUNCTUATED = Strength.WEAK, Strength.BARE, Strength.PUNCTUATED

STRENGTH_TABLE = [
    # English: a conjunction, preposition or article at the end leaves the phrase open
    ("I'd like to book a table for", WEAK),
    ("I'd like to book a table and", WEAK),
    ("Can you tell me about the", WEAK),
    ("I need someone to come and look at it to", WEAK),
    ("I'd like to book a table with", WEAK),
    ("I can't come tomorrow because", WEAK),
    ("Should I bring my passport or", WEAK),
    ("I'd like to speak to someone about a", WEAK),
    ("I am calling regarding my", WEAK),
    ("Is the shop open on Sunday, and", WEAK),
    ("I'd like to book a table for four people", BARE),
    ("I'd like to book a table for four people.", PUNCTUATED),
    ("What is it for?", PUNCTUATED),  # a stranded preposition ends a question
    ("Where are you calling from?", PUNCTUATED),
    ("Where are you calling from", WEAK),  # without the question mark it may go on
    ("I was thinking maybe...", BARE),  # trailing off is not sentence punctuation
    # Hebrew: a bare prefix letter, the relative ש, a conjunction or a preposition at the end
    ("אני רוצה להזמין שולחן ל", WEAK),
    ("אני רוצה להזמין שולחן ו", WEAK),
    ("אני רוצה להזמין את ה", WEAK),
    ("אני צריך לדעת ש", WEAK),
    ("אני רוצה להגיע מחר אבל", WEAK),
    ("אני רוצה לקבוע תור כי", WEAK),
    ("אפשר לקבוע תור או", WEAK),
    ("אני רוצה להזמין שולחן בשביל", WEAK),
    ("אני רוצה לדבר עם", WEAK),
    ("זה החדר אשר", WEAK),
    ("אני רוצה להזמין ושה", WEAK),  # stacked prefix letters
    ("אני רוצה להזמין שולחן", BARE),
    ("אני רוצה להזמין שולחן לארבעה אנשים מחר", BARE),
    ("אני רוצה להזמין שולחן לארבעה אנשים מחר.", PUNCTUATED),
    ("מי את?", WEAK),  # complete, but too short for either rule
    ("סליחה, מי מדבר איתי את?", PUNCTUATED),  # "את" as "you" ends a question
    # Hebrew words that merely START with a prefix letter are whole words
    ("אני רוצה להזמין שולחן בבקשה", BARE),
    ("אני רוצה להגיד תודה רבה לכם", BARE),
    ("אני רוצה שולחן לשניים הערב", BARE),
    ("תודה רבה לכם. שלום", BARE),
    ("אני רוצה להזמין שולחן, בבקשה.", PUNCTUATED),
    ("מה המחיר של זה בשבילכם?", PUNCTUATED),
    ("אני בכיתה ב' עכשיו", BARE),  # "ב'" is a word, not a particle
    ("כמה זה עולה לה?", PUNCTUATED),  # "לה" (to her) is a word, not a cluster
]


@pytest.mark.parametrize(("text", "strength"), STRENGTH_TABLE, ids=[t for t, _ in STRENGTH_TABLE])
def test_partial_strength(text, strength):
    assert partial_strength(text) is strength
    assert is_strong_partial(text) is (strength is not WEAK)


@pytest.mark.parametrize("word", ["for", "and", "the", "to", "with", "because", "or"])
def test_english_function_words_at_the_end_never_end_a_turn(word):
    text = f"I would like to book a table for tomorrow evening {word}"
    assert ends_unfinished(text)
    assert ends_unfinished(text + ".")  # recogniser punctuation does not close the phrase
    assert partial_strength(text + ".") is WEAK


@pytest.mark.parametrize("particle", list("והבלמכש"))
def test_every_bare_hebrew_prefix_letter_leaves_the_phrase_open(particle):
    assert partial_strength(f"אני רוצה להזמין שולחן {particle}") is WEAK


@pytest.mark.parametrize("word", ["בבקשה", "לכם", "שלום", "הבא", "מחר", "כן", "ולא", "בסדר", "שלנו", "כמה", "מה"])
def test_hebrew_words_starting_with_a_prefix_letter_are_complete(word):
    assert not ends_unfinished(f"אני רוצה את השולחן {word}")


def test_the_word_lists_do_not_overlap_with_whole_words_they_must_not_catch():
    every = frozenset().union(*UNFINISHED_ENDINGS.values())
    assert every.isdisjoint({"in", "on", "up", "so", "that", "like", "מה", "לה", "בה", "כה", "לפני", "אחרי"})


def test_a_long_unpunctuated_partial_is_bare_and_a_punctuated_one_is_not():
    assert partial_strength("we would like a table for two") is BARE
    assert partial_strength("we would like a table for two?") is PUNCTUATED
    assert partial_strength("Table for two.", bare_min_chars=100) is PUNCTUATED
    assert partial_strength("Table for two", bare_min_chars=100) is WEAK

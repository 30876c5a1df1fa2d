"""The first-name rule (`services/delivery/domain/names.py`): real names from many scripts are
printed exactly as written; placeholders, null words, titles and test entries fall back."""

# ruff: noqa: RUF001  (a corpus of names in many scripts: the look-alike letters are the point)

from __future__ import annotations

import pytest

from services.delivery.domain import (
    DeliveryRequest,
    ProfileView,
    Renderer,
    Send,
    Template,
    clean_first_name,
    decide,
    unsafe_output,
)

# Each kept exactly as written.
REAL_NAMES = [
    # Latin with diacritics
    "Åse",
    "Zoë",
    "Émile",
    "François",
    "Søren",
    "Þórunn",
    "Łukasz",
    "Jiří",
    "Ştefan",
    "Ayşe",
    "Đorđe",
    "José María",
    "Nguyễn Thị",
    "Ọlámidé",
    # Greek, Cyrillic
    "Ἀλέξανδρος",
    "Σοφία",
    "Ольга",
    "Фёдор",
    "Анна-Мария",
    # Arabic, Persian (with a zero-width non-joiner), Hebrew (with geresh, and with an apostrophe)
    "محمد",
    "فاطمة",
    "فاطمه\u200cزهرا",
    "דוד",
    "ג׳ורג׳",
    "ג'ורג'",
    # Devanagari, Bengali, Tamil, Thai (combining vowel signs)
    "स्मिता",
    "अर्जुन",
    "সৌমিত্র",
    "முருகன்",
    "สมชาย",
    "ณัฐวุฒิ",
    # CJK, Japanese, Korean: one Han or Hangul syllable is a whole name
    "李",
    "王小明",
    "さくら",
    "ジョン・スミス",
    "민준",
    "별",
    # Georgian, Armenian, Ethiopic
    "ნინო",
    "გიორგი",
    "Արամ",
    "Անի",
    "አበበ",
    # apostrophes, hyphens, dashes, particles, middle dot, initials
    "O'Brien",
    "O’Brien",
    "d'Artagnan",
    "Jean-Luc",
    "Jean–Luc",
    "Gal·la",
    "de la Cruz",
    "van der Berg",
    "McDonald",
    "MacKenzie",
    "DeShawn",
    "Mary Ann",
    "J. R.",
    "A.J.",
    # case as the person wrote it
    "ada",
    "ADA",
    "mcdonald",
    "ÉMILE",
    # short names, and names that merely start like a listed word
    "Jo",
    "Li",
    "Bo",
    "Nils",
    "Tess",
    "Testa",
    "Dean",
    "Drew",
    "Mrinal",
    "Nonna",
    "Dr Ada",
]

# Each refused: the template's fallback is printed instead.
NOT_NAMES = [
    None,
    42,
    "",
    "   ",
    # null words, in any case, alone, repeated or after a real name
    "None",
    "none",
    "NONE",
    "None None",
    "Åse None",
    "None Åse",
    "NULL NULL",
    "null",
    "Null",
    "nil",
    "NaN",
    "undefined",
    "Nil",  # also a real name: the documented price of refusing null words
    "Nan",
    # form labels and filler
    "Firstname Lastname",
    "First Name",
    "first name",
    "first-name",
    "first_name",
    "firstname",
    "fname",
    "name",
    "your name",
    "no name",
    "unknown",
    "n/a",
    "N/A",
    "n.a.",
    "asdf",
    "qwerty",
    "foo",
    "x",
    "xx",
    "xxx",
    "XXXX",
    # test and system entries
    "test",
    "TEST",
    "Test",
    "test user",
    "Test Test",
    "testuser",
    "Ada Test",
    "dummy",
    "ADMIN",
    "admin",
    "Administrator",
    "root",
    # generic customer words
    "Valued Customer",
    "customer",
    "Dear Customer",
    "guest",
    "Kunde",
    "subscriber",
    # titles and salutations alone
    "Mr",
    "Mr.",
    "Dr",
    "Dr.",
    "Dear",
    "Mrs",
    "Ms.",
    "Herr",
    "Madame",
    "Mr X",
    # digits
    "12345",
    "Ada1",
    "Ada ٣",
    # symbols, merge tags, addresses
    "-",
    "...",
    "?",
    "!!!",
    "Ada!",
    "Ada 🙂",
    "🙂",
    "Ada\x00",
    "Ada_Lovelace",
    "{{first_name}}",
    "{{ first_name }}",
    "[first name]",
    "[First Name]",
    "%FIRSTNAME%",
    "*|FNAME|*",
    "#Firstname",
    "${name}",
    "<name>",
    "ada@example.com",
    "www.example.com",
    "example.com",
    "http://spam",
    # implausible: too long, a lone initial
    "A" * 41,
    "J",
    "J.",
]

TEMPLATE = Template(
    "greet", "email", "en", "Hello {{ first_name | fallback('you') }}", "Hi {{ first_name }},\n"
)
FALLBACK = Template("greet", "email", "en", "Hello", "Hi {{ first_name | fallback('there') }},\n")


REQUEST = DeliveryRequest(
    idempotency_key="greet:p1:e1",
    tenant_id="shop",
    profile_id="p1",
    trigger_id="greet",
    channel="email",
    purpose="marketing",
    template_id="greet",
    variables={},
)


def profile(first_name: object) -> ProfileView:
    return ProfileView("p1", "ada@example.com", first_name, {("marketing", "email"): "granted"})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return Renderer()


@pytest.mark.parametrize("name", REAL_NAMES)
def test_a_real_name_is_kept_exactly_as_written(name: str) -> None:
    assert clean_first_name(name) == name


@pytest.mark.parametrize(
    ("raw", "printed"),
    [
        ("  Ada  ", "Ada"),
        ("Mary  Ann", "Mary Ann"),
        ("Mary\u00a0Ann", "Mary Ann"),
        ("\tde la  Cruz\n", "de la Cruz"),
        ("Zoe\u0308", "Zoë"),  # decomposed: the same letters, composed (NFC)
    ],
)
def test_only_whitespace_and_composition_are_normalized(raw: str, printed: str) -> None:
    assert clean_first_name(raw) == printed


@pytest.mark.parametrize("raw", NOT_NAMES)
def test_what_is_not_a_name_is_refused(raw: object) -> None:
    assert clean_first_name(raw) is None


@pytest.mark.parametrize("name", REAL_NAMES)
def test_a_real_name_is_sent_and_never_trips_the_output_check(renderer: Renderer, name: str) -> None:
    decision = decide(REQUEST, profile(name), TEMPLATE, renderer)
    assert isinstance(decision, Send)
    assert decision.body_text == f"Hi {name},\n"
    assert unsafe_output(decision.body_text) is None


@pytest.mark.parametrize("raw", [r for r in NOT_NAMES if isinstance(r, str)])
def test_a_value_that_is_not_a_name_falls_back_instead_of_blocking(renderer: Renderer, raw: str) -> None:
    decision = decide(REQUEST, profile(raw), FALLBACK, renderer)
    assert isinstance(decision, Send), decision
    assert decision.body_text == "Hi there,\n"


def test_none_none_would_have_blocked_the_message_had_it_been_printed(renderer: Renderer) -> None:
    """Why the rule must refuse it: the output check stops a message that prints 'None'."""
    assert unsafe_output("Hi None None,\n") == "output contains 'None'"
    decision = decide(REQUEST, profile("None None"), FALLBACK, renderer)
    assert isinstance(decision, Send) and decision.body_text == "Hi there,\n"

"""Hello #Firstname: which first names are fit to print.

`clean_first_name` returns the name to greet someone with, or None when the
stored value is not a name — the template then falls back
(`{{ first_name | fallback("there") }}`) instead of printing "Hi test," or
"Hi None None,". It never guesses a name and never edits one: a value is printed
exactly as the person wrote it (trimmed, inner whitespace collapsed, Unicode NFC)
or not at all.

The rule (the README's "Templates and names" states it too). A value is a name when
  1. it has at most `MAX_NAME_CHARS` characters;
  2. its form is a name's: words of letters of any script (with their combining marks
     and the zero-width (non-)joiners Persian and Indic names use) joined by one space,
     hyphen or en dash (Jean-Luc), apostrophe (O'Brien, d'Artagnan), middle dot
     (Gal·la, ジョン・スミス) or period (J. R.); no digits, no other symbols, so merge tags
     ({{first_name}}, *|FNAME|*, [First Name]), addresses and URLs are not names;
  3. it has two letters or more, or is one Han or Hangul syllable (李): one Latin
     letter is an initial, not a name to greet with;
  4. it is not one letter repeated (xxx) and not a known placeholder (n/a, asdf, ...);
  5. no word in it is a null word (None, NULL, nil, NaN, undefined) or a test word
     (test, dummy, ...), in any case: such a value came from broken or test data, so
     "Åse None" is no name, not "Åse" — printing a part of it would be a guess (the real
     names Nil and Nan get the fallback too: "Hi there" is harmless, "Hi nan," is not);
  6. not every word in it is a title or salutation (Mr, Dr, Dear), a generic
     customer word (Valued Customer, guest), a system word (ADMIN, root) or a form
     label (Firstname Lastname): "Dr Ada" is printed, "Dr" is not.
Case is never changed: "de la Cruz", "ADA" and "mcdonald" are printed as written.
Words are compared case-insensitively (casefold), so the lists are lower case.
"""

from __future__ import annotations

import re
import unicodedata

MAX_NAME_CHARS = 40

# Whole values (compared casefolded, inner whitespace collapsed, ends stripped of ".-_ ")
# that are filler rather than a name.
PLACEHOLDERS = frozenset(
    {
        "a",
        "aa",
        "abc",
        "asd",
        "asdf",
        "asdfg",
        "asdfgh",
        "bar",
        "baz",
        "blah",
        "foo",
        "foobar",
        "hello",
        "jkl",
        "me",
        "n.a.",
        "nn",
        "no",
        "qwe",
        "qwer",
        "qwerty",
        "qwertz",
        "sdf",
        "tba",
        "tbd",
        "x",
        "xx",
        "xyz",
        "yes",
    }
)

# Rule 5: a value with one of these words anywhere is no name.
NULL_WORDS = frozenset({"none", "null", "nil", "nan", "undefined"})
TEST_WORDS = frozenset(
    {"test", "tests", "testing", "tester", "testuser", "dummy", "fake", "lorem", "ipsum", "тест"}
)

# Rule 6: a value made only of these words is no name.
TITLES = frozenset(
    {
        "dear",
        "doctor",
        "dr",
        "frau",
        "herr",
        "hey",
        "hi",
        "madam",
        "madame",
        "miss",
        "mister",
        "mlle",
        "mme",
        "monsieur",
        "mr",
        "mrs",
        "ms",
        "mx",
        "prof",
        "professor",
        "rev",
        "señor",
        "señora",
        "sir",
        "sr",
        "sra",
    }
)
GENERIC_WORDS = frozenset(
    {
        "anonymous",
        "buyer",
        "client",
        "cliente",
        "contact",
        "customer",
        "friend",
        "guest",
        "kunde",
        "kundin",
        "member",
        "nobody",
        "person",
        "recipient",
        "shopper",
        "someone",
        "subscriber",
        "user",
        "valued",
        "visitor",
    }
)
SYSTEM_WORDS = frozenset(
    {"admin", "administrator", "demo", "example", "info", "root", "sample", "support", "system", "webmaster"}
)
FIELD_WORDS = frozenset(
    {
        "applicable",
        "available",
        "blank",
        "default",
        "empty",
        "first",
        "firstname",
        "fname",
        "full",
        "fullname",
        "given",
        "last",
        "lastname",
        "lname",
        "missing",
        "my",
        "name",
        "noname",
        "not",
        "placeholder",
        "prenom",
        "prénom",
        "surname",
        "unbekannt",
        "unknown",
        "username",
        "vorname",
        "your",
        "yourname",
    }
)
NOT_NAME_WORDS = TITLES | GENERIC_WORDS | SYSTEM_WORDS | FIELD_WORDS | PLACEHOLDERS | NULL_WORDS | TEST_WORDS

_SPACE = " "
_HYPHENS = "-\u2010\u2011\u2013"  # hyphen-minus, hyphen, non-breaking hyphen, en dash
_APOSTROPHES = "'\u2018\u2019"
_MIDDLE_DOTS = "\u00b7\u30fb"  # Catalan l·l, Japanese katakana middle dot
_IN_WORD = "\u200c\u200d\u05f3\u05f4"  # ZWNJ, ZWJ, Hebrew geresh and gershayim
# Rule 2 over one code per character: L letter or mark, S space, H hyphen or middle dot,
# A apostrophe, P period, X anything else. An apostrophe may also end a word (Hebrew ג'ורג').
_FORM = re.compile(r"L+(?:(?:S|H|A|P|PS|AS)L+)*[AP]?")
_SEPARATORS = re.compile(f"[{re.escape(_SPACE + _HYPHENS + _APOSTROPHES + _MIDDLE_DOTS)}.]+")
_URL = re.compile(r"(?i)(\bwww\.|\.(com|net|org|de|io|co|info|biz|ru|ch|uk)\b)")


def _code(c: str) -> str:
    if c.isalpha() or unicodedata.category(c).startswith("M") or c in _IN_WORD:
        return "L"
    if c == _SPACE:
        return "S"
    if c in _HYPHENS or c in _MIDDLE_DOTS:
        return "H"
    if c in _APOSTROPHES:
        return "A"
    return "P" if c == "." else "X"


_SYLLABLES = ("CJK UNIFIED IDEOGRAPH", "CJK COMPATIBILITY IDEOGRAPH", "HANGUL SYLLABLE")


def _is_syllable(c: str) -> bool:
    """A Han ideograph or Hangul syllable is a name on its own (李); a Latin letter is an initial."""
    return unicodedata.name(c, "").startswith(_SYLLABLES)


def _normalized(raw: str) -> str:
    return " ".join(unicodedata.normalize("NFC", raw).split())


def is_placeholder(name: str) -> bool:
    """True for words that are not someone's name (rules 4-6): null, test, title, generic, filler."""
    lowered = _normalized(name).casefold()
    if lowered in PLACEHOLDERS or lowered.strip(".-_ ") in PLACEHOLDERS:
        return True
    letters = [c for c in lowered if c.isalpha()]
    if len(letters) >= 3 and len(set(letters)) == 1:  # "xxx", "aaaa"
        return True
    words = [w for w in _SEPARATORS.split(lowered) if w]
    if any(w in NULL_WORDS or w in TEST_WORDS for w in words):
        return True
    return all(w in NOT_NAME_WORDS for w in words)


def clean_first_name(raw: object) -> str | None:
    """The first name to print exactly as written, or None when the value is not a name (see above)."""
    if not isinstance(raw, str):
        return None
    name = _normalized(raw)
    if not name or len(name) > MAX_NAME_CHARS:
        return None
    if not _FORM.fullmatch("".join(_code(c) for c in name)) or _URL.search(name):
        return None
    letters = [c for c in name if c.isalpha()]
    if len(letters) < 2 and not (len(letters) == 1 and _is_syllable(letters[0])):
        return None
    return None if is_placeholder(name) else name

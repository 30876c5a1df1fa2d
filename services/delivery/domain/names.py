"""Hello #Firstname: which first names are fit to print.

`clean_first_name` returns the name to greet someone with, or None when the
stored value is missing, a placeholder, a test entry or implausible — the
template then falls back (`{{ first_name | fallback("there") }}`) instead of
printing "Hi test," or "Hi *|FNAME|*,". It never guesses a name.
"""

from __future__ import annotations

import re
import unicodedata

MAX_NAME_CHARS = 40

# Compared after lower-casing and collapsing whitespace.
PLACEHOLDERS = frozenset(
    {
        "-",
        "--",
        "---",
        ".",
        "..",
        "...",
        "?",
        "??",
        "???",
        "_",
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
        "customer",
        "dummy",
        "empty",
        "first",
        "first name",
        "first-name",
        "first_name",
        "firstname",
        "fname",
        "foo",
        "foobar",
        "given name",
        "guest",
        "hello",
        "jkl",
        "kunde",
        "kundin",
        "me",
        "n.a.",
        "n/a",
        "name",
        "nil",
        "no",
        "no name",
        "nobody",
        "none",
        "noname",
        "not available",
        "not applicable",
        "null",
        "nn",
        "placeholder",
        "prénom",
        "prenom",
        "qwe",
        "qwer",
        "qwerty",
        "qwertz",
        "sample",
        "sdf",
        "someone",
        "test",
        "test test",
        "tester",
        "testing",
        "testuser",
        "tbd",
        "tba",
        "unbekannt",
        "unknown",
        "user",
        "username",
        "vorname",
        "x",
        "xx",
        "xxx",
        "xxxx",
        "xyz",
        "yes",
        "your name",
        "yourname",
        "undefined",
    }
)

# Merge tags and template syntax of other tools: {{first_name}}, {first}, [First Name],
# %FIRSTNAME%, *|FNAME|*, <name>, ${name}, #Firstname, @name.
_MERGE_TAG = re.compile(r"[{}\[\]<>%|*$#\\]")
_URL = re.compile(r"(?i)(://|\bwww\.|\.(com|net|org|de|io|co|info|biz|ru|ch|uk)\b)")
# Letters, combining marks, spaces and the punctuation names really contain: Jean-Luc, O'Neil, J. R.
_NAME_CHARS = re.compile(r"^[^\W\d_]+(?:[ \-'\u2019.]\s?[^\W\d_]+)*\.?$")


def _normalized(raw: str) -> str:
    text = unicodedata.normalize("NFC", raw)
    return " ".join(text.split())


def is_placeholder(name: str) -> bool:
    """True for values that are clearly not someone's name: test entries, merge tags, keyboard mash."""
    lowered = _normalized(name).casefold()
    if lowered in PLACEHOLDERS or lowered.strip(".-_ ") in PLACEHOLDERS:
        return True
    if _MERGE_TAG.search(lowered):
        return True
    letters = [c for c in lowered if c.isalpha()]
    # "xxx", "aaaa", "zzzzz": one letter repeated.
    return len(letters) >= 3 and len(set(letters)) == 1


def clean_first_name(raw: object) -> str | None:
    """The first name to print, or None when it is missing, a placeholder or implausible.

    A usable name is stripped; it is title-cased only when written all lower or all
    upper case ("ADA" -> "Ada", "jean-luc" -> "Jean-Luc"), so "McDonald" and "DeShawn"
    keep their capitals.
    """
    if not isinstance(raw, str):
        return None
    name = _normalized(raw)
    if not name or len(name) > MAX_NAME_CHARS:
        return None
    if "@" in name or any(c.isdigit() for c in name) or _URL.search(name):
        return None
    if is_placeholder(name) or not _NAME_CHARS.match(name):
        return None
    if sum(c.isalpha() for c in name) < 2:  # "J." is an initial, not a name to greet with
        return None
    cased = [c for c in name if c.isalpha() and (c.isupper() or c.islower())]
    if cased and (all(c.islower() for c in cased) or all(c.isupper() for c in cased)):
        name = name.title()
    return name

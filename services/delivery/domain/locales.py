"""Locales: which variant of a template a person gets. Pure.

A template id holds one variant per locale (a BCP 47 tag such as `en`, `de-CH`,
`zh-Hant-TW`). A message takes the variant of the person's `locale` trait by this
fallback chain, the first that exists winning:

1. the person's tag, then the tag with its last subtag dropped, again and again
   (`de-CH-1996` -> `de-CH` -> `de`; RFC 4647 "lookup"), so `de-CH` falls back to `de`;
2. the tenant's default locale (`UpdateSettings`), the same way;
3. `en`;
4. the template's first variant in tag order (a template that has one variant always
   renders that one).

Tags are compared without regard to case or `_` for `-`, so a trait written `de_ch`
finds the `de-CH` variant. Tags are stored in their canonical case (language lower,
script title, region upper).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator

# The locale every chain ends in before the template's first variant.
FALLBACK_LOCALE = "en"

# RFC 5646 language tags: language (with extlangs), script, region, variants, extensions and a
# private-use part. The language is the 2 or 3 letters of ISO 639 (RFC 5646 reserves 4 to 8
# letters for registrations that do not exist, so `german` or `english` is refused); the
# irregular grandfathered tags and tags that are only private use are not taken.
_LANGTAG = re.compile(
    r"""
    (?P<language>[a-z]{2,3}(?:-[a-z]{3}){0,3})
    (?:-(?P<script>[a-z]{4}))?
    (?:-(?P<region>[a-z]{2}|[0-9]{3}))?
    (?:-(?:[a-z0-9]{5,8}|[0-9][a-z0-9]{3}))*
    (?:-[0-9a-wy-z](?:-[a-z0-9]{2,8})+)*
    (?:-x(?:-[a-z0-9]{1,8})+)?
    """,
    re.VERBOSE,
)
MAX_LOCALE_CHARS = 64


def locale_problem(tag: str) -> str | None:
    """Why `tag` is not a BCP 47 language tag, or None."""
    if len(tag) > MAX_LOCALE_CHARS or not _LANGTAG.fullmatch(tag.lower()):
        return "must be a BCP 47 language tag such as en, de-CH or zh-Hant-TW"
    return None


def canonical_locale(tag: str) -> str:
    """A valid tag in its canonical case: `DE-ch` -> `de-CH`, `zh-hant-tw` -> `zh-Hant-TW`."""
    parts = tag.replace("_", "-").lower().split("-")
    out = [parts[0]]
    for i, part in enumerate(parts[1:], start=1):
        if len(parts[i - 1]) == 1:  # an extension or private-use part stays lower case
            out.extend(parts[i:])
            break
        if len(part) == 4 and part.isalpha():
            out.append(part.title())
        elif len(part) == 2 and part.isalpha():
            out.append(part.upper())
        else:
            out.append(part)
    return "-".join(out)


def _key(tag: str) -> str:
    return tag.replace("_", "-").strip().lower()


def _lookup(tag: str) -> Iterator[str]:
    """`de-CH-1996` -> `de-ch-1996`, `de-ch`, `de` (a single-letter subtag is dropped with the next)."""
    parts = _key(tag).split("-")
    while parts and parts[0]:
        yield "-".join(parts)
        parts.pop()
        if parts and len(parts[-1]) == 1:
            parts.pop()


def fallback_chain(wanted: str, tenant_default: str) -> list[str]:
    """The tags tried, in order, before the template's first variant (lower case, no repeats)."""
    chain = [*_lookup(wanted), *_lookup(tenant_default), FALLBACK_LOCALE]
    return list(dict.fromkeys(chain))


def pick_locale(available: Collection[str], wanted: str, tenant_default: str) -> str | None:
    """The variant (one of `available`, as spelled there) a person whose locale is `wanted` gets;
    None only when there is no variant at all."""
    if not available:
        return None
    by_key = {_key(tag): tag for tag in available}
    for candidate in fallback_chain(wanted, tenant_default):
        if candidate in by_key:
            return by_key[candidate]
    return min(available)

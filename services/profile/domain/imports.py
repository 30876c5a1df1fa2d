"""Bulk import of profiles (the nightly ticketing file): row validation and the upsert plan.

An import is a stream of batches of rows. Each row is checked on its own: a bad row is
reported as `RowError`s (row number, field, reason) and skipped, and the rest of the
import goes on. A valid row is keyed by its customer_id, else its email; `plan_import`
says, for the rows of one batch and the identifiers already bound, which profile each
row lands on, which profiles and identifiers are new, and what to write. Pure: the store
reads, asks for a plan, then writes it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import email_validator
import phonenumbers
from phonenumbers import COUNTRY_CODE_TO_REGION_CODE, REGION_CODE_FOR_NON_GEO_ENTITY, PhoneMetadata
from phonenumbers.re_util import re_compile

from relevans.kit.errors import Violations
from services.profile.domain.consent import Consent, ConsentInput, check_consent
from services.profile.domain.events import MAX_ID_CHARS, check_email, check_id, check_name, check_text
from services.profile.domain.identity import CUSTOMER_ID, EMAIL, MAX_FIRST_NAME_CHARS, Key
from services.profile.domain.traits import check_traits

MAX_IMPORT_ROWS = 1000
# Errors a response lists; every failed row is counted all the same.
MAX_REPORTED_ERRORS = 1000
MAX_SOURCE_CHARS = 64
MAX_NAME_CHARS = MAX_FIRST_NAME_CHARS
MAX_PHONE_CHARS = 64
MAX_TAGS_PER_ROW = 100
TAG_RE = re.compile(r"^[a-z0-9][a-z0-9 _.:-]{0,99}$")
DEFAULT_SOURCE = "import"
BACKEND = "backend"
# The common shape of an address: an ASCII dot-atom local part and a hostname of ASCII
# letter/digit labels (single hyphens inside) under a letters-only top-level domain.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*"
_PLAIN_EMAIL = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*@(?:{_LABEL}\.)+[A-Za-z]+")
_MAX_EMAIL_CHARS = 254
_MAX_LABEL_CHARS = 63
_SPECIAL_USE_DOMAINS = frozenset(email_validator.SPECIAL_USE_DOMAIN_NAMES)
# The common shape of a phone number in international format: + and ASCII digits, single spaces
# or hyphens between groups (+46701234567, +46 70-123 45 67); see `plain_phone`.
_PLAIN_PHONE = re.compile(r"\+[1-9][0-9]*(?:[ -][0-9]+)*")
_MAX_PLAIN_PHONE_CHARS = 40
_MAX_NSN_DIGITS = 17  # phonenumbers' limit of a national significant number
# A number description of phonenumbers' metadata: its possible lengths (empty: any) and its
# national number pattern.
_Desc = tuple[frozenset[int], re.Pattern[str]]


@dataclass(frozen=True, slots=True)
class _CallingCode:
    """What `plain_phone` needs of a country calling code's metadata."""

    # the national prefix (for parsing), when the region has one
    national_prefix: re.Pattern[str] | None
    # For a code of one region: its general description, the descriptions of which a valid
    # number matches one (every type but mobile) and mobile's, when it differs from fixed-line's.
    # None: ask phonenumbers.is_valid_number.
    general: _Desc | None
    types: tuple[_Desc, ...]
    mobile: _Desc | None


# country calling code -> _CallingCode (None: no metadata), filled as met
_CALLING_CODES: dict[int, _CallingCode | None] = {}


@dataclass(frozen=True, slots=True)
class RawImportRow:
    """One row as the client sent it, before any check."""

    row_number: int
    customer_id: str = ""
    email: str = ""
    first_name: str = ""
    last_name: str = ""
    phone: str = ""
    tags: tuple[str, ...] = ()
    traits: Mapping[str, str] = field(default_factory=dict)
    # Marketing email consent; purpose and channel may be left unspecified.
    consent: ConsentInput | None = None


@dataclass(frozen=True, slots=True)
class ImportRow:
    """A valid row: email normalised, phone in E.164, tags case-folded; None means unchanged."""

    row_number: int
    customer_id: str | None
    email: str | None
    first_name: str | None
    last_name: str | None
    phone: str | None
    tags: tuple[str, ...]
    traits: Mapping[str, str]
    consent: Consent | None

    def identifiers(self) -> list[Key]:
        """Its identifiers, the stable key first: customer_id, then email."""
        keys: list[Key] = []
        if self.customer_id:
            keys.append((CUSTOMER_ID, self.customer_id))
        if self.email:
            keys.append((EMAIL, self.email))
        return keys


@dataclass(frozen=True, slots=True)
class RowError:
    row_number: int
    field: str
    reason: str


def validate_source(source: str) -> str:
    """The import's source, e.g. ticketing-nightly (DEFAULT_SOURCE when empty)."""
    v = Violations()
    check_text(source, "source", v, MAX_SOURCE_CHARS)
    v.raise_if_any()
    return source or DEFAULT_SOURCE


def validate_batch_size(n: int) -> None:
    if n > MAX_IMPORT_ROWS:
        v = Violations()
        v.add("rows", f"at most {MAX_IMPORT_ROWS} rows per message, got {n}")
        v.raise_if_any()


def plain_email(value: str) -> str | None:
    """The normalised form of an address of the common shape, else None (ask email-validator).

    email-validator takes ~25 µs an address, most of a row's validation; for this shape it
    accepts exactly the addresses that are at most 254 characters, have labels of at most 63
    and are not under a special-use domain, and normalises them to their lower case (as
    `check_email` does). Anything else, valid or not, is left to it, so every answer and every
    error message stays email-validator's (tests/unit/test_profile_import.py checks both).
    """
    if len(value) > _MAX_EMAIL_CHARS or not _PLAIN_EMAIL.fullmatch(value):
        return None
    normalized = value.lower()
    labels = normalized[normalized.index("@") + 1 :].split(".")
    if any(len(label) > _MAX_LABEL_CHARS for label in labels):
        return None
    # (under a special-use domain: the domain or one of its dot-suffixes is one)
    if any(".".join(labels[i:]) in _SPECIAL_USE_DOMAINS for i in range(len(labels))):
        return None
    return normalized


def normalize_tag(value: str) -> str | None:
    """The case-folded, trimmed tag, or None when it is not a valid tag."""
    tag = " ".join(value.split()).casefold()
    return tag if TAG_RE.match(tag) else None


def _desc(desc: Any) -> _Desc | None:
    if desc is None or not desc.national_number_pattern:
        return None
    return frozenset(desc.possible_length), re_compile(desc.national_number_pattern)


def _calling_code(cc: int) -> _CallingCode | None:
    if cc in _CALLING_CODES:
        return _CALLING_CODES[cc]
    regions = COUNTRY_CODE_TO_REGION_CODE[cc]
    m = PhoneMetadata.metadata_for_region_or_calling_code(cc, phonenumbers.region_code_for_country_code(cc))
    known = None
    if m is not None:
        prefix = re_compile(m.national_prefix_for_parsing) if m.national_prefix_for_parsing else None
        known = _CallingCode(prefix, None, (), None)
        # (`is_valid_number` for a code of one region, as phonenumbers decides it)
        one_region = len(regions) == 1 and (
            regions[0] == REGION_CODE_FOR_NON_GEO_ENTITY
            or phonenumbers.country_code_for_valid_region(regions[0]) == cc
        )
        general = _desc(m.general_desc)
        if one_region and general is not None:
            others = (m.premium_rate, m.toll_free, m.shared_cost, m.voip, m.personal_number, m.pager, m.uan)
            types = tuple(d for d in map(_desc, (*others, m.voicemail, m.fixed_line)) if d is not None)
            mobile = None if m.same_mobile_and_fixed_line_pattern else _desc(m.mobile)
            known = _CallingCode(prefix, general, types, mobile)
    _CALLING_CODES[cc] = known
    return known


def _matches(nsn: str, desc: _Desc | None) -> bool:
    """phonenumbers' `_is_number_matching_desc`."""
    if desc is None:
        return False
    lengths, pattern = desc
    return (not lengths or len(nsn) in lengths) and pattern.fullmatch(nsn) is not None


def _valid(cc: int, nsn: str, known: _CallingCode) -> bool:
    """`phonenumbers.is_valid_number` of +<cc><nsn> (nsn not starting with 0): for a code of one
    region, its number type is not UNKNOWN (`_number_type_helper`)."""
    if known.general is None:
        return bool(
            phonenumbers.is_valid_number(phonenumbers.PhoneNumber(country_code=cc, national_number=int(nsn)))
        )
    if not _matches(nsn, known.general):
        return False
    return any(_matches(nsn, d) for d in known.types) or _matches(nsn, known.mobile)


def plain_phone(value: str) -> str | None:
    """The E.164 form of a valid number of the common shape, else None (ask `normalize_phone`).

    `phonenumbers.parse` takes ~15 µs a number, most of it spent on shapes this one is not
    (extensions, letters, national prefixes, RFC 3966), and `is_valid_number` ~7 µs. For
    `+<country code><digits>` with single spaces or hyphens between groups, parse reads the
    country code (the first 1-3 digits that are one) and takes the rest as the national number,
    unless that starts with 0 (Italian leading zeros) or with the region's national prefix (which
    it may strip): exactly those cases go back to `normalize_phone`, as do the numbers that are
    not valid. Validity is phonenumbers' rule on its metadata, with the patterns compiled once
    per country code (a code shared by several regions asks `is_valid_number`). Every answer and
    every error message stays phonenumbers' (tests/unit/test_profile_import.py checks both).
    """
    if len(value) > _MAX_PLAIN_PHONE_CHARS or not _PLAIN_PHONE.fullmatch(value):
        return None
    digits = value[1:].replace(" ", "").replace("-", "")
    for n in (1, 2, 3):
        cc = int(digits[:n])
        if cc in COUNTRY_CODE_TO_REGION_CODE:
            break
    else:
        return None
    nsn = digits[n:]
    if not 2 <= len(nsn) <= _MAX_NSN_DIGITS or nsn[0] == "0":
        return None
    known = _calling_code(cc)
    if known is None or (known.national_prefix is not None and known.national_prefix.match(nsn)):
        return None
    return "+" + digits if _valid(cc, nsn, known) else None


_PHONE_PARSE_ERRORS = {
    phonenumbers.NumberParseException.NOT_A_NUMBER: "it is not a phone number",
    phonenumbers.NumberParseException.TOO_SHORT_AFTER_IDD: "it is too short",
    phonenumbers.NumberParseException.TOO_SHORT_NSN: "it is too short",
    phonenumbers.NumberParseException.TOO_LONG: "it is too long",
}


def phone_parse_error(error_type: int, value: str) -> str:
    """Why phonenumbers could not parse `value`, in our words (its own end in a full stop and name
    its default region, which an import never has)."""
    if error_type == phonenumbers.NumberParseException.INVALID_COUNTRY_CODE:
        plus = value.lstrip().startswith("+")
        why = "the country code is unknown" if plus else "it does not start with + and a country code"
    else:
        why = _PHONE_PARSE_ERRORS.get(error_type, "it cannot be read")
    return f"is not a valid phone number: {why}; use the international format, e.g. +46701234567"


def normalize_phone(value: str) -> tuple[str | None, str]:
    """The number in E.164 (+46701234567), or None and why not. International format only."""
    fast = plain_phone(value)
    if fast is not None:
        return fast, ""
    try:
        number = phonenumbers.parse(value, None)
    except phonenumbers.NumberParseException as exc:
        return None, phone_parse_error(exc.error_type, value)
    if not phonenumbers.is_valid_number(number):
        return None, "is not a valid phone number"
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164), ""


def _consent(raw: ConsentInput, now: datetime, source: str, row_number: int, v: Violations) -> Consent | None:
    prefix = "marketing_email_consent"
    before = len(v.items)
    purpose = "marketing" if raw.purpose in ("", "unspecified") else raw.purpose
    channel = "email" if raw.channel in ("", "unspecified") else raw.channel
    if purpose != "marketing":
        v.add(f"{prefix}.purpose", "must be marketing (or left unspecified)")
    if channel != "email":
        v.add(f"{prefix}.channel", "must be email (or left unspecified)")
    evidence = raw.evidence or f"{source} row {row_number}"
    checked = ConsentInput(purpose, channel, raw.status, raw.source, evidence)
    consent = check_consent(checked, prefix, now, v, default_source=source)
    return consent if len(v.items) == before else None


def validate_row(raw: RawImportRow, now: datetime, source: str) -> tuple[ImportRow | None, list[RowError]]:
    """The valid row, or None and every reason it is not (a row is all or nothing)."""
    v = Violations()
    customer_id = check_id(raw.customer_id.strip(), "customer_id", v, MAX_ID_CHARS)
    raw_email = raw.email.strip()
    email = (plain_email(raw_email) or check_email(raw_email, "email", v)) if raw_email else None
    if not raw.customer_id.strip() and not raw_email:
        v.add("customer_id", "customer_id or email is required")
    names: list[str | None] = []
    for name, value in (("first_name", raw.first_name), ("last_name", raw.last_name)):
        value = value.strip()
        check_name(value, name, v, MAX_NAME_CHARS)
        names.append(value or None)
    phone: str | None = None
    if raw.phone.strip():
        if len(raw.phone) > MAX_PHONE_CHARS:
            v.add("phone", f"must be at most {MAX_PHONE_CHARS} characters")
        else:
            phone, why = normalize_phone(raw.phone.strip())
            if phone is None:
                v.add("phone", why)
    tags: dict[str, None] = {}
    if len(raw.tags) > MAX_TAGS_PER_ROW:
        v.add("tags", f"at most {MAX_TAGS_PER_ROW} tags per row, got {len(raw.tags)}")
    else:
        for i, value in enumerate(raw.tags):
            tag = normalize_tag(value)
            if tag is None:
                v.add(
                    f"tags[{i}]",
                    "must be 1-100 of a-z, 0-9, space, _ . : - (starting with a letter or digit)",
                )
            else:
                tags[tag] = None
    # Backend traits from a file are strings, checked as every client's traits are.
    traits = {
        k: str(t) for k, t in check_traits(raw.traits, "traits", v, allow_remove=False, per="row").items()
    }
    consent = _consent(raw.consent, now, source, raw.row_number, v) if raw.consent is not None else None
    if v:
        return None, [RowError(raw.row_number, x.field, x.description) for x in v.items]
    return (
        ImportRow(
            row_number=raw.row_number,
            customer_id=customer_id,
            email=email,
            first_name=names[0],
            last_name=names[1],
            phone=phone,
            tags=tuple(tags),
            traits=traits,
            consent=consent,
        ),
        [],
    )


def validate_rows(
    raws: Sequence[RawImportRow], now: datetime, source: str
) -> tuple[list[ImportRow], list[RowError]]:
    """The valid rows of a batch, in order, and the errors of the others."""
    rows: list[ImportRow] = []
    errors: list[RowError] = []
    for raw in raws:
        row, row_errors = validate_row(raw, now, source)
        if row is not None:
            rows.append(row)
        errors += row_errors
    return rows, errors


@dataclass(slots=True)
class ProfileUpsert:
    """What a batch writes to one profile; None leaves a field as it is."""

    profile_id: str
    new: bool
    customer_id: str | None = None
    email: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    phone: str | None = None


@dataclass
class ImportPlan:
    # In profile id order.
    profiles: list[ProfileUpsert]
    # Identifiers to bind: (kind, value, profile id).
    bind: list[tuple[str, str, str]]
    tags: list[tuple[str, str]]
    # (profile id, trait name) -> value; the last row wins.
    traits: dict[tuple[str, str], str]
    # Consent decisions per profile, in row order.
    consents: list[tuple[str, Consent]]

    @property
    def created(self) -> int:
        return sum(1 for p in self.profiles if p.new)


def plan_import(
    rows: Sequence[ImportRow], bound: Mapping[Key, str], make_profile_id: Callable[[], str]
) -> ImportPlan:
    """Which profile each row lands on and what the batch writes.

    A row lands on the profile of its customer_id, else of its email, else on a new profile;
    its identifiers not bound yet are bound to that profile (an identifier bound to another
    profile stays where it is). Within a batch a later row's fields win over an earlier's.
    """
    owner = dict(bound)
    upserts: dict[str, ProfileUpsert] = {}
    bind: list[tuple[str, str, str]] = []
    tags: dict[tuple[str, str], None] = {}
    traits: dict[tuple[str, str], str] = {}
    consents: list[tuple[str, Consent]] = []
    for row in rows:
        keys = row.identifiers()
        pid = next((owner[k] for k in keys if k in owner), None)
        if pid is None:
            pid = make_profile_id()
            upserts[pid] = ProfileUpsert(pid, new=True)
        up = upserts.get(pid)
        if up is None:
            up = upserts[pid] = ProfileUpsert(pid, new=False)
        for kind, value in keys:
            if (kind, value) not in owner:
                owner[(kind, value)] = pid
                bind.append((kind, value, pid))
                if kind == CUSTOMER_ID:
                    up.customer_id = up.customer_id or value
                else:
                    up.email = up.email or value
        up.first_name = row.first_name or up.first_name
        up.last_name = row.last_name or up.last_name
        up.phone = row.phone or up.phone
        for tag in row.tags:
            tags[(pid, tag)] = None
        for name, value in row.traits.items():
            traits[(pid, name)] = value
        if row.consent is not None:
            consents.append((pid, row.consent))
    return ImportPlan(
        profiles=[upserts[p] for p in sorted(upserts)],
        bind=sorted(bind),
        tags=sorted(tags),
        traits=traits,
        consents=consents,
    )


def consent_changes(
    current: Mapping[tuple[str, str, str], str], decisions: Sequence[tuple[str, Consent]]
) -> list[tuple[str, Consent]]:
    """The decisions that change something: `current` maps (profile id, purpose, channel) to the
    current status; a decision with the status already current is dropped, so re-importing the
    same file adds nothing to the consent ledger."""
    status = dict(current)
    changes = []
    for pid, c in decisions:
        key = (pid, c.purpose, c.channel)
        if status.get(key) != c.status:
            status[key] = c.status
            changes.append((pid, c))
    return changes


@dataclass(frozen=True, slots=True)
class StoredProfile:
    """What an import may change of an existing profile, as stored."""

    customer_id: str | None
    email: str | None
    first_name: str | None
    last_name: str | None
    phone: str | None
    tags: frozenset[str]
    # backend traits: name -> value (JSON)
    traits: Mapping[str, object]
    # (purpose, channel) -> current status
    consents: Mapping[tuple[str, str], str]


def drop_unchanged(
    plan: ImportPlan, stored: Mapping[str, StoredProfile], keep: Set[str] = frozenset()
) -> ImportPlan:
    """The plan without the existing profiles it changes nothing of, as `stored` says (profiles
    not in `stored`, new ones and those in `keep` stay). A re-imported file then neither locks
    nor writes the profiles it already describes."""
    changed = set(keep)
    changed.update(pid for _, _, pid in plan.bind)
    for p in plan.profiles:
        s = stored.get(p.profile_id)
        if (
            p.new
            or s is None
            or (p.customer_id is not None and s.customer_id is None)
            or (p.email is not None and s.email is None)
            or (p.first_name is not None and p.first_name != s.first_name)
            or (p.last_name is not None and p.last_name != s.last_name)
            or (p.phone is not None and p.phone != s.phone)
        ):
            changed.add(p.profile_id)
    for pid, tag in plan.tags:
        if pid not in changed and tag not in stored[pid].tags:
            changed.add(pid)
    for (pid, name), value in plan.traits.items():
        if pid not in changed and stored[pid].traits.get(name) != value:
            changed.add(pid)
    by_profile: dict[str, list[tuple[str, Consent]]] = {}
    for pid, c in plan.consents:
        if pid not in changed:
            by_profile.setdefault(pid, []).append((pid, c))
    for pid, decisions in by_profile.items():
        current = {(pid, purpose, channel): s for (purpose, channel), s in stored[pid].consents.items()}
        if consent_changes(current, decisions):
            changed.add(pid)
    if len(changed) >= len(plan.profiles) and all(p.profile_id in changed for p in plan.profiles):
        return plan
    return ImportPlan(
        profiles=[p for p in plan.profiles if p.profile_id in changed],
        bind=plan.bind,
        tags=[t for t in plan.tags if t[0] in changed],
        traits={k: v for k, v in plan.traits.items() if k[0] in changed},
        consents=[d for d in plan.consents if d[0] in changed],
    )

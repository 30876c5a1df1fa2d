"""The ids clients choose for what they define (triggers, templates): one rule for every service.

A trigger names its template by id, and delivery looks the template up by the same id, so both
services must agree on what an id is: 1-63 lower-case letters, digits, '-' or '_', starting
with a letter or digit. The rule keeps ids safe to log, to put in subjects and URLs, and
to show in an error message as they are.
"""

from __future__ import annotations

import re

RESOURCE_ID_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")  # whole string: use fullmatch
RESOURCE_ID_RULE = "must be 1-63 lower-case letters, digits, '-' or '_', starting with a letter or digit"


def resource_id_problem(value: str) -> str | None:
    """Why `value` is not an id ("is required", or the rule), or None when it is one."""
    if not value:
        return "is required"
    if not RESOURCE_ID_RE.fullmatch(value):  # not match with "$", which passes "id\n"
        return RESOURCE_ID_RULE
    return None

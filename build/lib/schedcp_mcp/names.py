"""The one check for a name that becomes a path or a key (a policy directory, an outcome's policy).

Matched whole (`fullmatch`, never `^…$`: `$` also matches before a trailing newline), so a name is
exactly lowercase letters, digits and underscores — no `/`, `..`, newline or NUL can reach a path.
"""

from __future__ import annotations

import re

from .errors import BadInput

POLICY_NAME = re.compile(r"[a-z][a-z0-9_]{1,30}")
POLICY_NAME_TEXT = "2-31 chars: lowercase letters, digits, underscore; start with a letter"


def check_policy_name(name: object, what: str = "policy name") -> str:
    if not isinstance(name, str) or not POLICY_NAME.fullmatch(name):
        raise BadInput(f"{what} {name!r} is not allowed", POLICY_NAME_TEXT)
    return name

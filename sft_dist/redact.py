"""Credentials inside URLs, hidden wherever a value is shown (config dumps, error messages)."""

from __future__ import annotations

import re

# scheme://user:password@host: the password part (a token in the user part alone, as GitHub's, too).
URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")


def redact_url(text: str) -> str:
    """`text` with credentials inside any URL replaced by ***: `http://user:pass@host` -> `http://user:***@host`."""
    def hide(m: re.Match) -> str:
        user, sep, _ = m.group("userinfo").partition(":")
        return f"{m.group('scheme')}{user}:***@" if sep else f"{m.group('scheme')}***@"

    return URL_CREDENTIALS.sub(hide, text)

"""Named API keys for the service: ``--api-key NAME=KEY`` (repeatable) or a plain ``--api-key KEY``.

The name is who a request is from: the review endpoints record it with every review. Parsing rule:
a value is ``NAME=KEY`` when it has an ``=`` that is not trailing padding (so a base64 key such as
``c2VjcmV0==`` stays a plain key) and NAME is 1-64 of ``A-Z a-z 0-9 _ . @ -`` starting with a letter
or digit; anything else is a plain key, named :data:`DEFAULT_KEY_NAME`.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterable, Mapping

from gaikan.errors import GaikanError

DEFAULT_KEY_NAME = "default"
NO_AUTH_NAME = "no-auth"  # the reviewer recorded when the service runs with --no-auth
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")


def parse_api_keys(values: str | Iterable[str] | Mapping[str, str] | None) -> dict[str, str]:
    """``--api-key`` values -> {name: key}; refuses empty keys and a name or key given twice."""
    if values is None:
        return {}
    if isinstance(values, Mapping):
        items = list(values.items())
    else:
        items = [_split(v) for v in ([values] if isinstance(values, str) else list(values))]
    keys: dict[str, str] = {}
    for name, key in items:
        if not _NAME.fullmatch(name):
            raise GaikanError(f"API key name {name!r}: use 1-64 letters, digits, '_', '.', '@' or '-'")
        if not key:
            raise GaikanError(f"API key {name!r} is empty")
        if name in keys:
            raise GaikanError(f"API key name {name!r} is given twice"
                              + (" (plain --api-key values are all named 'default': write NAME=KEY)"
                                 if name == DEFAULT_KEY_NAME else ""))
        if key in keys.values():
            raise GaikanError(f"API key {name!r} has the same key as "
                              f"{next(n for n, k in keys.items() if k == key)!r}: give every name its own key")
        keys[name] = key
    return keys


def _split(value: str) -> tuple[str, str]:
    value = value.strip()
    head, sep, tail = value.partition("=")
    if sep and value.rstrip("=") != head and _NAME.fullmatch(head):
        return head, tail
    return DEFAULT_KEY_NAME, value


def key_name(keys: Mapping[str, str], given: str) -> str | None:
    """The name of the key ``given`` (compared in constant time against every key), or None."""
    found = None
    for name, key in keys.items():
        if hmac.compare_digest(given.encode(), key.encode()) and found is None:
            found = name
    return found

"""Byte counts as people write them, one grammar for the CLI and the connector's settings."""

from __future__ import annotations

import re

__all__ = ["parse_byte_count"]

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:i?B)?\s*", re.IGNORECASE)


def parse_byte_count(text: str) -> int:
    """``"200G"``, ``"1.5TiB"``, ``"512M"``, ``"4096"``: binary units, a trailing ``B``/``iB`` allowed.

    Raises ``ValueError`` naming the text when it is not such a size.
    """
    match = _SIZE.fullmatch(text)
    if not match:
        raise ValueError(f"{text!r} is not a size such as 200G, 512M or 4096")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])

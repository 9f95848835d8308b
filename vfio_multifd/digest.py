"""Digests of a device's data, the same at both ends: ``xxh3-128:<hex>`` or ``sha256:<hex>``.

The destination hashes what it writes, the source what it sends; both print
the digest in the same text form, so a summary line on each side can be
compared by eye or by a script. ``--digest none`` computes nothing and
prints ``none``: the upper bound of what leaving the digest out would save.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

from .config import Digest


class Hasher(Protocol):
    def update(self, data: bytes | bytearray | memoryview, /) -> None: ...
    def hexdigest(self) -> str: ...


class NoDigest:
    """``--digest none``: takes every byte and computes nothing."""

    def update(self, data: bytes | bytearray | memoryview, /) -> None:
        pass

    def hexdigest(self) -> str:
        return ""


def new_hasher(digest: Digest) -> Hasher:
    if digest is Digest.SHA256:
        return hashlib.sha256()
    if digest is Digest.NONE:
        return NoDigest()
    import xxhash  # only when used: sha256 runs need no C extension

    return xxhash.xxh3_128()


def format_digest(digest: Digest, hasher: Hasher) -> str:
    """The digest as both summaries print it (``none`` for ``--digest none``)."""
    if digest is Digest.NONE:
        return digest.value
    return f"{digest.value}:{hasher.hexdigest()}"


def digest_of(digest: Digest, chunks: list[bytes] | list[memoryview]) -> str:
    """The text digest of ``chunks`` written in order."""
    hasher = new_hasher(digest)
    for chunk in chunks:
        hasher.update(chunk)
    return format_digest(digest, hasher)

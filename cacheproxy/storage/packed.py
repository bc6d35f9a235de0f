"""An object's index entry packed in one int: what the in-memory index keeps for each object, and
what the index snapshot stores, written as hex (no field is taken apart and put back together on
the way to disk and back).

From the low bits up: the size (48 bits), whether OBS has it, whether it is an error answer
(status >= 400), whether the body file's token is known, the token (64 bits), the first 60 bits
of the sha256 and of the sha512 (0: not computed), and the last access in milliseconds on top, so
that entries sort by it. Python keeps such an int in about 60 bytes, and the garbage collector never walks it.
"""

from __future__ import annotations

from .base import Listed

SHORT_HEX = 15  # hex digits of a digest an entry keeps (60 bits)

SIZE_BITS = 48
REMOTE = 1 << SIZE_BITS
ERROR = 1 << (SIZE_BITS + 1)
_TOKEN_KNOWN = 1 << (SIZE_BITS + 2)  # a token of zeros is a token too
_TOKEN_SHIFT = SIZE_BITS + 3
_SHA256_SHIFT = _TOKEN_SHIFT + 64
_SHA512_SHIFT = _SHA256_SHIFT + 60
_ACCESS_SHIFT = _SHA512_SHIFT + 60
_SIZE = (1 << SIZE_BITS) - 1
_U64 = (1 << 64) - 1
_U60 = (1 << 60) - 1
BODY = _U64 << _TOKEN_SHIFT | _TOKEN_KNOWN  # the bits that differ between two bodies of a key


def short_digest(hexdigest: str) -> int:
    """The part of a digest an entry keeps (0: none)."""
    return int(hexdigest[:SHORT_HEX], 16) if len(hexdigest) >= SHORT_HEX else 0


def pack(item: Listed) -> int:
    try:
        body = int(item.token, 16) << _TOKEN_SHIFT | _TOKEN_KNOWN if len(item.token) == 16 else 0
    except ValueError:
        body = 0  # unknown: a snapshot line without it is not taken, the store reads the object
    return (
        min(item.size, _SIZE)
        | (REMOTE if item.remote else 0)
        | (ERROR if item.error else 0)
        | body
        | short_digest(item.sha256) << _SHA256_SHIFT
        | short_digest(item.sha512) << _SHA512_SHIFT
        | int(item.last_access * 1000) << _ACCESS_SHIFT
    )


def unpack(key: str, entry: int) -> Listed:
    sha256, sha512 = shorts(entry)
    return Listed(
        key,
        size(entry),
        (entry >> _ACCESS_SHIFT) / 1000,
        token(entry),
        bool(entry & REMOTE),
        bool(entry & ERROR),
        f"{sha256:015x}" if sha256 else "",
        f"{sha512:015x}" if sha512 else "",
    )


def size(entry: int) -> int:
    return entry & _SIZE


def token(entry: int) -> str:
    """The body file's token ("": unknown)."""
    return f"{(entry >> _TOKEN_SHIFT) & _U64:016x}" if entry & _TOKEN_KNOWN else ""


def shorts(entry: int) -> tuple[int, int]:
    """The kept parts of the sha256 and the sha512."""
    return (entry >> _SHA256_SHIFT) & _U60, (entry >> _SHA512_SHIFT) & _U60


def accessed(entry: int) -> int:
    """The last access, in ms."""
    return entry >> _ACCESS_SHIFT


def with_access(entry: int, when: float) -> int:
    return (entry & ((1 << _ACCESS_SHIFT) - 1)) | int(when * 1000) << _ACCESS_SHIFT

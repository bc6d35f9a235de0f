"""``cacheproxy rewrite-spec``: point an RPM spec's sources at the proxy, changing nothing else.

A ``Source*:``/``Patch*:`` tag of a preamble (the main one or a ``%package``'s) whose value is an
``http``, ``https`` or ``ftp`` URL gets the proxy's URL-in-path prefix:
``Source0: https://origin/%{name}-%{version}.tar.gz`` becomes
``Source0: http://proxy:3128/https://origin/%{name}-%{version}.tar.gz``. So do the URLs of
``%sourcelist``/``%patchlist`` sections, and values that start with ``%{url}`` when the spec's
``URL:`` tag (given before) is such a URL. Macros, conditionals, comments, line endings and every
other byte stay as they were. A value already in the URL-in-path form of this proxy is left alone
(running it twice changes nothing); one in the URL-in-path form of another proxy is pointed at
this one. Values that are anything else (a file name, another macro) are not touched.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from yarl import URL

_TAG = re.compile(rb"^([ \t]*(source|patch)[0-9]*[ \t]*:[ \t]*)(\S+)", re.IGNORECASE)
_LIST_ITEM = re.compile(rb"^([ \t]*)(\S+)")
_URL_TAG = re.compile(rb"^[ \t]*url[ \t]*:[ \t]*(\S+)", re.IGNORECASE)
_REMOTE = re.compile(rb"^(?:https?|ftp)://", re.IGNORECASE)
_URL_MACRO = re.compile(rb"^%(?:\{url\}|url(?![A-Za-z0-9_]))")
_IN_PATH = re.compile(rb"^https?://[^/\s]+/(?:download/)?", re.IGNORECASE)
_SECTION = re.compile(rb"^%([a-z_]+)(?![A-Za-z0-9_])")
# Sections (rpm's build/parseSpec.c): ``%package`` opens another preamble, the two lists hold bare
# URLs, everything else is scripts or text whose lines are not tags.
SECTIONS = frozenset(
    b"""package description prep conf generate_buildrequires build install check clean files changelog
    pre post preun postun pretrans posttrans preuntrans postuntrans verifyscript triggerprein triggerin
    triggerun triggerpostun filetriggerin filetriggerun filetriggerpostun transfiletriggerin
    transfiletriggerun transfiletriggerpostun sourcelist patchlist""".split()
)
LISTS = frozenset({b"sourcelist", b"patchlist"})


class BadProxy(ValueError):
    pass


@dataclass
class Rewritten:
    text: bytes
    changed: int  # URLs rewritten


def proxy_prefix(proxy: str) -> bytes:
    """The proxy's base URL (``http://host:port``, perhaps with a path) checked, with one ``/``."""
    try:
        url = URL(proxy)
    except ValueError as exc:
        raise BadProxy(f"--proxy {proxy!r}: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host or url.query_string or url.fragment:
        raise BadProxy(f"--proxy {proxy!r}: give the proxy's base URL, such as http://proxy.example:3128")
    return proxy.rstrip("/").encode() + b"/"


def rewrite(spec: bytes, prefix: bytes) -> Rewritten:
    out: list[bytes] = []
    changed = 0
    section = b"package"  # the main preamble
    url_is_remote = False
    for line in spec.splitlines(keepends=True):
        body = line.rstrip(b"\r\n")
        if (section_match := _SECTION.match(body)) and section_match.group(1) in SECTIONS:
            section = section_match.group(1)
        elif body.lstrip().startswith(b"#"):
            pass
        elif section == b"package":
            if (url_tag := _URL_TAG.match(body)) is not None:
                url_is_remote = _REMOTE.match(url_tag.group(1)) is not None
            elif (tag := _TAG.match(body)) is not None:
                value = _pointed(tag.group(3), prefix, url_is_remote)
                if value is not None:
                    line = tag.group(1) + value + line[tag.end(3) :]
                    changed += 1
        elif section in LISTS and (item := _LIST_ITEM.match(body)) is not None:
            value = _pointed(item.group(2), prefix, url_is_remote)
            if value is not None:
                line = item.group(1) + value + line[item.end(2) :]
                changed += 1
        out.append(line)
    return Rewritten(b"".join(out), changed)


def _pointed(value: bytes, prefix: bytes, url_is_remote: bool) -> bytes | None:
    """``value`` pointed at the proxy, or None when it stays as it is."""

    def remote(text: bytes) -> bool:
        return _REMOTE.match(text) is not None or (url_is_remote and _URL_MACRO.match(text) is not None)

    if value.startswith(prefix) and remote(value[len(prefix) :]):
        return None  # done before
    if (other := _IN_PATH.match(value)) is not None and remote(value[other.end() :]):
        return prefix + value[other.end() :]  # another proxy's
    return prefix + value if remote(value) else None


def origin_of(url: str, prefix: bytes) -> str:
    """The origin URL of ``url``, which may be in the URL-in-path form of the proxy."""
    base = prefix.decode()
    rest = url[len(base) :] if url.startswith(base) else url
    return rest if _REMOTE.match(rest.encode()) else url


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: a temporary file beside it (same mode), synced, renamed."""
    mode = path.stat().st_mode & 0o7777
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

"""What to prefetch, with the checksums build tools pin: URL lists and ``sources`` files.

- a URL list: one entry per line, ``URL``, or a checksum first: ``sha256:<hex> URL``,
  ``sha256:<hex>:URL`` or SRI ``sha512-<base64> URL`` (sha256, sha512, md5);
- a ``sources`` file as Fedora and CentOS dist-git keep them, ``SHA512 (name) = <hex>`` (the
  ``--tag`` output of ``sha512sum``), or the older ``<hex>  name`` lines. They name files, not
  URLs: the URL comes from the spec's ``Source``/``Patch`` tags with the same file name (expanded
  by ``rpmspec --parse``), or from a lookaside cache (``<base>/<package>/<name>/<alg>/<hex>/<name>``).
"""

from __future__ import annotations

import base64
import binascii
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

ALGORITHMS = {"sha256": 64, "sha512": 128, "md5": 32}
_BY_LENGTH = {n: a for a, n in ALGORITHMS.items()}
_TAGGED = re.compile(r"^(SHA512|SHA256|MD5) \((.+)\) = ([0-9a-fA-F]+)$")
_PLAIN = re.compile(r"^([0-9a-fA-F]{32}|[0-9a-fA-F]{64}|[0-9a-fA-F]{128})\s+\*?(\S.*)$")
_PINNED = re.compile(r"^(sha256|sha512|md5):([0-9a-fA-F]+)(?::|\s+)(\S+)$", re.IGNORECASE)
_SRI = re.compile(r"^(sha256|sha512)-([A-Za-z0-9+/=]+)\s+(\S+)$")
_SOURCE_TAG = re.compile(r"^\s*(?:source|patch)\d*\s*:\s*(\S+)", re.IGNORECASE)


class SourcesError(ValueError):
    pass


@dataclass(frozen=True)
class Wanted:
    url: str
    algorithm: str | None = None  # what the body must hash to, when pinned
    hexdigest: str | None = None

    @property
    def header(self) -> dict[str, str]:
        """The request header that pins the body at the proxy."""
        if self.algorithm is None or self.hexdigest is None:
            return {}
        return {f"X-Checksum-{self.algorithm.capitalize()}": self.hexdigest}


@dataclass(frozen=True)
class SourceFile:
    """A line of a ``sources`` file: a file name and its pinned digest."""

    name: str
    algorithm: str
    hexdigest: str


def entry(text: str) -> Wanted:
    """One URL-list entry (see the module's text)."""
    text = text.strip()
    if m := _PINNED.match(text):
        algorithm, hexdigest, url = m.group(1).lower(), m.group(2).lower(), m.group(3)
        if len(hexdigest) != ALGORITHMS[algorithm]:
            raise SourcesError(f"{text[:120]!r}: a {algorithm} digest is {ALGORITHMS[algorithm]} hex digits")
        return Wanted(url, algorithm, hexdigest)
    if m := _SRI.match(text):
        try:
            raw = base64.b64decode(m.group(2), validate=True)
        except (binascii.Error, ValueError):
            raise SourcesError(f"{text[:120]!r}: not valid base64") from None
        if len(raw) * 2 != ALGORITHMS[m.group(1)]:
            raise SourcesError(f"{text[:120]!r}: a {m.group(1)} digest is {ALGORITHMS[m.group(1)] // 2} bytes")
        return Wanted(m.group(3), m.group(1), raw.hex())
    if "://" not in text or any(c.isspace() for c in text):
        raise SourcesError(f"{text[:120]!r} is not a URL, 'sha256:<hex> URL' or 'sha512-<base64> URL'")
    return Wanted(text)


def meaningful(lines: Iterable[str]) -> list[str]:
    """Lines without blanks and ``#`` comments (a ``#`` inside a URL is its fragment, kept)."""
    return [text for line in lines if (text := line.strip()) and not text.startswith("#")]


def is_sources_file(lines: list[str]) -> bool:
    return bool(lines) and all(_TAGGED.match(line) or _PLAIN.match(line) for line in lines)


def read_sources(lines: list[str]) -> list[SourceFile]:
    found = []
    for line in lines:
        if m := _TAGGED.match(line):
            algorithm, name, hexdigest = m.group(1).lower(), m.group(2), m.group(3).lower()
            if len(hexdigest) != ALGORITHMS[algorithm]:
                raise SourcesError(f"{line[:120]!r}: a {algorithm} digest is {ALGORITHMS[algorithm]} hex digits")
        elif m := _PLAIN.match(line):
            hexdigest, name = m.group(1).lower(), m.group(2).strip()
            algorithm = _BY_LENGTH[len(hexdigest)]
        else:
            raise SourcesError(f"{line[:120]!r} is not a sources line ('SHA512 (name) = <hex>' or '<hex>  name')")
        found.append(SourceFile(name, algorithm, hexdigest))
    return found


def spec_urls(spec: Path) -> dict[str, str]:
    """The spec's remote Source/Patch URLs by file name, macros expanded with ``rpmspec --parse``
    (the file name is the URL's last segment, or its ``#/name`` fragment as rpm has it)."""
    text = spec.read_text(errors="replace")
    if shutil.which("rpmspec") is not None:
        parsed = subprocess.run(["rpmspec", "--parse", str(spec)], capture_output=True, text=True, check=False)
        if parsed.returncode != 0:
            raise SourcesError(f"rpmspec --parse {spec}: {parsed.stderr.strip()[-500:]}")
        text = parsed.stdout
    urls: dict[str, str] = {}
    for line in text.splitlines():
        m = _SOURCE_TAG.match(line)
        if m is None or "://" not in m.group(1) or "%" in m.group(1):
            continue
        urls.setdefault(file_name(m.group(1)), m.group(1))
    return urls


def file_name(url: str) -> str:
    parts = urlsplit(url)
    if parts.fragment.startswith("/"):
        return parts.fragment.rsplit("/", 1)[-1]
    return unquote(parts.path.rsplit("/", 1)[-1])


def lookaside_url(base: str, package: str, source: SourceFile) -> str:
    """Fedora's lookaside layout (the md5 one without the hash type, as it was)."""
    tail = (
        f"{source.hexdigest}/{source.name}"
        if source.algorithm == "md5"
        else f"{source.algorithm}/{source.hexdigest}/{source.name}"
    )
    return f"{base.rstrip('/')}/{package}/{source.name}/{tail}"


def wanted_from_sources(
    sources: list[SourceFile], *, spec: Path | None = None, lookaside: str | None = None, package: str | None = None
) -> list[Wanted]:
    """Each file of a ``sources`` file as a URL to fetch, pinned to its digest."""
    if spec is None and (lookaside is None or package is None):
        raise SourcesError("a sources file names files, not URLs: add --spec SPEC, or --lookaside URL --package NAME")
    urls = spec_urls(spec) if spec is not None else {}
    wanted = []
    for source in sources:
        if spec is not None:
            url = urls.get(source.name)
            if url is None:
                raise SourcesError(f"{source.name}: no Source or Patch URL of {spec} ends with that file name")
        else:
            assert lookaside is not None and package is not None
            url = lookaside_url(lookaside, package, source)
        wanted.append(Wanted(url, source.algorithm, source.hexdigest))
    return wanted


def sources_line(name: str, sha512: str) -> str:
    return f"SHA512 ({name}) = {sha512}"


async def cached_digests(proxy: str, urls: dict[str, str]) -> tuple[list[str], list[str]]:
    """``sources`` lines for the files whose URL the proxy has stored (its object call, read-only),
    and the URLs it has not."""
    import aiohttp

    lines, missing = [], []
    api = f"{proxy.rstrip('/')}/_cacheproxy/api/objects"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        for name, url in urls.items():
            async with session.get(api, params={"url": url}) as response:
                info = await response.json(content_type=None) if response.status == 200 else {}
            if info.get("sha512"):
                lines.append(sources_line(name, info["sha512"]))
            else:
                missing.append(url)
    return lines, missing

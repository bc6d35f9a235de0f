"""``cacheproxy rewrite-spec``: what it changes, what it leaves byte for byte, and real rpmbuild
fetching the rewritten sources through the proxy."""

from __future__ import annotations

import hashlib
import io
import os
import sys
import tarfile
from collections.abc import Awaitable
from pathlib import Path

import pytest

from cacheproxy.tools.specfile import BadProxy, proxy_prefix, rewrite

from ..conftest import Proxy, Run, run
from ..origin import Origin

PROXY = b"http://proxy.example:3128/"

SPEC = (
    b"# a comment with Source0: http://example.org/not-this.tgz\n"
    b"%global commit 0123abc\n"
    b"Name:           hello\n"
    b"Version:        2.12\n"
    b"URL:            https://www.example.org/software/hello\n"
    b"Source0:        https://ftp.example.org/gnu/%{name}/%{name}-%{version}.tar.gz\n"
    b"Source1:        %{url}/extra-%{version}.txt\r\n"
    b"source2:\tftp://ftp.example.org/pub/b.tar.xz  \n"
    b"Source3:        hello.conf\n"
    b"Source4:        http://proxy.example:3128/https://already.example.org/x.tgz\n"
    b"Source5:        http://old-proxy:8080/download/https://mirror.example.org/y.tgz\n"
    b"Patch0:         https://example.org/patches/fix-%{commit}.patch\n"
    b"Patch1:         local.patch\n"
    b"%if 0%{?openEuler}\n"
    b"Source6:        https://example.org/euler-only.tgz\n"
    b"%endif\n"
    b"\n"
    b"%description\n"
    b"Source7: https://example.org/text-in-the-description.tgz\n"
    b"\n"
    b"%package doc\n"
    b"Summary: docs\n"
    b"Source8: https://example.org/docs.tgz\n"
    b"\n"
    b"%sourcelist\n"
    b"https://example.org/listed.tgz\n"
    b"\n"
    b"%prep\n"
    b"%autosetup -p1\n"
    b"\n"
    b"%changelog\n"
    b"* Sun Dec 06 2026 Someone <a@example.org> - 2.12-1\n"
    b"- Source9: https://example.org/in-the-changelog.tgz\n"
)

EXPECTED = (
    SPEC.replace(b"        https://ftp.example", b"        http://proxy.example:3128/https://ftp.example")
    .replace(b"        %{url}/extra", b"        http://proxy.example:3128/%{url}/extra")
    .replace(b"\tftp://", b"\thttp://proxy.example:3128/ftp://")
    .replace(b"http://old-proxy:8080/download/", b"http://proxy.example:3128/")
    .replace(b"         https://example.org/patches", b"         http://proxy.example:3128/https://example.org/patches")
    .replace(b"        https://example.org/euler", b"        http://proxy.example:3128/https://example.org/euler")
    .replace(b"Source8: https://", b"Source8: http://proxy.example:3128/https://")
    .replace(b"\nhttps://example.org/listed", b"\nhttp://proxy.example:3128/https://example.org/listed")
)


def test_rewrites_source_and_patch_urls_and_nothing_else() -> None:
    result = rewrite(SPEC, PROXY)
    assert result.text == EXPECTED
    assert result.changed == 8
    assert rewrite(result.text, PROXY).text == result.text  # idempotent
    assert rewrite(result.text, PROXY).changed == 0


def test_url_macro_only_when_the_url_tag_is_remote() -> None:
    spec = b"URL: %{forgeurl}\nSource0: %{url}/a.tgz\nSource1: %url/b.tgz\nSource2: %{urlbase}/c.tgz\n"
    assert rewrite(spec, PROXY).changed == 0
    remote = b"URL: https://a.example/\nSource1: %url/b.tgz\nSource2: %{urlbase}/c.tgz\n"
    assert (
        rewrite(remote, PROXY).text == b"URL: https://a.example/\nSource1: http://proxy.example:3128/%url/b.tgz\n"
        b"Source2: %{urlbase}/c.tgz\n"
    )


@pytest.mark.parametrize("bad", ["ftp://proxy:21", "proxy:3128", "http://", "http://p:3128/?x=1"])
def test_proxy_must_be_a_base_url(bad: str) -> None:
    with pytest.raises(BadProxy):
        proxy_prefix(bad)


def rewrite_spec(*args: str) -> Awaitable[Run]:
    return run(sys.executable, "-m", "cacheproxy", "rewrite-spec", *args)


async def test_in_place_is_atomic_keeps_the_mode_and_leaves_unchanged_files_alone(tmp_path: Path) -> None:
    spec = tmp_path / "hello.spec"
    spec.write_bytes(SPEC)
    spec.chmod(0o640)
    plain = tmp_path / "plain.spec"
    plain.write_bytes(b"Name: plain\nSource0: plain.tgz\n")
    os.utime(plain, (1_000_000_000, 1_000_000_000))

    result = await rewrite_spec("--proxy", "http://proxy.example:3128", "-i", str(spec), str(plain))
    assert result.rc == 0, result.stderr
    assert result.stdout == b""
    assert spec.read_bytes() == EXPECTED
    assert spec.stat().st_mode & 0o777 == 0o640
    assert plain.stat().st_mtime == 1_000_000_000
    assert sorted(os.listdir(tmp_path)) == ["hello.spec", "plain.spec"]  # no temporary left
    assert f"{spec}: 8 URL(s)" in result.stderr

    to_stdout = await rewrite_spec("--proxy", "http://proxy.example:3128", str(tmp_path / "missing.spec"))
    assert to_stdout.rc == 1 and "missing.spec" in to_stdout.stderr
    bad = await rewrite_spec("--proxy", "proxy.example:3128", str(spec))
    assert bad.rc == 2 and "base URL" in bad.stderr


def source_tarball(name: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        data = b"int main(void) { return 0; }\n"
        info = tarfile.TarInfo(f"{name}/main.c")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


async def test_rpmbuild_fetches_the_rewritten_sources_through_the_proxy(
    proxy: Proxy, origin: Origin, tmp_path: Path
) -> None:
    origin.add("/releases/hello-2.12.tar.gz", body=source_tarball("hello-2.12"), content_type="application/gzip")
    origin.add("/project/extra-2.12.txt", body=b"extra notes\n", content_type="text/plain")
    spec = tmp_path / "hello.spec"
    spec.write_text(
        "Name:           hello\n"
        "Version:        2.12\n"
        "Release:        1\n"
        "Summary:        a test package\n"
        "License:        MIT\n"
        f"URL:            {origin.url('/project')}\n"
        f"Source0:        {origin.url('/releases')}/%{{name}}-%{{version}}.tar.gz\n"
        "Source1:        %{url}/extra-%{version}.txt\n"
        "\n%description\nA test.\n\n%prep\n%setup -q\ncp %{SOURCE1} .\ntest -f main.c\n"
    )
    rewritten = await rewrite_spec("--proxy", proxy.url, "-i", str(spec))
    assert rewritten.rc == 0, rewritten.stderr
    assert f"Source0:        {proxy.url}/{origin.url('/releases')}/%{{name}}" in spec.read_text()

    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["HOME"] = str(tmp_path)  # no ~/.rpmmacros of whoever runs the tests

    async def build(top: Path) -> None:
        for folder in ("SOURCES", "BUILD"):  # what rpmdev-setuptree would make
            (top / folder).mkdir(parents=True)
        result = await run(
            "rpmbuild",
            "--define",
            f"_topdir {top}",
            "--undefine=_disable_source_fetch",
            "-bp",
            str(spec),
            env=env,
            timeout=120,
        )
        assert result.rc == 0, result.stderr
        assert (top / "BUILD" / "hello-2.12" / "extra-2.12.txt").read_bytes() == b"extra notes\n"

    await build(tmp_path / "first")
    assert origin.hits("/releases/hello-2.12.tar.gz") == 1 and origin.hits("/project/extra-2.12.txt") == 1
    await proxy.wait_idle()
    await build(tmp_path / "second")  # a clean tree: rpmbuild fetches again, the proxy answers
    assert origin.hits("/releases/hello-2.12.tar.gz") == 1 and origin.hits("/project/extra-2.12.txt") == 1

    # The checksums of what was rewritten, now cached: a sources file that matches what rpmbuild got,
    # and that prefetch takes back with the spec to verify.
    sources = tmp_path / "sources"
    emitted = await rewrite_spec("--proxy", proxy.url, "--sources-out", str(sources), str(spec))
    assert emitted.rc == 0, emitted.stderr
    got = tmp_path / "second" / "SOURCES"
    assert sources.read_text() == "".join(
        f"SHA512 ({name}) = {hashlib.sha512((got / name).read_bytes()).hexdigest()}\n"
        for name in ("hello-2.12.tar.gz", "extra-2.12.txt")
    )
    check = await run(
        sys.executable, "-m", "cacheproxy", "prefetch", "--proxy", proxy.url, "-f", str(sources), "--spec", str(spec)
    )
    assert check.rc == 0 and check.stdout.decode().splitlines()[-1] == "0 cached, 2 already cached, 0 failed"
    assert "(sha512 verified)" in check.stdout.decode()

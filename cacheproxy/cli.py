"""The ``cacheproxy`` command."""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from typing import Any

from . import __version__
from .config import Config, ConfigError, dump_config, load_config
from .units import parse_duration

EXIT_CONFIG = 2
EXIT_LISTEN = 3  # a listen address that cannot be had (in use, not ours, a privileged port)
DEFAULT_PROXY = "http://127.0.0.1:3128"


def _config_from(args: argparse.Namespace) -> Config:
    path = args.config or os.environ.get("CACHEPROXY_CONFIG") or None
    overrides: dict[str, Any] = {}
    if getattr(args, "listen", None):
        overrides["listen"] = args.listen
    if getattr(args, "cache_dir", None):
        overrides["cache.dir"] = args.cache_dir
    if getattr(args, "log_level", None):
        overrides["log.level"] = args.log_level
    if getattr(args, "allow_private_upstreams", False):
        overrides["rules.allow_private_upstreams"] = True
    config = load_config(path, overrides)
    if config.tls_intercept.enabled:  # the CA must load, not just exist
        from .certs import Authority, AuthorityError

        try:
            Authority(config.tls_intercept.ca_cert, config.tls_intercept.ca_key).close()
        except AuthorityError as exc:
            raise ConfigError([f"{config.source}:{exc}"]) from None
    return config


def _serve(args: argparse.Namespace) -> int:
    from . import workers
    from .ops.logging import setup_logging
    from .ops.system import return_large_buffers

    return_large_buffers()

    config = _config_from(args)
    setup_logging(config.log)
    try:
        return workers.run(config, grace=parse_duration(args.grace))
    except workers.ListenError as exc:
        print(f"cacheproxy: {exc}", file=sys.stderr)
        return EXIT_LISTEN


def _check_config(args: argparse.Namespace) -> int:
    config = _config_from(args)
    sys.stdout.write(f"# effective configuration from {config.source}\n")
    sys.stdout.write(dump_config(config))
    return 0


def _ca_init(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .certs import create_ca

    try:
        cert, key = create_ca(Path(args.out), common_name=args.name, force=args.force)
    except (FileExistsError, OSError) as exc:
        print(f"cacheproxy ca init: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {cert} (install it as a trusted CA on build machines)")
    print(f"wrote {key} (mode 0600: keep it secret, readable only by cacheproxy)")
    print("config:\n  tls_intercept:\n    enabled: true")
    print(f"    ca_cert: {cert.resolve()}\n    ca_key: {key.resolve()}")
    return 0


def _prefetch(args: argparse.Namespace) -> int:
    import asyncio
    from pathlib import Path

    from .tools import prefetch as tool
    from .tools import sources

    try:
        wanted = [sources.entry(text) for text in args.urls]
        for name in args.file or []:
            with sys.stdin if name == "-" else open(name, encoding="utf-8") as f:
                lines = sources.meaningful(f)
            if sources.is_sources_file(lines):
                spec = Path(args.spec) if args.spec else None
                files = sources.read_sources(lines)
                wanted += sources.wanted_from_sources(files, spec=spec, lookaside=args.lookaside, package=args.package)
            else:
                wanted += [sources.entry(line) for line in lines]
    except (OSError, sources.SourcesError) as exc:
        print(f"cacheproxy prefetch: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if not wanted:
        print("cacheproxy prefetch: no URLs (give them as arguments or with -f FILE)", file=sys.stderr)
        return EXIT_CONFIG
    progress: tool.Progress
    if sys.stderr.isatty() and not args.plain:
        progress = tool.Bars(len(wanted), args.jobs, sys.stdout)
    else:
        progress = tool.Lines(sys.stdout)
    try:
        results = asyncio.run(tool.prefetch(wanted, args.proxy, progress, jobs=args.jobs, read_timeout=args.timeout))
    finally:
        progress.close()
    print(tool.summary(results))
    return 1 if any(r.state == tool.FAILED for r in results) else 0


def _rewrite_spec(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .tools import sources, specfile

    try:
        prefix = specfile.proxy_prefix(args.proxy)
    except specfile.BadProxy as exc:
        print(f"cacheproxy rewrite-spec: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    status = 0
    urls: dict[str, str] = {}  # file name -> origin URL, for --sources-out
    for name in args.specs:
        path = Path(name)
        try:
            if args.sources_out:
                for file, url in sources.spec_urls(path).items():
                    urls[file] = specfile.origin_of(url, prefix)
            result = specfile.rewrite(path.read_bytes(), prefix)
            if not args.in_place:
                sys.stdout.buffer.write(result.text)
                sys.stdout.flush()
            elif result.changed:
                specfile.write_atomically(path, result.text)
        except (OSError, sources.SourcesError) as exc:
            print(f"cacheproxy rewrite-spec: {exc}", file=sys.stderr)
            status = 1
            continue
        print(f"{name}: {result.changed} URL(s) pointed at {args.proxy}", file=sys.stderr)
    if args.sources_out:
        return max(status, _write_sources(args.proxy, urls, Path(args.sources_out)))
    return status


def _write_sources(proxy: str, urls: dict[str, str], out: pathlib.Path) -> int:
    """The sha512 of every cached source, as a Fedora ``sources`` file."""
    import asyncio

    import aiohttp

    from .tools import sources

    try:
        lines, missing = asyncio.run(sources.cached_digests(proxy, urls))
    except (aiohttp.ClientError, TimeoutError) as exc:
        print(f"cacheproxy rewrite-spec: cannot ask {proxy}: {exc}", file=sys.stderr)
        return 1
    out.write_text("".join(line + "\n" for line in lines))
    print(f"{out}: {len(lines)} checksum(s)", file=sys.stderr)
    for url in missing:
        print(f"not cached yet (cacheproxy prefetch it first): {url}", file=sys.stderr)
    return 1 if missing else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cacheproxy", description="A caching forward proxy for build systems.")
    parser.add_argument("--version", action="version", version=f"cacheproxy {__version__}")
    commands = parser.add_subparsers(dest="command")

    def add_serve_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", help="YAML config file (default: $CACHEPROXY_CONFIG, else built-in defaults)")
        p.add_argument("--listen", action="append", metavar="HOST:PORT", help="listen address (repeatable)")
        p.add_argument("--cache-dir", help="local cache directory")
        p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
        p.add_argument("--grace", default="30s", help="how long running transfers may finish on SIGTERM (30s)")
        p.add_argument(
            "--allow-private-upstreams",
            action="store_true",
            help="fetch from origins on loopback/private addresses too (rules.allow_private_upstreams: true)",
        )

    serve = commands.add_parser("serve", help="run the proxy (the default command)")
    add_serve_options(serve)
    serve.set_defaults(func=_serve)
    add_serve_options(parser)
    parser.set_defaults(func=_serve)

    check = commands.add_parser("check-config", help="validate a config file and print the effective config")
    check.add_argument("-c", "--config", help="YAML config file (default: $CACHEPROXY_CONFIG)")
    check.set_defaults(func=_check_config)

    ca = commands.add_parser("ca", help="the local CA of TLS interception")
    ca_commands = ca.add_subparsers(dest="ca_command", required=True)
    ca_init = ca_commands.add_parser("init", help="create a CA certificate (ca.pem) and key (ca.key, mode 0600)")
    ca_init.add_argument("--out", required=True, help="directory to write ca.pem and ca.key into")
    ca_init.add_argument("--name", help="the CA's common name (default: cacheproxy CA (HOSTNAME))")
    ca_init.add_argument("--force", action="store_true", help="replace existing files")
    ca_init.set_defaults(func=_ca_init)

    proxy_default = os.environ.get("CACHEPROXY_PROXY", DEFAULT_PROXY)
    pre = commands.add_parser("prefetch", help="make sure URLs are cached, through a running proxy")
    pre.add_argument(
        "urls", nargs="*", metavar="URL", help="origin URLs (http, https, ftp), or 'sha256:<hex> URL' to pin the body"
    )
    pre.add_argument(
        "-f", "--file", action="append", help="a file of URLs, one per line, or a sources file ('-' for stdin)"
    )
    pre.add_argument("--spec", help="a sources file's URLs: the Source/Patch tags of this spec")
    pre.add_argument("--lookaside", metavar="URL", help="a sources file's URLs: this lookaside cache ...")
    pre.add_argument("--package", help="... and this package name in it")
    pre.add_argument("--proxy", default=proxy_default, help=f"the proxy ($CACHEPROXY_PROXY, else {DEFAULT_PROXY})")
    pre.add_argument("-j", "--jobs", type=int, default=4, help="downloads at once (4)")
    pre.add_argument("--timeout", type=float, default=300.0, help="seconds without a byte before giving up (300)")
    pre.add_argument("--plain", action="store_true", help="plain lines even on a terminal, no progress bars")
    pre.set_defaults(func=_prefetch)

    rewrite = commands.add_parser("rewrite-spec", help="point an RPM spec's Source/Patch URLs at the proxy")
    rewrite.add_argument("specs", nargs="+", metavar="SPEC")
    rewrite.add_argument("--proxy", required=True, help="the proxy's base URL, e.g. http://proxy.example:3128")
    rewrite.add_argument("-i", "--in-place", action="store_true", help="rewrite the files (atomically)")
    rewrite.add_argument(
        "--sources-out", metavar="FILE", help="write the sha512 of each source the proxy has cached (a sources file)"
    )
    rewrite.set_defaults(func=_rewrite_spec)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``cacheproxy`` command."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from . import __version__
from .config import Config, ConfigError, dump_config, load_config
from .units import parse_duration

EXIT_CONFIG = 2


def _config_from(args: argparse.Namespace) -> Config:
    path = args.config or os.environ.get("CACHEPROXY_CONFIG") or None
    overrides: dict[str, Any] = {}
    if getattr(args, "listen", None):
        overrides["listen"] = args.listen
    if getattr(args, "cache_dir", None):
        overrides["cache.dir"] = args.cache_dir
    if getattr(args, "log_level", None):
        overrides["log.level"] = args.log_level
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
    return workers.run(config, grace=parse_duration(args.grace))


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

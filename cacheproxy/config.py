"""The configuration: YAML into frozen dataclasses, validated once at start.

Every key is optional. Errors are collected and reported as ``file:key: reason`` lines by
:class:`ConfigError`; nothing here raises a traceback at a user.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from yarl import URL

from .units import parse_duration, parse_size, parse_ttl

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")  # ${VAR} or ${VAR:-default}
_SECRET_KEYS = {"secret_access_key", "access_key_id", "password", "tokens"}
_SECRET_HEADER = re.compile(r"auth|token|key|secret|cookie", re.I)


class ConfigError(Exception):
    """One or more ``file:key: reason`` problems."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _Invalid(ValueError):
    """A value problem at a key path below the one being converted."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(reason)
        self.key = key
        self.reason = reason


# -- value types that need more than a scalar -------------------------------------------------


@dataclass(frozen=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class SizeLimit:
    """An absolute byte count, or a share of the cache filesystem."""

    bytes: int | None = None
    fraction: float | None = None

    def resolve(self, total_bytes: int) -> int:
        if self.bytes is not None:
            return self.bytes
        assert self.fraction is not None
        return int(total_bytes * self.fraction)

    def __str__(self) -> str:
        return f"{self.fraction * 100:g}%" if self.fraction is not None else str(self.bytes)


@dataclass(frozen=True)
class RefreshRule:
    match: re.Pattern[str]
    ttl: float  # seconds; math.inf = forever
    override: bool


def _listen(value: object) -> ListenAddress:
    if not isinstance(value, str):
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT with a port 1-65535, got {value!r}")
    host = host.strip("[]") or "0.0.0.0"
    return ListenAddress(host, int(port))


def _listen_list(value: object) -> tuple[ListenAddress, ...]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError("at least one address is needed")
    return tuple(_listen(item) for item in items)


def _size_limit(value: object) -> SizeLimit:
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            pct = float(value.strip()[:-1])
        except ValueError:
            raise ValueError(f"not a percentage: {value!r}") from None
        if not 0 < pct <= 100:
            raise ValueError(f"a percentage must be in (0, 100]: {value!r}")
        return SizeLimit(fraction=pct / 100)
    return SizeLimit(bytes=parse_size(value))


def _fraction(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"expected a number in (0, 1], got {value!r}")
    return float(value)


def _network(value: object) -> IPNetwork:
    try:
        return ipaddress.ip_network(str(value), strict=False)
    except ValueError:
        raise ValueError(f"not an IP network (CIDR): {value!r}") from None


def _http_url(value: object) -> str:
    url = URL(str(value))
    if url.scheme not in {"http", "https"} or not url.host:
        raise ValueError(f"expected an http(s) URL, got {value!r}")
    return str(value)


def _mirror_group(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) < 2:
        raise ValueError("a mirror group is a list of at least two URL prefixes")
    prefixes = []
    for item in value:
        url = URL(str(item))
        if url.scheme not in {"http", "https", "ftp"} or not url.host:
            raise ValueError(f"not a URL prefix: {item!r}")
        prefixes.append(str(item))
    return tuple(prefixes)


def _regex(value: object) -> re.Pattern[str]:
    try:
        return re.compile(str(value))
    except re.error as exc:
        raise ValueError(f"not a regular expression ({exc}): {value!r}") from None


def _port(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ValueError(f"not a port: {value!r}")
    return value


def _path_prefix(value: object) -> str:
    text = str(value).rstrip("/")
    if not text.startswith("/") or re.match(r"^/[A-Za-z][A-Za-z0-9+.-]*:", text) or text in ("/metrics",):
        raise ValueError(f"expected a path such as /_cacheproxy/mirror (not an origin URL), got {value!r}")
    return text


def _positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected a whole number >= 1, got {value!r}")
    return value


def _positive_number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"expected a number > 0, got {value!r}")
    return float(value)


def _non_negative_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a whole number >= 0, got {value!r}")
    return value


def _positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"must be greater than zero: {value!r}")
    return seconds


Duration = Annotated[float, parse_duration]
PositiveDuration = Annotated[float, _positive_duration]
Size = Annotated[int, parse_size]

# -- the schema -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheConfig:
    dir: Path = Path("./cache")
    max_size: Annotated[SizeLimit, _size_limit] = SizeLimit(bytes=50 << 30)
    high_watermark: Annotated[float, _fraction] = 0.80
    low_watermark: Annotated[float, _fraction] = 0.70
    cleanup_interval: PositiveDuration = 3600.0
    max_object_size: Size = 20 << 30


@dataclass(frozen=True)
class ObsConfig:
    endpoint: str | None = None
    bucket: str = "cacheproxy"
    prefix: str = ""
    access_key_id: str | None = None
    secret_access_key: str | None = None
    serve_hits: Literal["redirect", "stream"] = "redirect"
    signed_url_ttl: PositiveDuration = 3600.0
    index_refresh: PositiveDuration = 300.0
    signature: Literal["obs", "v4", "v2"] = "obs"
    path_style: bool = False
    max_size: Annotated[int, parse_size] | None = None
    max_age: Duration | None = None


@dataclass(frozen=True)
class StorageConfig:
    backend: Literal["local", "obs"] = "local"
    obs: ObsConfig = ObsConfig()


@dataclass(frozen=True)
class UpstreamConfig:
    connect_timeout: PositiveDuration = 10.0
    read_timeout: PositiveDuration = 60.0
    tunnel_idle_timeout: PositiveDuration = 300.0  # a CONNECT tunnel with no bytes either way this long closes
    retries: Annotated[int, _non_negative_int] = 3
    retry_backoff: Duration = 1.0
    parent_proxy: Annotated[str, _http_url] | None = None
    ca_bundle: Path | None = None
    mirrors: tuple[Annotated[tuple[str, ...], _mirror_group], ...] = ()


_DEFAULT_CLIENTS = ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
_ARCHIVE_RE = r"\.(tar|tgz|tbz2?|txz|gz|xz|bz2|zst|lz|lzma|zip|7z|rpm|srpm|deb|jar|gem|crate|whl)$"
_DEFAULT_REFRESH = (
    RefreshRule(re.compile(_ARCHIVE_RE), math.inf, True),
    RefreshRule(re.compile(".*"), 86400.0, False),
)


@dataclass(frozen=True)
class RefreshRuleSpec:
    match: Annotated[re.Pattern[str], _regex] = re.compile(".*")
    ttl: Annotated[float, parse_ttl] = 86400.0
    override: bool = False


@dataclass(frozen=True)
class RulesConfig:
    allow_clients: tuple[Annotated[IPNetwork, _network], ...] = tuple(ipaddress.ip_network(c) for c in _DEFAULT_CLIENTS)
    allow_upstream_hosts: tuple[str, ...] = ("*",)
    deny_upstream_hosts: tuple[str, ...] = ()
    allow_private_upstreams: bool = False
    allow_suffixes: tuple[str, ...] = ()
    deny_suffixes: tuple[str, ...] = (".mp3", ".mp4", ".avi", ".mkv", ".mov", ".flv", ".wmv", ".m4v", ".webm")
    connect_ports: tuple[Annotated[int, _port], ...] = (443,)
    allow_other_methods: bool = False
    refresh: tuple[RefreshRuleSpec, ...] = tuple(RefreshRuleSpec(r.match, r.ttl, r.override) for r in _DEFAULT_REFRESH)
    refuse_html_archives: bool = True
    negative_ttl: Duration = 60.0


@dataclass(frozen=True)
class LimitsConfig:
    per_client_rps: Annotated[float, _positive_number] = 50.0
    per_client_burst: Annotated[int, _positive_int] = 200
    per_client_concurrency: Annotated[int, _positive_int] = 64
    max_connections: Annotated[int, _positive_int] = 4096
    head_timeout: PositiveDuration = 10.0  # a request head not complete by then: 408 and close


@dataclass(frozen=True)
class TlsInterceptConfig:
    enabled: bool = False
    ca_cert: Path = Path("/etc/cacheproxy/ca.pem")
    ca_key: Path = Path("/etc/cacheproxy/ca.key")
    bypass_hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class WebhookConfig:
    url: Annotated[str, _http_url] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    timeout: PositiveDuration = 10.0  # per attempt
    retries: Annotated[int, _non_negative_int] = 3  # extra attempts, with backoff


@dataclass(frozen=True)
class EmailConfig:
    host: str | None = None
    port: Annotated[int, _port] = 25
    starttls: bool = False
    username: str | None = None
    password: str | None = None
    from_: str | None = None  # YAML key "from"
    to: tuple[str, ...] = ()
    timeout: PositiveDuration = 10.0
    ca_bundle: Path | None = None  # PEM of the CA that signed the relay's certificate (besides the system's)


@dataclass(frozen=True)
class AlertsConfig:
    failure_threshold: Annotated[int, _positive_int] = 3
    window: PositiveDuration = 600.0
    min_interval: Duration = 3600.0
    instance: str | None = None  # the name alerts give this instance (default: the host name)
    webhook: WebhookConfig = WebhookConfig()
    email: EmailConfig = EmailConfig()


@dataclass(frozen=True)
class AdminConfig:
    tokens: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChecksumsConfig:
    # <prefix>/sha256/<hex> (Nix and Spack hashed mirrors) and
    # <prefix>/<name>/<file>/<sha512|sha256>/<hash>/<file> (Fedora's lookaside cache)
    mirror_prefix: Annotated[str, _path_prefix] = "/_cacheproxy/mirror"


@dataclass(frozen=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: str = "-"
    format: Literal["text", "json"] = "text"


@dataclass(frozen=True)
class Config:
    listen: Annotated[tuple[ListenAddress, ...], _listen_list] = (ListenAddress("127.0.0.1", 3128),)
    workers: Annotated[int, _positive_int] = 1
    proxy_protocol: bool = False
    trusted_proxies: tuple[Annotated[IPNetwork, _network], ...] = ()
    cache: CacheConfig = CacheConfig()
    storage: StorageConfig = StorageConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    rules: RulesConfig = RulesConfig()
    limits: LimitsConfig = LimitsConfig()
    tls_intercept: TlsInterceptConfig = TlsInterceptConfig()
    alerts: AlertsConfig = AlertsConfig()
    admin: AdminConfig = AdminConfig()
    checksums: ChecksumsConfig = ChecksumsConfig()
    log: LogConfig = LogConfig()
    source: str = "<defaults>"  # where it was loaded from; not a YAML key

    @property
    def refresh_rules(self) -> tuple[RefreshRule, ...]:
        return tuple(RefreshRule(r.match, r.ttl, r.override) for r in self.rules.refresh)


_NOT_KEYS = {"source"}

# -- loading ----------------------------------------------------------------------------------


def _yaml_name(f: dataclasses.Field[Any]) -> str:
    return f.name.rstrip("_")


def _expand_env(value: Any, key: str, problems: list[str], where: str) -> Any:
    if isinstance(value, str):

        def sub(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if default is not None and not os.environ.get(name):  # as the shell's ${VAR:-default}
                return default
            if name not in os.environ:
                problems.append(f"{where}:{key}: environment variable {name} is not set")
                return ""
            return os.environ[name]

        return _ENV_REF.sub(sub, value)
    if isinstance(value, list):
        return [_expand_env(v, f"{key}[{i}]", problems, where) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _expand_env(v, f"{key}.{k}" if key else str(k), problems, where) for k, v in value.items()}
    return value


def _convert(hint: Any, value: Any, key: str) -> Any:
    """Convert ``value`` to the annotated type; raise ValueError/_Invalid on a bad value."""
    origin = typing.get_origin(hint)
    if origin is Annotated:
        base, *extras = typing.get_args(hint)
        converters = [e for e in extras if callable(e)]
        return converters[0](value) if converters else _convert(base, value, key)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, key) if len(args) == 1 else value
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if origin is tuple:
        item_hint = typing.get_args(hint)[0]
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {value!r}")
        return tuple(_convert_at(item_hint, item, f"{key}[{i}]") for i, item in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return _build(typing.cast(type, hint), value, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected a whole number, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"expected a string, got {value!r}")
        return str(value)
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ValueError(f"expected a path, got {value!r}")
        return Path(value)
    raise TypeError(f"no converter for {hint!r}")  # a schema bug, not a user error


def _convert_at(hint: Any, value: Any, key: str) -> Any:
    try:
        return _convert(hint, value, key)
    except (_Invalid, _InvalidMany):
        raise
    except ValueError as exc:
        raise _Invalid(key, str(exc)) from None


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise _Invalid(prefix or "(top)", f"expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {_yaml_name(f): f for f in dataclasses.fields(cls) if f.name not in _NOT_KEYS}
    problems: list[_Invalid] = []
    for key in raw:
        if key not in fields:
            near = ", ".join(sorted(fields))
            problems.append(_Invalid(f"{prefix}.{key}" if prefix else str(key), f"unknown key (known: {near})"))
    values = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        key = f"{prefix}.{name}" if prefix else name
        try:
            values[f.name] = _convert_at(hints[f.name], raw[name], key)
        except _Invalid as exc:
            problems.append(exc)
        except _InvalidMany as many:
            problems.extend(many.problems)
    if problems:
        raise _InvalidMany(problems)
    return cls(**values)


class _InvalidMany(ValueError):
    def __init__(self, problems: list[_Invalid]) -> None:
        super().__init__("; ".join(p.reason for p in problems))
        self.problems = problems


def _check(config: Config) -> list[tuple[str, str]]:
    """Rules that span several keys."""
    problems = []
    if config.cache.low_watermark >= config.cache.high_watermark:
        problems.append(("cache.low_watermark", "must be lower than cache.high_watermark"))
    obs = config.storage.obs
    if config.storage.backend == "obs":
        for name in ("endpoint", "access_key_id", "secret_access_key"):
            if not getattr(obs, name):
                problems.append((f"storage.obs.{name}", "required when storage.backend is obs"))
    if config.tls_intercept.enabled:
        for name in ("ca_cert", "ca_key"):
            if not getattr(config.tls_intercept, name).is_file():
                path = getattr(config.tls_intercept, name)
                problems.append((f"tls_intercept.{name}", f"file not found: {path} (see `cacheproxy ca init`)"))
    if config.upstream.ca_bundle is not None and not config.upstream.ca_bundle.is_file():
        problems.append(("upstream.ca_bundle", f"file not found: {config.upstream.ca_bundle}"))
    email = config.alerts.email
    if email.host and (not email.from_ or not email.to):
        problems.append(("alerts.email", "from and to are required when host is set"))
    if email.ca_bundle is not None and not email.ca_bundle.is_file():
        problems.append(("alerts.email.ca_bundle", f"file not found: {email.ca_bundle}"))
    return problems


def load_config(path: str | os.PathLike[str] | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load, expand ``${ENV}``, validate. Raise :class:`ConfigError` listing every problem.

    ``overrides`` are dotted keys (``"cache.dir"``) set on top of the file, as the command line does.
    """
    where = str(path) if path is not None else "<defaults>"
    raw: Any = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError([f"{where}: cannot read config file: {exc.strerror}"]) from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError([f"{where}{line}: not valid YAML: {getattr(exc, 'problem', exc)}"]) from None
        if not isinstance(raw, dict):
            raise ConfigError([f"{where}: the top level must be a mapping of keys"])
    problems: list[str] = []
    raw = _expand_env(raw, "", problems, where)
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        config = _build(Config, raw, "")
    except _InvalidMany as many:
        problems.extend(f"{where}:{p.key}: {p.reason}" for p in many.problems)
        raise ConfigError(problems) from None
    except _Invalid as exc:
        problems.append(f"{where}:{exc.key}: {exc.reason}")
        raise ConfigError(problems) from None
    problems.extend(f"{where}:{key}: {reason}" for key, reason in _check(config))
    if problems:
        raise ConfigError(problems)
    return dataclasses.replace(config, source=where)


# -- showing ----------------------------------------------------------------------------------


def mask_secret(value: str | None) -> str | None:
    return None if value is None else "***"


_SECRET_PARAM = re.compile(r"token|key|secret|pass|auth|sig|credential", re.I)


def mask_url(text: str) -> str:
    """A URL with its password and secret-looking query parameters (``?token=``) masked."""
    try:
        url = URL(text)
    except ValueError:
        return text
    if url.password:
        url = url.with_password("***")
    if url.query and any(_SECRET_PARAM.search(k) for k in url.query):
        url = url.with_query([(k, "***" if _SECRET_PARAM.search(k) else v) for k, v in url.query.items()])
    return str(url)


def to_plain(obj: Any, name: str = "") -> Any:
    """The effective config as plain data, secrets masked (for check-config and the status page)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if isinstance(obj, (ListenAddress, SizeLimit)):
            return str(obj)
        return {
            _yaml_name(f): to_plain(getattr(obj, f.name), f.name)
            for f in dataclasses.fields(obj)
            if f.name not in _NOT_KEYS
        }
    if name in _SECRET_KEYS:
        if isinstance(obj, tuple):
            return ["***" for _ in obj]
        return mask_secret(obj)
    if name == "headers" and isinstance(obj, dict):
        return {k: ("***" if _SECRET_HEADER.search(k) else v) for k, v in obj.items()}
    if isinstance(obj, str) and "://" in obj:
        return mask_url(obj)
    if isinstance(obj, (tuple, list)):
        return [to_plain(v, name) for v in obj]
    if isinstance(obj, re.Pattern):
        return obj.pattern
    if isinstance(obj, float) and math.isinf(obj):
        return "forever"
    if isinstance(obj, (Path, ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return str(obj)
    return obj


def dump_config(config: Config) -> str:
    return yaml.safe_dump(to_plain(config), sort_keys=False, default_flow_style=False)

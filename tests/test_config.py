"""Configuration: units, environment expansion, validation messages, defaults, precedence."""

from __future__ import annotations

import ipaddress
import math
from pathlib import Path

import pytest

from cacheproxy.config import ConfigError, load_config
from cacheproxy.units import parse_duration, parse_size, parse_ttl


@pytest.mark.parametrize(
    ("text", "seconds"), [("500ms", 0.5), ("10s", 10), ("5m", 300), ("1h", 3600), ("7d", 604800), (90, 90)]
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [("512B", 512), ("1KiB", 1024), ("50GiB", 50 << 30), ("1.5 TB", 1_500_000_000_000), ("10MB", 10_000_000), (7, 7)],
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


def test_ttl_forever() -> None:
    assert math.isinf(parse_ttl("forever"))


@pytest.mark.parametrize("bad", ["10 parsecs", "-1s", True, "s"])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_defaults() -> None:
    config = load_config(None)
    assert [str(a) for a in config.listen] == ["127.0.0.1:3128"]
    assert config.cache.dir == Path("cache") and config.storage.backend == "local"
    assert config.upstream.retries == 3 and config.rules.allow_private_upstreams is False
    assert ipaddress.ip_network("10.0.0.0/8") in config.rules.allow_clients


def test_file_env_and_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CP_TEST_DIR", str(tmp_path / "c"))
    path = tmp_path / "c.yaml"
    path.write_text("cache:\n  dir: ${CP_TEST_DIR}\n  max_size: 80%\nlisten: ['[::1]:3129', 0.0.0.0:3128]\n")
    config = load_config(path, {"upstream.retries": 0})
    assert config.cache.dir == tmp_path / "c"
    assert config.cache.max_size.resolve(1000) == 800
    assert [(a.host, a.port) for a in config.listen] == [("::1", 3129), ("0.0.0.0", 3128)]
    assert config.upstream.retries == 0


def test_env_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``${VAR:-default}`` as in the shell: the default when VAR is unset or empty."""
    monkeypatch.setenv("CP_TEST_EMPTY", "")
    monkeypatch.setenv("CP_TEST_SET", "9.9.9.9:80")
    monkeypatch.delenv("CP_TEST_UNSET", raising=False)
    path = tmp_path / "c.yaml"
    path.write_text(
        "listen: ['${CP_TEST_SET:-1.1.1.1:1}', '${CP_TEST_EMPTY:-127.0.0.2:3128}']\n"
        "cache: {dir: '${CP_TEST_UNSET:-/var/cache/cacheproxy}'}\nalerts: {instance: '${CP_TEST_UNSET:-}x'}\n"
    )
    config = load_config(path)
    assert [str(a) for a in config.listen] == ["9.9.9.9:80", "127.0.0.2:3128"]
    assert config.cache.dir == Path("/var/cache/cacheproxy") and config.alerts.instance == "x"
    path.write_text("cache: {dir: '${CP_TEST_UNSET}'}\n")
    with pytest.raises(ConfigError, match="CP_TEST_UNSET is not set"):
        load_config(path)


def test_errors_name_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "cache: {low_watermark: 0.9, high_watermark: 0.8}\nrules: {allow_clients: [nonsense]}\n"
        "storage: {backend: s3}\nlog: {level: loud}\nalerts: {webhook: {url: ftp://x}}\n"
    )
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    problems = "\n".join(raised.value.problems)
    assert f"{path}:rules.allow_clients[0]: not an IP network" in problems
    assert f"{path}:storage.backend: expected one of local, obs" in problems
    assert f"{path}:log.level:" in problems
    assert f"{path}:alerts.webhook.url:" in problems


def test_cross_key_checks(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("cache: {low_watermark: 0.9, high_watermark: 0.8}\nstorage: {backend: obs}\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    problems = "\n".join(raised.value.problems)
    assert "cache.low_watermark: must be lower" in problems
    assert "storage.obs.endpoint: required" in problems


def test_yaml_syntax_error_has_a_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("cache:\n  dir: [unclosed\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert raised.value.problems[0].startswith(f"{path}:")


def test_sample_config_is_valid_and_matches_defaults() -> None:
    sample = load_config(Path(__file__).parent.parent / "conf" / "cacheproxy.yaml")
    defaults = load_config(None)
    assert sample.rules == defaults.rules and sample.upstream == defaults.upstream and sample.cache == defaults.cache

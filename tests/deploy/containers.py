"""podman for the container tests: the settings this machine kind needs, a stand-in for the
``python:3.11-slim`` base image (no container registry is reachable: Debian's archive through
mmdebstrap instead), and the project's images built from a fresh copy of the checkout."""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

BASE = "docker.io/library/python:3.11-slim"
IMAGE = "localhost/cacheproxy:latest"
GATEWAY_IMAGE = "localhost/cacheproxy-gateway:latest"
NEEDED = ("podman", "podman-compose", "mmdebstrap")


@dataclass
class Podman:
    env: dict[str, str]
    checkout: Path  # the fresh copy the images were built from

    def __call__(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)}: {result.returncode}\n{result.stderr[-4000:]}")
        return result


def settings(folder: Path) -> dict[str, str]:
    """The three settings of TESTING.md, in a file named by CONTAINERS_CONF."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    files = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    conf = folder / "containers.conf"
    conf.write_text(
        f'[containers]\ndefault_ulimits = ["nofile={files}:{files}", "nproc=32768:32768"]\n'
        '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
    )
    return {**os.environ, "CONTAINERS_CONF": str(conf), "BUILDAH_FORMAT": "docker"}


def debian_mirror() -> str:
    """The machine's own Debian archive (read here, never written into the repository)."""
    for path in (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")):
        if path.exists() and (m := re.search(r"^(?:URIs:|deb)\s+(\S+)", path.read_text(), re.M)):
            return m.group(1)
    raise RuntimeError("no Debian archive is configured for apt")


def stand_in_base(podman: Podman, folder: Path) -> None:
    """``python:3.11-slim`` made from Debian bookworm: python3 with venv and pip, CA certificates
    (the machine's extra ones too: downloads during a build may pass a TLS-inspecting proxy)."""
    rootfs = folder / "rootfs.tar"
    hooks = [
        'rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED',
        'cp /usr/local/share/ca-certificates/*.crt "$1"/usr/local/share/ca-certificates/ 2>/dev/null || true',
        'chroot "$1" update-ca-certificates >/dev/null',
        'printf "[global]\\ncert = /etc/ssl/certs/ca-certificates.crt\\n" > "$1"/etc/pip.conf',
    ]
    packages = "python3,python3-venv,python3-pip,python-is-python3,ca-certificates"
    command = [
        "mmdebstrap", "--variant=minbase", f"--include={packages}", *(f"--customize-hook={hook}" for hook in hooks),
        "bookworm", str(rootfs), f"deb {debian_mirror()} bookworm main",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    if result.returncode != 0:
        raise AssertionError(f"mmdebstrap failed:\n{result.stderr[-4000:]}")
    podman("import", "-q", str(rootfs), "localhost/debian-python:bookworm")
    podman("tag", "localhost/debian-python:bookworm", BASE)
    rootfs.unlink()


def start(folder: Path, checkout: Path) -> Podman:
    missing = [tool for tool in NEEDED if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} needed by the container tests: run the README's test command")
    podman = Podman(settings(folder), checkout)
    if podman("image", "exists", BASE, check=False).returncode != 0:
        stand_in_base(podman, folder)
    probe = podman("run", "--rm", "--network", "host", BASE, "true", check=False, timeout=120)
    if probe.returncode != 0:
        reason = f"podman cannot run containers on this machine: {probe.stderr.strip()[-500:]}"
        print(f"\nSKIPPING the container tests: {reason}", file=sys.stderr)
        pytest.skip(reason)
    podman("build", "--pull=never", "-q", "-t", IMAGE, str(checkout), timeout=900)
    gateway = checkout / "deploy" / "gateway" / "Dockerfile"
    podman("build", "--pull=never", "-q", "-f", str(gateway), "-t", GATEWAY_IMAGE, str(checkout), timeout=900)
    return podman

#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: installs what the tests need, then runs
# ruff, mypy and pytest. Exits non-zero on any failure. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

# nginx and podman's helpers live in /usr/sbin, which a Debian user's PATH does not have
export PATH="$PATH:/usr/sbin:/sbin"

missing=()
for tool in wget curl nginx; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
# node and npm run the HTTP caching conformance suite (tests/conformance)
command -v node >/dev/null 2>&1 || missing+=("nodejs")
command -v npm >/dev/null 2>&1 || missing+=("npm")
# headless chromium renders the status page (tests/ops/test_status_page.py)
command -v chromium >/dev/null 2>&1 || missing+=("chromium")
# rpmbuild fetches a rewritten spec's sources through the proxy (tests/tools/test_rewrite_spec.py)
command -v rpmbuild >/dev/null 2>&1 || missing+=("rpm")
# podman builds and runs the Dockerfile and docker-compose.yml (tests/deploy/test_containers.py);
# mmdebstrap makes the python:3.11-slim stand-in (no registry); dnsname lets compose services
# find each other by name on podman's CNI network
command -v podman >/dev/null 2>&1 || missing+=("podman" "buildah" "runc" "fuse-overlayfs" "slirp4netns" "uidmap")
command -v podman-compose >/dev/null 2>&1 || missing+=("podman-compose")
command -v mmdebstrap >/dev/null 2>&1 || missing+=("mmdebstrap")
[ -e /usr/lib/cni/dnsname ] || missing+=("golang-github-containernetworking-plugin-dnsname")
# systemd-analyze verifies the systemd unit (tests/deploy/test_systemd.py)
command -v systemd-analyze >/dev/null 2>&1 || missing+=("systemd")
# nginx's stream module (the gateway tests: CONNECT and PROXY protocol pass through it)
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || missing+=("libnginx-mod-stream")
if ((${#missing[@]})); then
    echo "installing Debian packages: ${missing[*]}"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/python -m pytest -q -rs -p no:cacheprovider "$@"

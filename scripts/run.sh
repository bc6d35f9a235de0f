#!/usr/bin/env bash
# Install cacheproxy into a virtual environment (.venv beside this checkout) and run it:
#   scripts/run.sh [serve options]      e.g. scripts/run.sh --listen 0.0.0.0:3128 -c conf/cacheproxy.yaml
# Needs Python >= 3.11 ($PYTHON, else python3). Debian's and Ubuntu's python3 cannot make a virtual
# environment without the python3-venv package: it is installed with apt-get when missing (as root
# or through sudo). Nothing is installed outside .venv otherwise (PEP 668 is respected).
set -euo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-python3}"
if ! command -v "$python" >/dev/null 2>&1; then
    echo "run.sh: $python not found: install Python 3.11 or newer (Debian 12: apt-get install python3 python3-venv)" >&2
    exit 1
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "run.sh: cacheproxy needs Python 3.11 or newer; $python is $("$python" -V 2>&1)." >&2
    echo "        Set PYTHON=/path/to/python3.11, or run the container image (see README, Deployment)." >&2
    exit 1
fi

if [ ! -x .venv/bin/python ]; then
    if ! "$python" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        if command -v apt-get >/dev/null 2>&1; then
            version="$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
            sudo=""
            [ "$(id -u)" -eq 0 ] || sudo="sudo"
            echo "run.sh: installing python3-venv (Debian's python3 needs it for a virtual environment)" >&2
            $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "python$version-venv" >&2 \
                || $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2
        else
            echo "run.sh: $python has no venv/ensurepip module: install your distribution's python3 venv package" >&2
            exit 1
        fi
    fi
    "$python" -m venv .venv
fi

# Install (again) only when the package's metadata changed since the last install.
stamp=.venv/.cacheproxy-installed
if [ ! -e "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "run.sh: installing cacheproxy and its dependencies into .venv" >&2
    .venv/bin/python -m pip install -q --disable-pip-version-check -e . >&2
    touch "$stamp"
fi
exec .venv/bin/cacheproxy serve "$@"

#!/usr/bin/env bash
# Install what agentd's demo and tests need, idempotently:
#   - Debian packages: espeak-ng (localcloud's TTS and the demo caller's voice); for the
#     tests also prometheus (its promtool checks /metrics), chromium (renders the status page)
#     and haproxy (the two-node load-balancer test runs etc/haproxy.cfg)
#   - a virtualenv in .venv with agentd (editable) and the extras asked for
# Usage: scripts/install.sh [EXTRAS]   EXTRAS defaults to "test" (make test); "localcloud"
# for make demo.  A production host needs neither: pip install agentd.
# Re-running is cheap: apt runs only for a missing command, pip only when setup.cfg changed.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-test}

# command -> Debian package
packages=(espeak-ng:espeak-ng)
# haproxy by its path: /usr/sbin is not on an unprivileged user's PATH
[ "$extras" = test ] && packages+=(promtool:prometheus chromium:chromium /usr/sbin/haproxy:haproxy)
missing=()
for entry in "${packages[@]}"; do
    command -v "${entry%%:*}" >/dev/null 2>&1 || missing+=("${entry#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "install: installing ${missing[*]} with apt-get" >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    # --no-install-recommends: prometheus recommends a node exporter and more we do not run
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "install: agentd needs Python >= 3.11 (found $("$python" --version 2>&1))" >&2
    exit 1
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv

stamp=.venv/.agentd-installed
want=$( (cat setup.cfg pyproject.toml; echo "$extras") | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[$extras]"
    echo "$want" > "$stamp"
fi

#!/bin/sh
# Install what `make bench` needs and is missing: nginx (+ its echo module), aria2c, wrk,
# GNU time (Debian packages), and py-spy in the project's venv. Installs nothing that is
# already there; runs `apt-get update` once, only when a Debian package is missing.
set -eu

VENV_BIN="${1:-.venv/bin}"
missing=""
command -v nginx >/dev/null 2>&1 || missing="$missing nginx"
[ -e /usr/lib/nginx/modules/ngx_http_echo_module.so ] || missing="$missing libnginx-mod-http-echo"
command -v aria2c >/dev/null 2>&1 || missing="$missing aria2"
command -v wrk >/dev/null 2>&1 || missing="$missing wrk"
[ -x /usr/bin/time ] || missing="$missing time"

if [ -n "$missing" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "make bench needs these Debian packages:$missing" >&2
        echo "install them as root: apt-get install$missing" >&2
        exit 2
    fi
    echo "make bench: installing$missing" >&2
    # The benchmark starts its own nginx on a free loopback port: keep the package's
    # service from starting on port 80 (policy-rc.d, unless the machine already has one).
    added_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        added_policy=1
    fi
    status=0
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends $missing >/dev/null || status=$?
    [ -z "$added_policy" ] || rm -f /usr/sbin/policy-rc.d
    [ "$status" -eq 0 ] || exit "$status"
fi

if [ ! -x "$VENV_BIN/py-spy" ]; then
    echo "make bench: installing py-spy into the venv (profiling only)" >&2
    "$VENV_BIN/python" -m pip install --quiet py-spy
fi

#!/bin/sh
# The gateway container: wait until the instances' names resolve (nginx refuses to start on an
# upstream it cannot resolve), write the upstream file once, keep the readiness hook running
# beside nginx, and run nginx in the foreground (PID 1's signals go to it).
set -eu
hook=/usr/local/lib/cacheproxy-gateway/readiness.py
out=/run/cacheproxy-gateway/upstreams.conf
# shellcheck disable=SC2086
set -- $CACHEPROXY_INSTANCES
for instance in "$@"; do
    host=${instance%:*}
    tries=0
    until getent hosts "$host" >/dev/null 2>&1; do
        tries=$((tries + 1))
        if [ "$tries" -ge 120 ]; then
            echo "gateway: $host does not resolve after 60 s; starting anyway" >&2
            break
        fi
        sleep 0.5
    done
done
python3 "$hook" --once --out "$out" "$@"
python3 "$hook" --out "$out" --pid-file /run/nginx.pid --interval "${CACHEPROXY_READINESS_INTERVAL:-5}" "$@" &
exec nginx -g 'daemon off;'

#!/usr/bin/env bash
# Runs the public HTTP caching test suite (http-tests/cache-tests, BSD-3-Clause, vendored in
# ./cache-tests without its node_modules) through a forward proxy and prints the score per kind.
#   run.sh PROXY_URL [OUT.json] [--id TEST_ID]
# The suite's origin runs on 127.0.0.1:8000 (must be free) and is stopped at the end. The proxy
# must forward other methods (rules.allow_other_methods: true) and allow loopback origins
# (rules.allow_private_upstreams: true). Needs node >= 18 and npm (packages come from npm).
set -euo pipefail
proxy=${1:?usage: run.sh PROXY_URL [OUT.json] [--id TEST_ID]}; shift
out=/tmp/cache-tests-results.json; id=""
while (($#)); do
  case $1 in --id) id=$2; shift 2 ;; *) out=$1; shift ;; esac
done
here=$(cd "$(dirname "$0")/cache-tests" && pwd)
work=${CACHE_TESTS_WORK:-/tmp/cacheproxy-cache-tests}
if [[ ! -d $work/node_modules ]] || ! cmp -s "$here/package-lock.json" "$work/package-lock.json"; then
  rm -rf "$work" && mkdir -p "$work" && cp -r "$here"/. "$work"/
  (cd "$work" && npm ci --no-audit --no-fund --loglevel=error)
fi
cp -r "$here"/tests "$here"/test-engine "$here"/score.mjs "$here"/proxy-preload.mjs "$work"/
cd "$work"
pidfile=$work/origin.pid
npm run --silent server --pidfile="$pidfile" >"$work/origin.log" 2>&1 &
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/8000) 2>/dev/null && break; sleep 0.2; done
trap 'kill "$(cat "$pidfile" 2>/dev/null)" 2>/dev/null || true' EXIT
export HTTP_PROXY=$proxy http_proxy=$proxy NO_PROXY= no_proxy= NODE_OPTIONS="--import=$work/proxy-preload.mjs"
if [[ -n $id ]]; then
  npm run --silent cli --base=http://127.0.0.1:8000 --id="$id"
  exit 0
fi
npm run --silent cli --base=http://127.0.0.1:8000 >"$out"
node "$work/score.mjs" "$out"

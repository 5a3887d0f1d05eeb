#!/usr/bin/env bash
# Installs the tools some tests drive from outside Rust. Idempotent; `.ci/run` calls it on a
# fresh machine, developers run it once. The tests that need these tools are `#[ignore]`d, so a
# bare `cargo test` reports them as ignored; `cargo test -- --include-ignored` runs them, and
# they fail if a tool is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

tools=target/test-tools
mkdir -p "$tools"

# schemathesis: property-based fuzzing of the whole OpenAPI document (tests/gateway/schema.rs).
SCHEMATHESIS_VERSION=4.32.5
if ! "$tools/venv/bin/schemathesis" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
  python3 -m venv "$tools/venv"
  "$tools/venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi

# Debian's Chromium and the pinned playwright-core (tests/browser/package-lock.json) for the
# chat page's browser tests (tests/browser.rs). Browser downloads are not needed.
# Debian's redis-server and haproxy for the multi-replica tests (tests/gateway/cluster*.rs),
# which start their own on free ports (openssl makes the TLS test's certificates).
missing=""
command -v chromium >/dev/null || missing="$missing chromium"
command -v redis-server >/dev/null || missing="$missing redis-server"
command -v haproxy >/dev/null || missing="$missing haproxy"
command -v openssl >/dev/null || missing="$missing openssl"
if [ -n "$missing" ]; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  # shellcheck disable=SC2086 # one word per package
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
(cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)

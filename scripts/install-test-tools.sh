#!/usr/bin/env bash
# Installs the tools some tests drive from outside Rust. Idempotent; `.ci/run` calls it on a
# fresh machine, developers run it once. Tests that need a tool which is missing fail under
# CI=true and are skipped loudly otherwise.
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

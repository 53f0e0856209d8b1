#!/usr/bin/env bash
# Runs the whole derpfleet test suite on a fresh Debian machine with a Rust toolchain, as root.
# Installs what the tests need (Debian packages, a Python venv), then: fmt check, clippy,
# build of every binary, and every test with cargo-nextest (one process per test).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

install_deps() {
  local pkgs
  pkgs=$(grep -v '^\s*#' scripts/apt-packages.txt | xargs)
  if [ -n "$pkgs" ]; then
    local missing=""
    for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
    if [ -n "$missing" ]; then
      log "installing Debian packages:$missing"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
    fi
  fi
  local py
  py=$(grep -v '^\s*#' scripts/pip-packages.txt | xargs || true)
  if [ -n "$py" ]; then
    [ -x .venv-test/bin/python ] || python3 -m venv .venv-test
    log "installing PyPI packages: $py"
    .venv-test/bin/pip install -q $py
  fi
  if ! cargo nextest --version >/dev/null 2>&1; then
    log "installing cargo-nextest"
    cargo install --locked cargo-nextest
  fi
}

install_deps
export DERPFLEET_TEST_VENV="$PWD/.venv-test"
# One-shot builds gain nothing from incremental artifacts, which would cost ~20 GB of disk here.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy"
cargo clippy --workspace --all-targets --all-features -- -D warnings

log "cargo build (all binaries)"
cargo build --workspace --bins --all-features

log "cargo nextest"
cargo nextest run --workspace --all-features --no-fail-fast "$@"

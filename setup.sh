#!/usr/bin/env bash
# Sets up schedcp on a fresh Debian/Ubuntu x86-64 machine (run as root, or with sudo available):
# host packages (qemu, mmdebstrap, workloads, observation tools), the Python package, and the
# sched_ext sandbox image (Debian sid kernel + trixie toolchain rootfs, ~2-5 min the first time).
# Idempotent: a second run does (almost) nothing.
set -euo pipefail
cd "$(dirname "$0")"

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

HOST_PACKAGES=(
  qemu-system-x86 mmdebstrap zstd cpio xz-utils util-linux debian-archive-keyring  # sandbox VM, image
  stress-ng rt-tests linux-perf libbpf-tools bpftool procps       # workloads and observation
  chromium fonts-dejavu-core                                      # the status page's browser test
  redis-server                                                    # the Celery broker (fleet engine, its test)
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
if ! $PY -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: Python >= 3.11 is required (found $($PY --version))" >&2; exit 2
fi
echo "setup: installing the schedcp Python package (editable, with test extras)"
$PY -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v -E "^WARNING: (Running pip as|Location)" || true

# the real Claude Code CLI, for the tests that check it connects (best effort: needs npm)
if ! command -v claude >/dev/null && command -v npm >/dev/null; then
  echo "setup: installing the Claude Code CLI (npm) for the client tests"
  npm install -g --silent @anthropic-ai/claude-code >/dev/null 2>&1 || echo "setup: claude CLI not installed (tests skip)"
fi
# the MCP Inspector (an independent MCP client; its CLI mode is used by tests/test_inspector.py)
if ! command -v mcp-inspector >/dev/null && command -v npm >/dev/null; then
  echo "setup: installing the MCP Inspector (npm) for the client tests"
  npm install -g --silent @modelcontextprotocol/inspector >/dev/null 2>&1 || echo "setup: MCP Inspector not installed (tests skip)"
fi

if [ "${SCHEDCP_SKIP_SANDBOX:-0}" != "1" ]; then
  echo "setup: building the sched_ext sandbox image (cached; --force rebuilds)"
  $PY -m schedcp_mcp sandbox build
fi
echo "setup: done. Try: schedcp info; schedcp policies list; schedcp optimize --workload hackbench"

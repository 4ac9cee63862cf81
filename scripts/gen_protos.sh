#!/usr/bin/env bash
# Regenerates the Python stubs (kvmesh/v1/*_pb2.py, *_pb2.pyi, *_pb2_grpc.py) from protos/.
# The generator is pinned: stubs record grpcio-tools' version and refuse to import under an older
# grpcio runtime, and the GPU image has grpcio 1.84. CI runs this and fails if anything changes.
set -euo pipefail
cd "$(dirname "$0")/.."
want="1.84.0"
have=$(python -c 'import importlib.metadata as m; print(m.version("grpcio-tools"))' 2>/dev/null || true)
if [ "$have" != "$want" ]; then
  echo "gen_protos: need grpcio-tools==$want (have '${have:-none}'): pip install grpcio-tools==$want" >&2
  exit 1
fi
out=kvmesh/v1
rm -f "$out"/*_pb2.py "$out"/*_pb2.pyi "$out"/*_pb2_grpc.py
python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/kvmesh/v1/*.proto

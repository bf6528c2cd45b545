"""The blocking client: which models the server has, one chat completion, and tokens of a text.

    weir up                          # in another terminal: server on localhost:50051, gateway on :8000
    python examples/sync_client.py   # WEIR_TARGET=host:port to use another server

Needs only `pip install ./client` (grpcio and protobuf; no torch).
"""

import os

from weir_client import WeirClient

TARGET = os.environ.get("WEIR_TARGET", "localhost:50051")


def main() -> None:
    with WeirClient(TARGET, timeout=120, api_key=os.environ.get("WEIR_API_KEY")) as client:
        client.wait_until_ready(timeout=60)
        for model in client.list_models():
            default = " (default)" if model.is_default else ""
            print(f"{model.task:8} {model.id}{default}: {model.max_context_length} tokens on {model.device}")

        # An empty model id means the server's default generation model.
        completion = client.complete(
            messages=[{"role": "user", "content": "Name three rivers in Europe."}], max_tokens=48, temperature=0
        )
        choice = completion.choices[0]
        print(f"\n{completion.model}: {choice.text.strip()}")
        print(f"finish_reason={choice.finish_reason} usage={choice.usage}")

        [tokens] = client.tokenize("Weir streams tokens over gRPC.")
        print(f"\n{len(tokens.token_ids)} tokens: {tokens.tokens}")


if __name__ == "__main__":
    main()

"""Streaming generation: print text as the server makes it, then why the choice ended and what it cost.

    python examples/streaming.py "Write a haiku about rivers."   # WEIR_TARGET=host:port for another server

Leaving the loop early (or Ctrl-C) cancels the request on the server.
"""

import os
import sys

from weir_client import WeirClient, WeirClientError

TARGET = os.environ.get("WEIR_TARGET", "localhost:50051")


def main() -> int:
    prompt = " ".join(sys.argv[1:]) or "Write a haiku about rivers."
    with WeirClient(TARGET, timeout=120, api_key=os.environ.get("WEIR_API_KEY")) as client:
        try:
            for chunk in client.generate(
                messages=[{"role": "user", "content": prompt}], max_tokens=64, temperature=0.7, seed=7
            ):
                print(chunk.text, end="", flush=True)
                if chunk.finished:
                    print(f"\n[finish_reason={chunk.finish_reason}, usage={chunk.usage}]")
        except WeirClientError as e:
            # Every failure is one error type: the gRPC code, the message and the request field at fault.
            print(f"\nerror: {e.code.name}: {e.message} (field: {e.field})", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Embeddings: one normalized vector per text from the server's embedding model, then a small semantic search.

python examples/embeddings.py "how do I stream tokens?"   # WEIR_TARGET=host:port for another server
"""

import os
import sys

from weir_client import WeirClient

TARGET = os.environ.get("WEIR_TARGET", "localhost:50051")
DOCUMENTS = [
    "Generate streams a completion as it is made, one message per batch of new tokens.",
    "Embed returns one vector per input text.",
    "The gateway speaks the OpenAI HTTP API in front of the gRPC servers.",
    "Paris is the capital of France.",
]


def main() -> None:
    query = " ".join(sys.argv[1:]) or "how do I stream tokens?"
    with WeirClient(TARGET, timeout=120, api_key=os.environ.get("WEIR_API_KEY")) as client:
        # An empty model id means the server's default embedding model; vectors are L2-normalized by default.
        result = client.embed([query, *DOCUMENTS])
    query_vector, *document_vectors = result.vectors
    print(f"{result.model}: {len(result.vectors)} vectors of {len(query_vector)} dimensions")
    # Normalized vectors: the dot product is the cosine similarity.
    scores = [sum(q * d for q, d in zip(query_vector, vector, strict=True)) for vector in document_vectors]
    print(f"query: {query}")
    for score, document in sorted(zip(scores, DOCUMENTS, strict=True), reverse=True):
        print(f"{score:.3f}  {document}")


if __name__ == "__main__":
    main()

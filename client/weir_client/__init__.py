"""Weir's Python client: `WeirClient` (blocking) and `AsyncWeirClient` (asyncio) for weir.v1.InferenceService.

    with WeirClient("localhost:50051") as client:
        for chunk in client.generate(messages=[{"role": "user", "content": "Hi"}], max_tokens=32):
            print(chunk.text, end="", flush=True)

Results are plain dataclasses (`weir_client.types`); every failure raises `WeirClientError` with `.code`
(grpc.StatusCode), `.message` and `.field` (the request field at fault, when the server names one).
"""

from weir_client.aio import AsyncWeirClient
from weir_client.client import WeirClient
from weir_client.control import ModelLoad, ServedModelInfo, ServerInfo, ServerLoad
from weir_client.errors import WeirClientError
from weir_client.security import TlsOptions
from weir_client.types import (
    AdapterInfo,
    Choice,
    Completion,
    Embeddings,
    GenerateKeywords,
    GenerateOptions,
    GenerationChunk,
    ModelInfo,
    OutputOptions,
    SamplingOptions,
    Tokenization,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
    collect,
)

__all__ = [
    "AdapterInfo",
    "AsyncWeirClient",
    "Choice",
    "Completion",
    "Embeddings",
    "GenerateKeywords",
    "GenerateOptions",
    "GenerationChunk",
    "ModelInfo",
    "ModelLoad",
    "OutputOptions",
    "SamplingOptions",
    "ServedModelInfo",
    "ServerInfo",
    "ServerLoad",
    "TlsOptions",
    "Tokenization",
    "TokenLogprob",
    "ToolCall",
    "ToolCallDelta",
    "TopLogprob",
    "Usage",
    "WeirClient",
    "WeirClientError",
    "collect",
]

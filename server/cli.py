"""`weir serve`: parse options into a frozen ServerConfig and run the gRPC server."""

from __future__ import annotations

import argparse
import logging
import sys

from weir_server.config import (
    DEFAULT_EMBED_MODEL,
    DEFAULT_GENERATE_MODEL,
    CacheConfig,
    EngineConfig,
    ExecutorConfig,
    ModelConfig,
    SchedulerConfig,
    ServerConfig,
)
from weir_server.errors import ModelLoadError

_CACHE = CacheConfig()
_SCHEDULER = SchedulerConfig()
_SERVER = ServerConfig()


def build_parser(prog: str = "weir serve") -> argparse.ArgumentParser:
    """The options of `weir serve`."""
    p = argparse.ArgumentParser(prog=prog, description="Serve models over gRPC (weir.v1.InferenceService).")
    p.add_argument("--host", default=_SERVER.host, help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=_SERVER.port, help="port to listen on; 0 picks a free one")
    p.add_argument(
        "--model", default=DEFAULT_GENERATE_MODEL, help="generation model: packaged short name, directory, "
        ".gguf file or hub id; 'none' disables generation (default %(default)s)"
    )
    p.add_argument(
        "--embed-model", default=DEFAULT_EMBED_MODEL, help="embedding model; 'none' disables (default %(default)s)"
    )
    p.add_argument("--served-model-name", help="id clients pass as `model` for the generation model")
    p.add_argument(
        "--load-format", default="auto", choices=("auto", "safetensors", "gguf", "dummy"),
        help="weights format of the generation model; dummy = random weights (default %(default)s)",
    )
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"))
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default %(default)s)")
    p.add_argument("--max-model-len", type=int, help="cap on prompt + output tokens (default: the model's own)")
    p.add_argument("--block-size", type=int, default=_CACHE.block_size, help="tokens per KV block")
    p.add_argument("--num-kv-blocks", type=int, help="KV blocks to allocate (default: sized from memory)")
    p.add_argument("--kv-cache-memory-gb", type=float, default=_CACHE.kv_cache_memory_gb, help="CPU: KV cache RAM")
    p.add_argument(
        "--gpu-memory-utilization", type=float, default=_CACHE.gpu_memory_utilization,
        help="GPU: fraction of memory Weir may use",
    )
    p.add_argument("--max-num-seqs", type=int, default=_SCHEDULER.max_num_seqs, help="sequences per step")
    p.add_argument(
        "--max-num-batched-tokens", type=int, default=_SCHEDULER.max_num_batched_tokens, help="tokens per step"
    )
    p.add_argument("--max-waiting", type=int, default=_SCHEDULER.max_waiting, help="queued requests before refusing")
    p.add_argument("--enforce-eager", action="store_true", help="disable CUDA graphs")
    p.add_argument("--no-prefix-caching", action="store_true", help="disable the prefix cache")
    p.add_argument(
        "--drain-timeout", type=float, default=_SERVER.drain_timeout_s,
        help="seconds running calls may finish after SIGTERM (default %(default)s)",
    )
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def _disabled(name: str) -> bool:
    return name.strip().lower() in ("", "none")


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The frozen ServerConfig the parsed options describe."""
    generate = None
    if not _disabled(args.model):
        model = ModelConfig(
            model=args.model,
            served_name=args.served_model_name,
            load_format=args.load_format,
            dtype=args.dtype,
            device=args.device,
            max_model_len=args.max_model_len,
        )
        cache = CacheConfig(
            block_size=args.block_size,
            num_blocks=args.num_kv_blocks,
            kv_cache_memory_gb=args.kv_cache_memory_gb,
            gpu_memory_utilization=args.gpu_memory_utilization,
            enable_prefix_caching=not args.no_prefix_caching,
        )
        scheduler = SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_waiting=args.max_waiting,
        )
        generate = EngineConfig(model, cache, scheduler, ExecutorConfig(enforce_eager=args.enforce_eager))
    embed = None
    if not _disabled(args.embed_model):
        embed = ModelConfig(model=args.embed_model, dtype=args.dtype, device=args.device)
    return ServerConfig(
        host=args.host, port=args.port, generate=generate, embed=embed, drain_timeout_s=args.drain_timeout
    )


def main(argv: list[str] | None = None) -> int:
    """Run `weir serve`; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    config = config_from_args(args)
    from weir_server.api.server import serve  # imports torch; after parsing so --help stays fast

    try:
        serve(config)
    except ModelLoadError as e:
        logging.getLogger("weir_server").error("could not load a model: %s", e)
        return 1
    except OSError as e:
        logging.getLogger("weir_server").error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

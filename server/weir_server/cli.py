"""`weir serve`: parse options into a frozen ServerConfig and run the gRPC server."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from weir_server.config import (
    DEFAULT_EMBED_MODEL,
    DEFAULT_GENERATE_MODEL,
    ENGINE_CORES,
    TOOL_CALL_PARSER_AUTO,
    CacheConfig,
    ChatConfig,
    EngineConfig,
    ExecutorConfig,
    LimitsConfig,
    ModelConfig,
    ObservabilityConfig,
    ParallelConfig,
    SchedulerConfig,
    ServerConfig,
    TlsConfig,
)
from weir_server.engine.structured_config import MIB, StructuredOutputConfig
from weir_server.errors import EngineUnavailableError, ModelLoadError
from weir_server.logging_setup import LOG_FORMATS, configure_logging

_CACHE = CacheConfig()
_SCHEDULER = SchedulerConfig()
_SERVER = ServerConfig()
_LIMITS = LimitsConfig()


def build_parser(prog: str = "weir serve") -> argparse.ArgumentParser:
    """The options of `weir serve`."""
    p = argparse.ArgumentParser(prog=prog, description="Serve models over gRPC (weir.v1.InferenceService).")
    p.add_argument("--host", default=_SERVER.host, help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=_SERVER.port, help="port to listen on; 0 picks a free one")
    p.add_argument(
        "--model",
        default=DEFAULT_GENERATE_MODEL,
        help="generation model: packaged short name, directory, "
        ".gguf file or hub id; 'none' disables generation (default %(default)s)",
    )
    p.add_argument(
        "--embed-model", default=DEFAULT_EMBED_MODEL, help="embedding model; 'none' disables (default %(default)s)"
    )
    p.add_argument("--served-model-name", help="id clients pass as `model` for the generation model")
    p.add_argument(
        "--load-format",
        default="auto",
        choices=("auto", "safetensors", "gguf", "dummy"),
        help="weights format of the generation model; dummy = random weights (default %(default)s)",
    )
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"))
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default %(default)s)")
    p.add_argument("--max-model-len", type=int, help="cap on prompt + output tokens (default: the model's own)")
    p.add_argument("--block-size", type=int, default=_CACHE.block_size, help="tokens per KV block")
    p.add_argument("--num-kv-blocks", type=int, help="KV blocks to allocate (default: sized from memory)")
    p.add_argument("--kv-cache-memory-gb", type=float, default=_CACHE.kv_cache_memory_gb, help="CPU: KV cache RAM")
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=_CACHE.gpu_memory_utilization,
        help="GPU: fraction of memory Weir may use",
    )
    p.add_argument("--max-num-seqs", type=int, default=_SCHEDULER.max_num_seqs, help="sequences per step")
    p.add_argument(
        "--max-num-batched-tokens", type=int, default=_SCHEDULER.max_num_batched_tokens, help="tokens per step"
    )
    p.add_argument("--max-waiting", type=int, default=_SCHEDULER.max_waiting, help="queued requests before refusing")
    p.add_argument("--enforce-eager", action="store_true", help="disable CUDA graphs")
    p.add_argument(
        "--no-run-ahead",
        dest="run_ahead",
        action="store_false",
        help="on CUDA, read each step's sampled tokens back before launching the next (default: run ahead)",
    )
    p.add_argument(
        "--engine-core",
        default="auto",
        choices=ENGINE_CORES,
        help="run the generation engine on a thread of the server or in its own process (auto: a process on "
        "CUDA, a thread on CPU) (default %(default)s)",
    )
    p.add_argument(
        "--num-threads", type=int, metavar="N", help="torch threads for the model on CPU (default: every core)"
    )
    p.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=1,
        metavar="N",
        help="split the generation model over N GPUs of this host (one worker process per extra GPU; "
        "with --device cpu, N processes over gloo) (default %(default)s)",
    )
    p.add_argument("--no-prefix-caching", action="store_true", help="disable the prefix cache")
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=_SERVER.drain_timeout_s,
        help="seconds running calls may finish after SIGTERM (default %(default)s)",
    )
    p.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate (chain) file")
    p.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    p.add_argument("--tls-client-ca", metavar="PEM", help="mutual TLS: require client certificates signed by this CA")
    p.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="require `authorization: Bearer KEY` metadata on InferenceService calls; repeat for several keys "
        "(health and reflection stay open)",
    )
    p.add_argument(
        "--api-key-file", metavar="PATH", help="read API keys from a file, one per line (keeps them out of `ps`)"
    )
    p.add_argument(
        "--chat-template",
        metavar="FILE_OR_STRING",
        help="a Jinja chat template (a file, or the template itself) used instead of the model's own",
    )
    p.add_argument(
        "--tool-call-parser",
        default=TOOL_CALL_PARSER_AUTO,
        metavar="NAME",
        help="the model's tool-call format: hermes, llama3_json, mistral, pythonic, json, or auto (the one its "
        "chat template uses; hermes where the template knows no tools) (default %(default)s)",
    )
    p.add_argument(
        "--reasoning-parser",
        metavar="NAME",
        help="split reasoning from the answer: deepseek_r1 or qwen3 (<think>...</think>) (default: off)",
    )
    p.add_argument(
        "--parse-special-tokens",
        action="store_true",
        help="read special-token strings (<|im_start|>...) in a raw prompt and in Tokenize and Embed texts as the "
        "special tokens they spell, for clients that send prompts they rendered themselves (default: they are "
        "text; chat message content is always text)",
    )
    _add_limit_options(p)
    _add_constraint_options(p)
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument(
        "--log-format",
        default="text",
        choices=LOG_FORMATS,
        help="json: one object per line with request and trace ids (default %(default)s)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus /metrics over HTTP on this port of --host (0 picks a "
        "free one; default: off). Tracing is on when OTEL_EXPORTER_OTLP_ENDPOINT names an OTLP/gRPC collector",
    )
    return p


def _add_limit_options(p: argparse.ArgumentParser) -> None:
    """What one request may ask of the server (docs/limits.md). Structured-output limits get a group of their own
    beside this one, read by a function beside _limits()."""
    group = p.add_argument_group("request limits", "a request over one is refused INVALID_ARGUMENT before its work")
    group.add_argument(
        "--max-text-bytes",
        type=int,
        default=_LIMITS.max_text_bytes,
        metavar="N",
        help="UTF-8 bytes of text one request may give to tokenize or embed: a prompt, a conversation, Tokenize or "
        "Embed texts together (default %(default)s)",
    )
    group.add_argument(
        "--max-chat-messages",
        type=int,
        default=_LIMITS.max_chat_messages,
        metavar="N",
        help="turns of a conversation, its content parts and tool calls counted together (default %(default)s)",
    )
    group.add_argument(
        "--max-chat-template-kwargs-bytes",
        type=int,
        default=_LIMITS.max_chat_template_kwargs_bytes,
        metavar="N",
        help="bytes of a request's chat_template_kwargs (default %(default)s)",
    )
    group.add_argument(
        "--max-tools", type=int, default=_LIMITS.max_tools, metavar="N", help="tools per request (default %(default)s)"
    )
    group.add_argument(
        "--max-tools-bytes",
        type=int,
        default=_LIMITS.max_tools_bytes,
        metavar="N",
        help="bytes of a request's tool definitions together (default %(default)s)",
    )
    group.add_argument(
        "--max-inputs",
        type=int,
        default=_LIMITS.max_inputs,
        metavar="N",
        help="texts or sequences of one Tokenize, Detokenize or Embed request (default %(default)s)",
    )
    group.add_argument(
        "--max-detokenize-ids",
        type=int,
        default=_LIMITS.max_detokenize_ids,
        metavar="N",
        help="token ids of one Detokenize request, its sequences together (default %(default)s)",
    )
    group.add_argument(
        "--max-message-bytes",
        type=int,
        default=_LIMITS.max_message_bytes,
        metavar="N",
        help="one gRPC message, request or reply (default %(default)s)",
    )
    group.add_argument(
        "--frontend-threads",
        type=int,
        metavar="N",
        help="threads that tokenize, render chat templates and detokenize off the event loop (default: CPU "
        "cores, at most 4)",
    )


def _add_constraint_options(p: argparse.ArgumentParser) -> None:
    """What one output constraint may cost (docs/limits.md, "Server: constraints")."""
    d = StructuredOutputConfig()
    group = p.add_argument_group("constraint limits", "schemas, regexes, grammars and tool-call grammars")
    group.add_argument(
        "--max-constraint-bytes",
        type=int,
        default=d.max_constraint_bytes,
        metavar="N",
        help="UTF-8 bytes of one constraint (default %(default)s)",
    )
    group.add_argument(
        "--max-constraint-depth",
        type=int,
        default=d.max_constraint_depth,
        metavar="N",
        help="nesting of objects and arrays in a JSON schema (default %(default)s)",
    )
    group.add_argument(
        "--constraint-compile-timeout",
        type=float,
        default=d.compile_timeout_s,
        metavar="S",
        help="seconds one compile may take in a worker before it is killed (default %(default)s)",
    )
    group.add_argument(
        "--constraint-compile-workers",
        type=int,
        default=d.compile_workers,
        metavar="N",
        help="worker processes that compile new constraints (default %(default)s)",
    )
    group.add_argument(
        "--constraint-compile-queue",
        type=int,
        default=d.compile_queue,
        metavar="N",
        help="new constraints waiting for a worker before RESOURCE_EXHAUSTED (default %(default)s)",
    )
    group.add_argument(
        "--constraint-cache-mb",
        type=int,
        default=d.cache_memory_bytes // MIB,
        metavar="MB",
        help="memory of the compiled-constraint cache (default %(default)s)",
    )
    group.add_argument(
        "--max-compiled-constraint-mb",
        type=int,
        default=d.max_compiled_bytes // MIB,
        metavar="MB",
        help="memory one compiled constraint may hold (default %(default)s)",
    )
    group.add_argument(
        "--constraint-worker-memory-mb",
        type=int,
        default=d.worker_memory_bytes // MIB,
        metavar="MB",
        help="address space a compile may add in its worker (default %(default)s)",
    )


def _structured(args: argparse.Namespace) -> StructuredOutputConfig:
    return StructuredOutputConfig(
        max_constraint_bytes=args.max_constraint_bytes,
        max_constraint_depth=args.max_constraint_depth,
        compile_timeout_s=args.constraint_compile_timeout,
        compile_workers=args.constraint_compile_workers,
        compile_queue=args.constraint_compile_queue,
        cache_memory_bytes=args.constraint_cache_mb * MIB,
        max_compiled_bytes=args.max_compiled_constraint_mb * MIB,
        worker_memory_bytes=args.constraint_worker_memory_mb * MIB,
    )


def _limits(args: argparse.Namespace) -> LimitsConfig:
    limits = LimitsConfig(
        max_text_bytes=args.max_text_bytes,
        max_chat_messages=args.max_chat_messages,
        max_chat_template_kwargs_bytes=args.max_chat_template_kwargs_bytes,
        max_tools=args.max_tools,
        max_tools_bytes=args.max_tools_bytes,
        max_inputs=args.max_inputs,
        max_detokenize_ids=args.max_detokenize_ids,
        max_message_bytes=args.max_message_bytes,
        frontend_threads=args.frontend_threads,
    )
    for name, value in dataclasses.asdict(limits).items():
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    return limits


def _tls(args: argparse.Namespace) -> TlsConfig | None:
    if not (args.tls_cert or args.tls_key or args.tls_client_ca):
        return None
    if not (args.tls_cert and args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together (and --tls-client-ca needs both)")
    return TlsConfig(args.tls_cert, args.tls_key, args.tls_client_ca)


def _api_keys(args: argparse.Namespace) -> tuple[str, ...]:
    keys = [k.strip() for k in args.api_key]
    if args.api_key_file:
        with open(args.api_key_file, encoding="utf-8") as f:
            keys += [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    if any(not k for k in keys):
        raise ValueError("--api-key must not be empty")
    return tuple(dict.fromkeys(keys))


def _chat(args: argparse.Namespace) -> ChatConfig:
    """The chat options; --chat-template names a file when one exists there, else it is the template itself."""
    template = args.chat_template
    if template is not None and os.path.isfile(template):
        with open(template, encoding="utf-8") as f:
            template = f.read()
    if template is not None and not template.strip():
        raise ValueError("--chat-template is empty")
    from weir_server.parsers import reasoning_parser, tool_parser  # pure Python: no torch at parse time

    if args.tool_call_parser != TOOL_CALL_PARSER_AUTO:
        tool_parser.get_tool_parser(args.tool_call_parser)  # ValueError naming the choices
    if args.reasoning_parser is not None:
        reasoning_parser.get_reasoning_parser(args.reasoning_parser)
    return ChatConfig(template, args.tool_call_parser, args.reasoning_parser)


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
        if args.tensor_parallel_size < 1:
            raise ValueError(f"--tensor-parallel-size must be at least 1, got {args.tensor_parallel_size}")
        parallel = ParallelConfig(tensor_parallel_size=args.tensor_parallel_size)
        if args.num_threads is not None and args.num_threads < 1:
            raise ValueError(f"--num-threads must be at least 1, got {args.num_threads}")
        executor = ExecutorConfig(
            enforce_eager=args.enforce_eager,
            num_threads=args.num_threads,
            engine_core=args.engine_core,
            run_ahead=args.run_ahead,
        )
        generate = EngineConfig(model, cache, scheduler, executor, parallel, _structured(args))
    embed = None
    if not _disabled(args.embed_model):
        embed = ModelConfig(model=args.embed_model, dtype=args.dtype, device=args.device)
    return ServerConfig(
        host=args.host,
        port=args.port,
        generate=generate,
        embed=embed,
        drain_timeout_s=args.drain_timeout,
        tls=_tls(args),
        api_keys=_api_keys(args),
        chat=_chat(args),
        limits=_limits(args),
        parse_special_tokens=args.parse_special_tokens,
        observability=ObservabilityConfig(
            metrics_port=args.metrics_port,
            otlp_endpoint=os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None,
            service_name=os.environ.get("OTEL_SERVICE_NAME") or "weir-server",
        ),
    )


def main(argv: list[str] | None = None) -> int:
    """Run `weir serve`; returns the process exit code."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format, secrets=args.api_key)
    try:
        config = config_from_args(args)
    except (ValueError, OSError) as e:
        logging.getLogger("weir_server").error("invalid configuration: %s", e)
        return 2
    # The keys of --api-key-file are known now: no log line or traceback may hold one.
    configure_logging(args.log_level, args.log_format, secrets=config.api_keys)
    from weir_server.api.server import serve  # imports torch; after parsing so --help stays fast

    try:
        serve(config)  # tensor-parallel workers start with the engine's core (`EngineCore.from_config`)
    except ModelLoadError as e:
        logging.getLogger("weir_server").error("could not load a model: %s", e)
        return 1
    except EngineUnavailableError as e:  # the engine process died after start-up; the server drained and stopped
        logging.getLogger("weir_server").error("%s", e)
        return 1
    except OSError as e:
        logging.getLogger("weir_server").error("%s", e)
        return 1
    except Exception as e:  # noqa: BLE001 - a failed start ends in one clear line, the traceback at debug level
        message = " ".join(str(e).split())
        logging.getLogger("weir_server").debug("start-up failed", exc_info=True)
        logging.getLogger("weir_server").error("could not start: %s: %s", type(e).__name__, message)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

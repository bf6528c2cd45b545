"""`weir serve`: its options (serve_args.py) into a frozen ServerConfig, checked before anything loads; then run the
gRPC server."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence

from weir_server.config import (
    DEFAULT_EMBED_MODEL,
    DEFAULT_GENERATE_MODEL,
    TOOL_CALL_PARSER_AUTO,
    CacheConfig,
    ChatConfig,
    EngineConfig,
    ExecutorConfig,
    LimitsConfig,
    LoRAConfig,
    ModelConfig,
    ObservabilityConfig,
    ParallelConfig,
    SchedulerConfig,
    ServerConfig,
    TlsConfig,
)
from weir_server.config_file import ConfigFileError, FileArguments, config_path, read_config_file
from weir_server.engine.spec_decode.config import parse_speculative_config
from weir_server.engine.structured_config import MIB, StructuredOutputConfig
from weir_server.engine.types import MAX_LOGPROBS
from weir_server.errors import EngineUnavailableError, ModelLoadError
from weir_server.logging_setup import configure_logging
from weir_server.preflight import VALID_ADAPTER_NAME, check_config
from weir_server.serve_args import DTYPE_ALIASES, SAFETENSORS_QUANTIZATIONS, build_parser


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
        max_logprobs=args.max_logprobs,
    )
    for name, value in dataclasses.asdict(limits).items():
        if name != "max_logprobs" and value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if not 0 <= limits.max_logprobs <= MAX_LOGPROBS:
        raise ValueError(
            f"--max-logprobs must be in [0, {MAX_LOGPROBS}] (the most Weir returns), got {args.max_logprobs}"
        )
    return limits


def _tls(args: argparse.Namespace) -> TlsConfig | None:
    if not (args.tls_cert or args.tls_key or args.tls_client_ca):
        return None
    if not (args.tls_cert and args.tls_key):
        raise ValueError(
            "--ssl-certfile (--tls-cert) and --ssl-keyfile (--tls-key) go together, and --ssl-ca-certs "
            "(--tls-client-ca) needs both"
        )
    return TlsConfig(args.tls_cert, args.tls_key, args.tls_client_ca)


def _api_keys(args: argparse.Namespace) -> tuple[str, ...]:
    keys = [k.strip() for k in args.api_key]
    if args.api_key_file:
        try:
            with open(args.api_key_file, encoding="utf-8") as f:
                keys += [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
        except OSError as error:
            raise ValueError(
                f"--api-key-file {args.api_key_file}: cannot read it: {error.strerror or error}"
            ) from error
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


def _model_names(args: argparse.Namespace) -> tuple[str, str]:
    """The generation and embedding model specs. Naming a generation model (positionally, with --model or in the
    config file) serves it alone; the packaged embedding model comes only with the default generation model or
    with none, or when --embed-model names it."""
    positional, flag = getattr(args, "model_tag", None), args.model
    if positional is not None and flag is not None and positional != flag:
        raise ValueError(f"the model is given twice, as {positional!r} and as --model {flag!r}; give it once")
    named = positional if positional is not None else flag
    if named is None:
        named = getattr(args, "config_model", None)  # a config file's `model:`, under the command line's
    generate = DEFAULT_GENERATE_MODEL if named is None else named
    if args.embed_model is not None:
        embed = args.embed_model
    else:
        embed = DEFAULT_EMBED_MODEL if named is None or _disabled(named) else "none"
    return generate, embed


def _load_format(args: argparse.Namespace, model: str) -> str:
    """--load-format once --quantization agrees with it: `-q gguf` means GGUF weights (kept packed:
    ModelConfig.keep_quantized); awq, gptq and fp8 take safetensors (or, fp8 only, dummy) weights."""
    method = (args.quantization or "none").strip().lower()
    if method in ("none", "auto"):
        return str(args.load_format)
    if method in SAFETENSORS_QUANTIZATIONS:
        if args.load_format == "gguf" or (args.load_format == "dummy" and method != "fp8"):
            raise ValueError(f"--quantization {method} does not take --load-format {args.load_format}")
        return str(args.load_format)
    if method != "gguf":
        raise ValueError(
            f"--quantization {args.quantization}: not supported; Weir runs gguf (a .gguf model kept quantized in "
            "memory), awq and gptq (4-bit checkpoints), fp8 (FP8 checkpoints, or a float one quantized on load), "
            "or none"
        )
    if args.load_format not in ("auto", "gguf"):
        raise ValueError(f"--quantization gguf needs GGUF weights, but --load-format is {args.load_format}")
    path = os.path.expanduser(model)
    if os.path.isfile(path) and not path.endswith(".gguf"):
        raise ValueError(f"--quantization gguf needs a .gguf model, but {model} is not one")
    return "gguf"


def _quantization(args: argparse.Namespace) -> str | None:
    """--quantization for ModelConfig: awq, gptq or fp8, else None (gguf travels as keep_quantized)."""
    method = (args.quantization or "none").strip().lower()
    return method if method in SAFETENSORS_QUANTIZATIONS else None


def _cache(args: argparse.Namespace) -> CacheConfig:
    if args.kv_cache_dtype != "auto":  # the model's dtype needs no check, and a server process without torch stays so
        from weir_server.executor.kv_cache_dtype import check_kv_cache_dtype  # imports torch: only once it is needed

        check_kv_cache_dtype(args.kv_cache_dtype, args.device)
    return CacheConfig(
        block_size=args.block_size,
        num_blocks=args.num_kv_blocks,
        kv_cache_memory_gb=args.kv_cache_memory_gb,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=args.enable_prefix_caching,
        cache_dtype=args.kv_cache_dtype,
    )


def _lora_module(text: str, served_id: str) -> tuple[str, str]:
    """One --lora-modules value as (name, path): NAME=PATH, or vLLM's JSON object with name, path and optionally
    base_model_name (which must be the served generation model)."""
    if text.lstrip().startswith("{"):
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"--lora-modules {text}: not valid JSON ({error.msg})") from error
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not isinstance(spec.get("path"), str):
            raise ValueError(f'--lora-modules {text}: the JSON form is {{"name": "...", "path": "..."}}')
        unknown = set(spec) - {"name", "path", "base_model_name"}
        if unknown:
            raise ValueError(f"--lora-modules {text}: unknown key(s) {', '.join(sorted(unknown))}")
        base = spec.get("base_model_name")
        if base is not None and base != served_id:
            raise ValueError(
                f"--lora-modules {text}: base_model_name {base!r} is not the generation model, {served_id!r}"
            )
        name, path = spec["name"], spec["path"]
    else:
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules {text}: expected NAME=PATH (or a JSON object)")
    if not VALID_ADAPTER_NAME.fullmatch(name):
        raise ValueError(
            f"--lora-modules {text}: the name must be 1 to 128 printable ASCII characters without spaces or commas"
        )
    if name == served_id:
        raise ValueError(f"--lora-modules {text}: {name!r} is the generation model's id; name the adapter otherwise")
    return name, path


def _lora(args: argparse.Namespace, served_id: str) -> LoRAConfig | None:
    """The LoRA options, or None when --enable-lora is off (then none of them may be given)."""
    if not args.enable_lora:
        if args.lora_modules:
            raise ValueError("--lora-modules needs --enable-lora")
        return None
    modules = tuple(_lora_module(text, served_id) for text in args.lora_modules)
    names = [name for name, _ in modules]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"--lora-modules names {', '.join(repeated)} more than once")
    return LoRAConfig(  # checks the numbers itself
        max_lora_rank=args.max_lora_rank,
        max_loras=args.max_loras,
        max_cpu_loras=args.max_cpu_loras,
        lora_modules=modules,
    )


def _engine(args: argparse.Namespace, name: str) -> EngineConfig:
    seed = {} if args.seed is None else {"seed": args.seed, "sampling_seed": args.seed}
    model = ModelConfig(
        model=name,
        served_name=args.served_model_name,
        load_format=_load_format(args, name),
        keep_quantized=(args.quantization or "").strip().lower() == "gguf",
        quantization=_quantization(args),
        dtype=DTYPE_ALIASES.get(args.dtype, args.dtype),
        device=args.device,
        max_model_len=args.max_model_len,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
        tokenizer=args.tokenizer,
        tokenizer_revision=args.tokenizer_revision,
        download_dir=args.download_dir,
        **seed,
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
    lora = _lora(args, model.served_name or model.model)
    speculative = None if args.speculative_config is None else parse_speculative_config(args.speculative_config)
    return EngineConfig(
        model, _cache(args), scheduler, executor, parallel, _structured(args), lora=lora, speculative=speculative
    )


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The frozen ServerConfig the parsed options describe; ValueError names the first bad option."""
    generate_name, embed_name = _model_names(args)
    generate = None if _disabled(generate_name) else _engine(args, generate_name)
    if generate is None and args.enable_lora:
        raise ValueError("--enable-lora needs a generation model (adapters apply to it), but generation is off")
    embed = None
    if not _disabled(embed_name):
        embed = ModelConfig(
            model=embed_name,
            dtype=DTYPE_ALIASES.get(args.dtype, args.dtype),
            device=args.device,
            trust_remote_code=args.trust_remote_code,
            download_dir=args.download_dir,
        )
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
            otlp_endpoint=args.otlp_traces_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None,
            service_name=os.environ.get("OTEL_SERVICE_NAME") or "weir-server",
            metrics_require_api_key=args.metrics_require_api_key,
        ),
    )


def parse_args(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """`argv` parsed, with the --config file's values read as flags placed before it (so the command line wins);
    a bad flag or config file exits 2 with one line."""
    parser = parser or build_parser()
    tokens = list(sys.argv[1:] if argv is None else argv)
    path = config_path(tokens)
    from_file = FileArguments([])
    if path is not None:
        try:
            from_file = read_config_file(path, parser)
        except ConfigFileError as error:
            parser.exit(2, f"{parser.prog}: error: {error}\n")
    args = parser.parse_args([*from_file.argv, *tokens])
    args.config_model = from_file.model
    return args


def main(argv: list[str] | None = None) -> int:
    """Run `weir serve`; returns the process exit code."""
    parser = build_parser()
    args = parse_args(argv, parser)
    configure_logging(args.log_level, args.log_format, secrets=args.api_key)
    try:
        config = config_from_args(args)
        check_config(config)  # missing packages, a certificate that is not its key's: before anything loads
    except (ValueError, OSError) as e:
        message = " ".join(str(e).split())
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 2
    # The keys of --api-key-file are known now: no log line or traceback may hold one.
    configure_logging(args.log_level, args.log_format, secrets=config.api_keys)
    from weir_server.api.server import serve  # grpc and transformers (torch too, unless the core has its own process)

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

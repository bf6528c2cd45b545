"""The options of `weir serve`: vLLM's flag names for what vLLM also has, Weir's older spellings kept as aliases.
`cli.py` turns what they parse into a frozen ServerConfig."""

from __future__ import annotations

import argparse
from typing import NoReturn

from weir_server.config import (
    DEFAULT_EMBED_MODEL,
    DEFAULT_GENERATE_MODEL,
    ENGINE_CORES,
    TOOL_CALL_PARSER_AUTO,
    CacheConfig,
    LimitsConfig,
    LoRAConfig,
    SchedulerConfig,
    ServerConfig,
)
from weir_server.engine.structured_config import MIB, StructuredOutputConfig
from weir_server.engine.types import MAX_LOGPROBS
from weir_server.logging_setup import LOG_FORMATS

_CACHE = CacheConfig()
_SCHEDULER = SchedulerConfig()
_SERVER = ServerConfig()
_LIMITS = LimitsConfig()
_LORA = LoRAConfig()
_DTYPE_NAMES = ("auto", "bfloat16", "float16", "float32")
DTYPE_ALIASES = {"half": "float16", "float": "float32"}  # vLLM's other spellings
SAFETENSORS_QUANTIZATIONS = ("awq", "gptq", "fp8")  # --quantization methods read from safetensors checkpoints


def build_parser(prog: str = "weir serve") -> argparse.ArgumentParser:
    """The options of `weir serve`: vLLM's names for what vLLM also has, Weir's older spellings kept as aliases."""
    p = _Parser(
        prog=prog,
        usage="%(prog)s [MODEL] [options]",
        description="Serve models over gRPC (weir.v1.InferenceService). With no model named, serve the packaged "
        f"{DEFAULT_GENERATE_MODEL} and {DEFAULT_EMBED_MODEL}; with one, that model alone (--embed-model adds one).",
    )
    p.add_argument(
        "model_tag",
        nargs="?",
        metavar="MODEL",
        help="the generation model (the same as --model): packaged short name, directory, .gguf file or hub id",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="a YAML file of long flag names (dashes or underscores) and their values; flags on the command line "
        "win over it",
    )
    _add_model_options(p)
    _add_server_options(p)
    _add_cache_options(p)
    _add_scheduler_options(p)
    _add_chat_options(p)
    _add_lora_options(p)
    _add_limit_options(p)
    _add_constraint_options(p)
    _add_observability_options(p)
    return p


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (argparse prints its whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("model", "what to serve and how to load it")
    group.add_argument(
        "--model",
        help="generation model: packaged short name, directory, .gguf file or hub id; 'none' disables generation "
        f"(default {DEFAULT_GENERATE_MODEL})",
    )
    group.add_argument(
        "--embed-model",
        help=f"embedding model; 'none' disables (default: {DEFAULT_EMBED_MODEL} when no generation model is named, "
        "else none)",
    )
    group.add_argument("--served-model-name", help="id clients pass as `model` for the generation model")
    group.add_argument("--tokenizer", metavar="NAME_OR_PATH", help="a tokenizer other than the model's own")
    group.add_argument("--revision", help="hub branch, tag or commit of the model (default: main)")
    group.add_argument("--tokenizer-revision", metavar="REVISION", help="hub revision of --tokenizer")
    group.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let transformers run code from the model's repo to read its config and tokenizer (the model code "
        "itself is always Weir's)",
    )
    group.add_argument("--download-dir", metavar="DIR", help="Hugging Face cache directory for hub downloads")
    group.add_argument(
        "--load-format",
        default="auto",
        choices=("auto", "safetensors", "gguf", "dummy"),
        help="weights format of the generation model; dummy = random weights (default %(default)s)",
    )
    group.add_argument("--dtype", default="auto", choices=(*_DTYPE_NAMES, *DTYPE_ALIASES))
    group.add_argument(
        "--quantization",
        "-q",
        metavar="METHOD",
        help="gguf (GGUF weights kept quantized in memory, read by quantized matmuls); awq, gptq (4-bit "
        "checkpoints, also found from config.json's quantization_config); fp8 (an FP8 checkpoint, or a float one "
        "quantized per channel on load; FP8 matmuls on compute capability 8.9+, dequantized elsewhere); or none "
        "(default: as the checkpoint says; a GGUF file is dequantized to --dtype at load, the faster path on CPU "
        "today)",
    )
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default %(default)s)")
    group.add_argument("--max-model-len", type=int, help="cap on prompt + output tokens (default: the model's own)")
    group.add_argument(
        "--seed",
        type=int,
        help="seed the draws of requests that bring no seed of their own, and --load-format dummy weights "
        "(default: unseeded draws differ on every start)",
    )


def _add_server_options(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("server", "where to listen and whom to let in")
    group.add_argument("--host", default=_SERVER.host, help="address to listen on (default %(default)s)")
    group.add_argument("--port", type=int, default=_SERVER.port, help="port to listen on; 0 picks a free one")
    group.add_argument(
        "--drain-timeout",
        type=float,
        default=_SERVER.drain_timeout_s,
        help="seconds running calls may finish after SIGTERM (default %(default)s)",
    )
    group.add_argument(
        "--ssl-certfile", "--tls-cert", dest="tls_cert", metavar="PEM", help="serve TLS with this certificate (chain)"
    )
    group.add_argument("--ssl-keyfile", "--tls-key", dest="tls_key", metavar="PEM", help="the private key of it")
    group.add_argument(
        "--ssl-ca-certs",
        "--tls-client-ca",
        dest="tls_client_ca",
        metavar="PEM",
        help="mutual TLS: require client certificates signed by this CA",
    )
    group.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="require `authorization: Bearer KEY` metadata on InferenceService calls; repeat for several keys "
        "(health and reflection stay open)",
    )
    group.add_argument(
        "--api-key-file", metavar="PATH", help="read API keys from a file, one per line (keeps them out of `ps`)"
    )


def _add_cache_options(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("KV cache")
    group.add_argument("--block-size", type=int, default=_CACHE.block_size, help="tokens per KV block")
    group.add_argument(
        "--num-gpu-blocks-override",
        "--num-kv-blocks",
        dest="num_kv_blocks",
        type=int,
        metavar="N",
        help="KV blocks to allocate, on any device (default: sized from memory)",
    )
    group.add_argument(
        "--kv-cache-memory-gb",
        type=float,
        default=_CACHE.kv_cache_memory_gb,
        metavar="GIB",
        help="CPU: KV cache RAM (default: max-num-seqs sequences of 128 tokens and one of max-model-len, "
        "at most 1/8 of the RAM available at start)",
    )
    group.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=_CACHE.gpu_memory_utilization,
        help="GPU: fraction of memory Weir may use",
    )
    group.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=_CACHE.enable_prefix_caching,
        help="reuse the KV blocks of prompt prefixes seen before",
    )
    group.add_argument(
        "--no-prefix-caching",
        dest="enable_prefix_caching",
        action="store_false",
        default=argparse.SUPPRESS,
        help="the same as --no-enable-prefix-caching",
    )
    group.add_argument(
        "--kv-cache-dtype",
        default=_CACHE.cache_dtype,
        metavar="DTYPE",
        help="auto: the model's dtype; fp8 (or fp8_e4m3): float8 e4m3, scale 1.0, half a bf16 cache, on CUDA "
        "GPUs of compute capability 8.9+ (refused on CPU) (default %(default)s)",
    )


def _add_scheduler_options(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("scheduling and execution")
    group.add_argument("--max-num-seqs", type=int, default=_SCHEDULER.max_num_seqs, help="sequences per step")
    group.add_argument(
        "--max-num-batched-tokens", type=int, default=_SCHEDULER.max_num_batched_tokens, help="tokens per step"
    )
    group.add_argument(
        "--max-waiting", type=int, default=_SCHEDULER.max_waiting, help="queued requests before refusing"
    )
    group.add_argument("--enforce-eager", action="store_true", help="disable CUDA graphs")
    group.add_argument(
        "--no-run-ahead",
        dest="run_ahead",
        action="store_false",
        help="on CUDA, read each step's sampled tokens back before launching the next (default: run ahead)",
    )
    group.add_argument(
        "--engine-core",
        default="auto",
        choices=ENGINE_CORES,
        help="run the generation engine on a thread of the server or in its own process (auto: a process, "
        "except on CPU beside an embedding model, where it is a thread) (default %(default)s)",
    )
    group.add_argument(
        "--num-threads", type=int, metavar="N", help="torch threads for the model on CPU (default: every core)"
    )
    group.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=1,
        metavar="N",
        help="split the generation model over N GPUs of this host (one worker process per extra GPU; "
        "with --device cpu, N processes over gloo) (default %(default)s)",
    )
    group.add_argument(
        "--speculative-config",
        metavar="JSON",
        help='speculative decoding, with vLLM\'s keys: \'{"method": "ngram", "num_speculative_tokens": 4, '
        '"prompt_lookup_min": 2, "prompt_lookup_max": 5}\' or \'{"model": DRAFT, "num_speculative_tokens": 4}\' '
        "(a small draft model sharing the target's vocabulary) (default: off)",
    )


def _add_chat_options(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("chat", "conversations, tool calls and reasoning of the generation model")
    group.add_argument(
        "--chat-template",
        metavar="FILE_OR_STRING",
        help="a Jinja chat template (a file, or the template itself) used instead of the model's own",
    )
    group.add_argument(
        "--tool-call-parser",
        default=TOOL_CALL_PARSER_AUTO,
        metavar="NAME",
        help="the model's tool-call format: hermes, llama3_json, mistral, pythonic, json, or auto (the one its "
        "chat template uses; hermes where the template knows no tools) (default %(default)s)",
    )
    group.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help="accepted for vLLM command lines: Weir always parses tool calls when a request has tools",
    )
    group.add_argument(
        "--reasoning-parser",
        metavar="NAME",
        help="split reasoning from the answer: deepseek_r1 or qwen3 (<think>...</think>) (default: off)",
    )
    group.add_argument(
        "--parse-special-tokens",
        action="store_true",
        help="read special-token strings (<|im_start|>...) in a raw prompt and in Tokenize and Embed texts as the "
        "special tokens they spell, for clients that send prompts they rendered themselves (default: they are "
        "text; chat message content is always text)",
    )


def _add_lora_options(p: argparse.ArgumentParser) -> None:
    """LoRA adapters of the generation model (docs/lora.md); `cli._lora` checks them."""
    group = p.add_argument_group("LoRA adapters", "fine-tunes of the generation model, mixed in one batch")
    group.add_argument(
        "--enable-lora",
        action="store_true",
        help="serve LoRA adapters (PEFT format): loaded at start with --lora-modules or later with LoadAdapter / "
        "POST /v1/load_lora_adapter, used by naming them as the request's model",
    )
    group.add_argument(
        "--lora-modules",
        nargs="+",
        default=[],
        metavar="NAME=PATH",
        help='adapters to load at start: NAME=PATH, or JSON \'{"name": ..., "path": ..., '
        "\"base_model_name\": ...}' (vLLM's forms)",
    )
    group.add_argument(
        "--max-lora-rank",
        type=int,
        default=_LORA.max_lora_rank,
        metavar="N",
        help="the highest rank an adapter may have (default %(default)s)",
    )
    group.add_argument(
        "--max-loras",
        type=int,
        default=_LORA.max_loras,
        metavar="N",
        help="adapters on the device at once; a request for another waits for a slot (default %(default)s)",
    )
    group.add_argument(
        "--max-cpu-loras",
        type=int,
        metavar="N",
        help="adapters kept in host memory, swapped onto the device least-recently-used first; at least "
        "--max-loras (default: no limit)",
    )


def _add_observability_options(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("logs, metrics and traces")
    group.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    group.add_argument(
        "--log-format",
        default="text",
        choices=LOG_FORMATS,
        help="json: one object per line with request and trace ids (default %(default)s)",
    )
    group.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus /metrics over HTTP on this port of --host (0 picks a free one; default: off)",
    )
    group.add_argument(
        "--metrics-require-api-key",
        action="store_true",
        help="/metrics answers only requests with `Authorization: Bearer KEY` for an --api-key (default: open)",
    )
    group.add_argument(
        "--otlp-traces-endpoint",
        metavar="URL",
        help="export traces over OTLP/gRPC to this collector, e.g. http://otel-collector:4317 (default: "
        "$OTEL_EXPORTER_OTLP_ENDPOINT, else no tracing)",
    )


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
        "--max-logprobs",
        type=int,
        default=_LIMITS.max_logprobs,
        metavar="N",
        help=f"alternatives per token a request may ask for in logprobs or prompt_logprobs (at most {MAX_LOGPROBS}) "
        "(default %(default)s)",
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

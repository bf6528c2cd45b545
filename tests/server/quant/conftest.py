"""The quantized-model tests reuse the model tests' helpers (tests/server/models: paged_runner), importable here even
when no test of that folder runs in the same session."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))

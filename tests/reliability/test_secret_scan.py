"""The end-of-session search for keys in logs (secret_scan.py) finds a key, and a key cut short, by log and line,
records the keys a command line hands a process, and never quotes a key in what it reports."""

from __future__ import annotations

from pathlib import Path

from secret_scan import PREFIX_CHARS, SecretScan

KEY = "a1b2c3d4e5f6-sk-unit-9f8e7d6c5b4a"
FILE_KEY = "0f1e2d3c4b5a-sk-file-6a7b8c9d0e1f"
ENV_KEY = "99aa88bb77cc-sk-env-66dd55ee44ff"


def test_a_command_line_hands_over_flag_file_and_environment_keys(tmp_path: Path) -> None:
    key_file = tmp_path / "keys.txt"
    key_file.write_text(f"# a comment, not a key\n\n{FILE_KEY}\n")
    scan = SecretScan()
    argv = ["weir", "serve", "--api-key", KEY, "--api-key-file", str(key_file), "--backend-api-key=" + KEY + "-2"]
    scan.record_command(argv, {"WEIR_BACKEND_API_KEY": ENV_KEY, "PATH": "/bin"})
    assert scan.secrets == {KEY, KEY + "-2", FILE_KEY, ENV_KEY}


def test_a_key_or_its_first_characters_in_a_log_is_reported_by_line_without_the_key(tmp_path: Path) -> None:
    scan = SecretScan()
    scan.secret(KEY)
    scan.secret(FILE_KEY)
    scan.secret("short")  # too short to search for: a word a log may hold anyway
    clean = scan.log(tmp_path / "clean.log")
    clean.write_text("INFO refused /weir.v1.InferenceService/Generate: invalid API key\nshort\n")
    leaky = scan.log(tmp_path / "leaky.log")
    cut_short = FILE_KEY[:PREFIX_CHARS].encode() + b"..."
    leaky.write_bytes(b"line one\n\xff not utf-8\nError: Bearer " + KEY.encode() + b"\n" + cut_short)
    leaks = scan.leaks()
    assert sorted(leak.split(": ", 1)[0] for leak in leaks) == [f"{leaky}:3", f"{leaky}:3", f"{leaky}:4"]
    assert not any(KEY in leak or KEY[:PREFIX_CHARS] in leak or FILE_KEY[:PREFIX_CHARS] in leak for leak in leaks)
    assert scan.leaks([clean]) == []

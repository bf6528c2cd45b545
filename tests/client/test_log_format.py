"""The shared log set-up's redaction: API keys and bearer tokens never reach a log line, a traceback or an extra
field, in text or JSON, whole or cut short."""

from __future__ import annotations

import json
import logging
import sys

from weir_client.log_format import TEXT_FORMAT, JsonFormatter, RedactSecrets, RequestIdFilter

KEY = "sk-log-format-7c1d0e5a9b3f4d2e8a6c"


def _record(msg: str, *args: object, **fields: object) -> logging.LogRecord:
    record = logging.makeLogRecord({"msg": msg, "args": args or None, **fields})
    RequestIdFilter().filter(record)
    RedactSecrets([KEY]).filter(record)
    return record


def test_a_configured_key_is_masked_in_the_message_and_its_arguments() -> None:
    assert _record("key %s in %s", KEY, "args").getMessage() == "key *** in args"
    assert _record(f"key {KEY} inline").getMessage() == "key *** inline"


def test_a_bearer_token_is_masked_whatever_the_key() -> None:
    assert _record("authorization: Bearer some-other-token").getMessage() == "authorization: Bearer ***"
    assert _record("b'bearer abc.def'").getMessage() == "b'bearer ***'"


def test_the_start_of_a_key_cut_short_is_masked_but_short_text_is_kept() -> None:
    assert _record(f"line {KEY[:20]}...").getMessage() == "line ***..."
    assert _record(f"prefix {KEY[:7]} stays").getMessage() == f"prefix {KEY[:7]} stays"


def test_tracebacks_and_extra_fields_are_masked_in_text_and_json() -> None:
    try:
        raise ValueError(f"bad key {KEY}")
    except ValueError:
        record = _record("failed", exc_info=sys.exc_info(), request_id=KEY, path=f"/x?key={KEY}")
    text = logging.Formatter(TEXT_FORMAT).format(record)
    entry = json.loads(JsonFormatter().format(record))
    assert KEY not in text and KEY not in json.dumps(entry)
    assert "ValueError: bad key ***" in text and "ValueError: bad key ***" in entry["exception"]
    assert entry["request_id"] == "***" and entry["path"] == "/x?key=***"


def test_a_record_with_nothing_secret_is_unchanged() -> None:
    record = _record("served %d requests in %.1fs", 3, 0.5)
    assert record.getMessage() == "served 3 requests in 0.5s"

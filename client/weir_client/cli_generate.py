"""`weir generate`: its options (sampling, tools, an output constraint) and its output: the text on stdout,
reasoning on stderr, then the tool calls as JSON lines."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import TextIO

from weir_client.client import WeirClient
from weir_client.types import CompletionBuilder

# Options passed on as generate() keywords of the same name when given.
_KEYWORDS = ("temperature", "top_p", "top_k", "seed", "tools", "tool_choice", "chat_template_kwargs")
_CONSTRAINT_KEYWORDS = ("json_schema", "regex", "choice", "grammar")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `weir generate` (the connection options are added by the caller)."""
    p.epilog = (
        "The text streams to stdout; reasoning (when the server parses it out) to stderr after `reasoning:`; "
        "tool calls follow the text on stdout, one JSON object per line in OpenAI's tool_calls shape."
    )
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    p.add_argument("--system", help="with --chat, a system message first")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="a stop string (repeatable)")
    p.add_argument(
        "--logit-bias",
        action="append",
        type=_logit_bias_item,
        metavar="ID=BIAS",
        help="add BIAS (-100..100; -100 bans) to token ID's logit (repeatable)",
    )
    tools = p.add_argument_group("tools (with --chat); calls are printed after the text as JSON lines")
    tools.add_argument(
        "--tools",
        type=_json_argument(list),
        metavar="FILE_OR_JSON",
        help='a JSON list of tools: [{"type": "function", "function": {"name", "description", "parameters"}}]',
    )
    tools.add_argument("--tool-choice", metavar="CHOICE", help="auto, none, required, or the name of one function")
    tools.add_argument(
        "--chat-template-kwargs",
        type=_json_argument(dict),
        metavar="FILE_OR_JSON",
        help="extra chat template variables, a JSON object (e.g. '{\"enable_thinking\": false}')",
    )
    constraint = p.add_argument_group("output constraint (at most one)").add_mutually_exclusive_group()
    constraint.add_argument(
        "--json-schema", type=_json_argument(dict), metavar="FILE_OR_JSON", help="the output validates against it"
    )
    constraint.add_argument("--json-object", action="store_true", help="the output is a JSON object")
    constraint.add_argument("--regex", help="the whole output matches this regular expression")
    constraint.add_argument(
        "--choice", action="append", metavar="TEXT", help="the output is one of these (repeat: --choice a --choice b)"
    )
    constraint.add_argument(
        "--grammar", type=_file_or_text, metavar="FILE_OR_TEXT", help="an EBNF / GBNF grammar the output follows"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="print the finish reason and token counts")


def keywords(args: argparse.Namespace) -> dict[str, object]:
    """generate()'s keywords from the parsed options, input included (options not given are left to the server)."""
    if not args.chat and (args.tools or args.tool_choice or args.chat_template_kwargs is not None):
        raise ValueError("--tools, --tool-choice and --chat-template-kwargs need --chat")
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": args.prompt})
        result: dict[str, object] = {"messages": messages}
    else:
        result = {"prompt": args.prompt}
    result.update(model=args.model, max_tokens=args.max_tokens)
    for name in (*_KEYWORDS, *_CONSTRAINT_KEYWORDS):
        if getattr(args, name) is not None:
            result[name] = getattr(args, name)
    if args.stop:
        result["stop"] = args.stop
    if args.json_object:
        result["json_object"] = True
    if args.logit_bias:
        result["logit_bias"] = dict(args.logit_bias)
    return result


def run(client: WeirClient, args: argparse.Namespace) -> int:
    """Stream the completion; print the text, the reasoning (stderr), the tool calls and, with -v, the counts."""
    request = keywords(args)
    reasoning = _ReasoningPrinter(sys.stderr)
    builder = CompletionBuilder()
    # The keywords are checked when the request is built, as for any caller of generate().
    for chunk in client.generate(**request):  # type: ignore[arg-type]
        reasoning.write(chunk.reasoning_text)
        if chunk.text:
            reasoning.end()
        print(chunk.text, end="", flush=True)
        builder.add(chunk)
    reasoning.end()
    print()
    completion = builder.build()
    for call in completion.tool_calls:
        print(json.dumps(call.to_dict(), ensure_ascii=False))
    choice = completion.choices[0] if completion.choices else None
    if args.verbose and choice is not None and choice.usage is not None:
        u = choice.usage
        print(
            f"[{choice.finish_reason}; prompt {u.prompt_tokens}, completion {u.completion_tokens}, "
            f"cached {u.cached_tokens} tokens]",
            file=sys.stderr,
        )
    return 0


class _ReasoningPrinter:
    """Streams reasoning to stderr apart from the answer: after a `reasoning:` label, dimmed on a terminal."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.dim = stream.isatty()
        self.open = False

    def write(self, text: str) -> None:
        if not text:
            return
        if not self.open:
            self.stream.write("reasoning: ")
            self.open = True
        self.stream.write(f"\x1b[2m{text}\x1b[0m" if self.dim else text)
        self.stream.flush()

    def end(self) -> None:
        if self.open:
            self.stream.write("\n")
            self.stream.flush()
            self.open = False


def _file_or_text(value: str) -> str:
    """The contents of the file `value` names, or `value` itself when no such file exists."""
    if not os.path.isfile(value):
        return value
    try:
        with open(value, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot read {value}: {e}") from e


def _json_argument(kind: type) -> Callable[[str], object]:
    """An argparse type: JSON of `kind` (dict or list), inline or in a file."""

    def parse(value: str) -> object:
        try:
            parsed = json.loads(_file_or_text(value))
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"neither a readable file nor JSON text ({e}): {value!r}") from e
        if not isinstance(parsed, kind):
            raise argparse.ArgumentTypeError(f"must be a JSON {'object' if kind is dict else 'list'}: {value!r}")
        return parsed

    return parse


def _logit_bias_item(value: str) -> tuple[int, float]:
    """ID=BIAS as (token id, bias)."""
    token_id, sep, bias = value.partition("=")
    try:
        if not sep:
            raise ValueError
        return int(token_id), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TOKEN_ID=BIAS (e.g. 50256=-100), got {value!r}") from None

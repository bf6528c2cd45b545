"""`weir chat`: a conversation with a served model in the terminal. Each reply streams as it is made and the whole
conversation is sent with every turn; with stdin piped it answers each line and exits at the end of the input.

A reply stopped with Ctrl-C (or failed by the server) drops its turn, question included, so the history the
model sees stays question-answer pairs and never holds half an answer."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

from weir_client.cli_generate import _ReasoningPrinter
from weir_client.client import WeirClient
from weir_client.errors import WeirClientError
from weir_client.types import SamplingOptions, Usage

PROMPT = ">>> "
DEFAULT_MAX_TOKENS = 512  # per reply; the server clamps it to the room the context has left
HELP = """\
Commands:
  /reset          forget the conversation (the system prompt stays)
  /system TEXT    set the system prompt and start over; /system alone shows it
  /help           this list
  /exit, /quit    leave (so do Ctrl-D, and Ctrl-C at the prompt)
Ctrl-C while a reply streams stops it; that turn is dropped from the conversation."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `weir chat` (the connection options are added by the caller)."""
    p.epilog = (
        "Replies stream to stdout, notes and errors go to stderr. With stdin piped, each line is one turn, only the "
        "replies are printed, and the exit code is 1 if any turn failed."
    )
    p.add_argument("--system", help="a system prompt (change it in the chat with /system TEXT)")
    p.add_argument(
        "--max-tokens", type=_at_least(int, 1), default=DEFAULT_MAX_TOKENS, help="per reply (default %(default)s)"
    )
    p.add_argument("--temperature", type=_at_least(float, 0), help="0 for greedy decoding (default: the server's)")
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument(
        "-v", "--verbose", action="store_true", help="print the finish reason and token counts of each reply"
    )


@dataclass
class Conversation:
    """The system prompt (when set) and the finished question-answer turns, in the order the model sees them."""

    system: str | None = None
    turns: list[dict[str, str]] = field(default_factory=list)

    def messages(self, question: str) -> list[dict[str, str]]:
        """What to send to answer `question`: the system prompt, the history, then the question."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *self.turns, {"role": "user", "content": question}]

    def add(self, question: str, answer: str) -> None:
        self.turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]

    def reset(self) -> None:
        self.turns.clear()


@dataclass(frozen=True)
class Reply:
    """How one reply ended: its text (None when cancelled or failed), finish reason and usage."""

    text: str | None
    finish_reason: str | None = None
    usage: Usage | None = None


def run(client: WeirClient, args: argparse.Namespace) -> int:
    """Check the server and model, then read turns until EOF, /exit or Ctrl-C at the prompt."""
    model = _check_model(client, args.model)
    if model is None:
        return 1
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (imported for its side effect: line editing and history in input())
        except ImportError:
            pass
        print(f"Chatting with {model} at {client.target}. /help lists the commands, Ctrl-D leaves.")
    session = _Session(client, model, _sampling(args), Conversation(args.system), args.verbose, interactive)
    return session.loop()


class _Session:
    """The read-answer loop over one conversation."""

    def __init__(
        self,
        client: WeirClient,
        model: str,
        sampling: SamplingOptions,
        conversation: Conversation,
        verbose: bool,
        interactive: bool,
    ) -> None:
        self.client = client
        self.model = model
        self.sampling = sampling
        self.conversation = conversation
        self.verbose = verbose
        self.interactive = interactive
        self.failed = False

    def loop(self) -> int:
        while True:
            try:
                line = input(PROMPT if self.interactive else "").strip()
            except EOFError:
                if self.interactive:
                    print()
                return self.exit_code()
            except KeyboardInterrupt:
                print()
                return 130
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return self.exit_code()
                continue
            reply = self.answer(line)
            if reply.text is None:
                self.failed = True
            else:
                self.conversation.add(line, reply.text)

    def exit_code(self) -> int:
        """0, or 1 when a turn failed and nobody was there to see it (stdin piped, as in a script)."""
        return 1 if self.failed and not self.interactive else 0

    def command(self, line: str) -> bool:
        """Run a /command; False when it ends the chat."""
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name == "/help":
            print(HELP)
        elif name == "/reset":
            self.conversation.reset()
            _note("conversation cleared")
        elif name == "/system" and rest:
            self.conversation.system = rest
            self.conversation.reset()
            _note("system prompt set; conversation cleared")
        elif name == "/system":
            _note(f"system prompt: {self.conversation.system!r}" if self.conversation.system else "no system prompt")
        else:
            _note(f"unknown command {name}; /help lists them")
        return True

    def answer(self, question: str) -> Reply:
        """Stream the reply to `question` to stdout; its text is None when Ctrl-C stopped it or the server failed."""
        reasoning = _ReasoningPrinter(sys.stderr)
        parts: list[str] = []
        last = None
        stream = None
        try:
            stream = self.client.generate(
                messages=self.conversation.messages(question), model=self.model, **self.sampling
            )
            for chunk in stream:
                reasoning.write(chunk.reasoning_text)
                if chunk.text:
                    reasoning.end()
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                    parts.append(chunk.text)
                if chunk.finished:
                    last = chunk
        except KeyboardInterrupt:
            reasoning.end()
            print()
            _note("reply stopped; this turn is dropped")
            return Reply(None)
        except WeirClientError as e:
            reasoning.end()
            if parts:
                print()
            print(f"error: {e}", file=sys.stderr)
            return Reply(None)
        finally:
            if isinstance(stream, Generator):
                stream.close()  # cancels the call on the server when the loop was left early
        print()
        reply = Reply("".join(parts), last.finish_reason if last else None, last.usage if last else None)
        self.report(reply)
        return reply

    def report(self, reply: Reply) -> None:
        if reply.finish_reason == "length" and self.interactive:
            _note("the reply was cut at --max-tokens (or the end of the context)")
        if self.verbose and reply.usage is not None:
            u = reply.usage
            print(
                f"[{reply.finish_reason}; prompt {u.prompt_tokens}, completion {u.completion_tokens}, "
                f"cached {u.cached_tokens} tokens]",
                file=sys.stderr,
            )


def _check_model(client: WeirClient, wanted: str) -> str | None:
    """The id of the generation model to talk to (the server's default when `wanted` is empty), or None after
    saying in one line why there is none: the server cannot be reached, or does not serve that model."""
    try:
        models = [m for m in client.list_models() if m.task == "generate"]
    except WeirClientError as e:
        reach = "cannot reach" if e.code.name in ("UNAVAILABLE", "DEADLINE_EXCEEDED") else "cannot list models of"
        print(f"error: {reach} {client.target}: {e}", file=sys.stderr)
        return None
    ids = [m.id for m in models]
    if wanted and wanted not in ids:
        print(
            f"error: {client.target} serves no generation model {wanted!r} (it serves: {', '.join(ids) or 'none'})",
            file=sys.stderr,
        )
        return None
    if wanted:
        return wanted
    default = next((m.id for m in models if m.is_default), ids[0] if ids else None)
    if default is None:
        print(f"error: {client.target} serves no generation model", file=sys.stderr)
    return default


def _sampling(args: argparse.Namespace) -> SamplingOptions:
    options = SamplingOptions(max_tokens=args.max_tokens)
    if args.temperature is not None:
        options["temperature"] = args.temperature
    if args.top_p is not None:
        options["top_p"] = args.top_p
    if args.seed is not None:
        options["seed"] = args.seed
    return options


def _at_least(kind: Callable[[str], float], low: float) -> Callable[[str], float]:
    """An argparse type: a number of `kind` no smaller than `low` (so a bad option fails before connecting)."""

    def parse(value: str) -> float:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
        if number < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return number

    return parse


def _note(text: str) -> None:
    """A message from the chat itself (not the model): on stderr, so piped replies stay clean."""
    print(f"[{text}]", file=sys.stderr)

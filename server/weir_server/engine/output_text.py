"""Text for outputs that arrive as token ids only: an engine-core process leaves detokenization to the server.

Making text costs a few microseconds per token, per sequence, per step: in the core that is time the GPU waits
for (about 2.5 ms of a 512-sequence step). The server process makes it instead, in parallel with the core's next
steps. Choices with stop strings are the exception: they must end the moment one appears, so the core
detokenizes those itself (`LLMEngine.detokenize_all = False`) and their outputs arrive with text.
"""

from __future__ import annotations

from typing import Any

from weir_server.engine.detokenizer import IncrementalDetokenizer
from weir_server.engine.types import FinishReason, GenerationOutput, GenerationRequest


def core_makes_text(request: GenerationRequest) -> bool:
    """Whether an engine core that does not detokenize everything still makes this request's text."""
    return bool(request.params.stop)


class OutputText:
    """One incremental detokenizer per choice of each open request whose text the core does not make.

    All on the event loop: `add_request` before the request goes to the core, `fill` as its consumer reads each
    output (so the deltas merged while a consumer was behind are decoded in one go), `forget` when it ends.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._choices: dict[str, list[IncrementalDetokenizer]] = {}

    def add_request(self, request: GenerationRequest) -> None:
        if self.tokenizer is None or core_makes_text(request):
            return
        params, prompt = request.params, request.prompt_token_ids
        self._choices[request.request_id] = [
            IncrementalDetokenizer(self.tokenizer, prompt, params) for _ in range(params.n)
        ]

    def forget(self, request_id: str) -> None:
        self._choices.pop(request_id, None)

    def fill(self, output: GenerationOutput) -> None:
        """Set the text of an output (in place) if its choice is detokenized here; each output once, in order."""
        detokenizers = self._choices.get(output.request_id)
        if detokenizers is None:
            return
        detokenizer = detokenizers[output.index]
        token_ids = output.token_ids
        # A stop token ends the answer without being part of it, as in the core.
        if output.finish_reason is FinishReason.STOP and not detokenizer.include_stop:
            token_ids = token_ids[:-1]
        output.text, _ = detokenizer.add(token_ids, output.finished, check_stop=False)

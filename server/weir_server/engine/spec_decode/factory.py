"""The engine's SpecDecoder for its config: the proposer it names, or none where speculation does not apply."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from weir_server.config import EngineConfig
from weir_server.engine.spec_decode.decoder import NgramBatchProposer, Proposer, SpecDecoder

if TYPE_CHECKING:
    from weir_server.models.loader import LoadedModel

logger = logging.getLogger(__name__)


def create_spec_decoder(config: EngineConfig, loaded: LoadedModel, num_blocks: int) -> SpecDecoder | None:
    """None without `config.speculative`. A draft model is loaded here (whole, on rank 0 under tensor parallelism),
    its KV cache sized to the target's `num_blocks`; DraftVocabularyError when it does not share the target's
    vocabulary."""
    spec = config.speculative
    if spec is None:
        return None
    proposer: Proposer
    if spec.use_ngram:
        proposer = NgramBatchProposer(spec)
    else:
        from weir_server.engine.spec_decode.draft_model import DraftModelProposer, check_same_vocabulary, load_draft

        draft = load_draft(spec, config)
        check_same_vocabulary(draft, loaded)
        proposer = DraftModelProposer(config, draft, num_blocks)
    logger.info("speculative decoding: %s, up to %d tokens per step", spec.method, spec.num_speculative_tokens)
    return SpecDecoder(spec, proposer)

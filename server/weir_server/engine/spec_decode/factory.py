"""The engine's SpecDecoder for its config: the proposer it names, or none without speculation."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from weir_server.config import EngineConfig
from weir_server.engine.spec_decode.decoder import NgramBatchProposer, Proposer, SpecDecoder

if TYPE_CHECKING:
    from weir_server.models.loader import LoadedModel

logger = logging.getLogger(__name__)


def load_spec_draft(config: EngineConfig, target: LoadedModel) -> LoadedModel | None:
    """The draft model `config.speculative` names (whole, on rank 0 under tensor parallelism), None for other methods;
    loaded before the target's KV cache is sized, so that the cache leaves room for the draft's weights and its own
    cache. DraftVocabularyError when it does not share the target's vocabulary."""
    spec = config.speculative
    if spec is None or spec.use_ngram:
        return None
    from weir_server.engine.spec_decode.draft_model import check_same_vocabulary, load_draft

    draft = load_draft(spec, config)
    check_same_vocabulary(draft, target)
    return draft


def create_spec_decoder(config: EngineConfig, draft: LoadedModel | None, num_blocks: int) -> SpecDecoder | None:
    """None without `config.speculative`; a draft model's KV cache is sized to the target's `num_blocks`."""
    spec = config.speculative
    if spec is None:
        return None
    proposer: Proposer
    if spec.use_ngram:
        proposer = NgramBatchProposer(spec)
    else:
        from weir_server.engine.spec_decode.draft_model import DraftModelProposer

        assert draft is not None, "load_spec_draft loads the draft model first"
        proposer = DraftModelProposer(config, draft, num_blocks)
    logger.info("speculative decoding: %s, up to %d tokens per step", spec.method, spec.num_speculative_tokens)
    return SpecDecoder(spec, proposer)

"""A watch's question against Ask's limit: a watch answers its question as Ask does, so a question past
``max_question_tokens`` would be refused in every event. The router counts the tokens itself, with the engine's
tokenizer and chat template, so the check needs no worker."""

from __future__ import annotations

import logging

from mosaic_core.engine.questions import check_question_length
from mosaic_core.errors import InvalidArgumentError
from mosaic_core.model.tokenizer import load_qwen_tokenizer, question_token_ids
from services.watches_spec import WatchRecord

log = logging.getLogger(__name__)


class WatchQuestionLimit:
    """Ask's question limit, applied to watches.

    Args:
        max_question_tokens: the workers' engines' limit (``EngineConfig.max_question_tokens``).
    """

    def __init__(self, max_question_tokens: int) -> None:
        self.max_question_tokens = max_question_tokens

    def check(self, question: str) -> None:
        """Raises ``InvalidArgumentError`` for a question past the limit, as Ask does."""
        check_question_length(len(question_token_ids(question)), self.max_question_tokens)

    def load_and_name(self, records: list[WatchRecord]) -> None:
        """Loads the tokenizer, so the first CreateWatch does not wait for it, and names the stored watches whose
        question is past the limit (``name_past_the_limit``)."""
        load_qwen_tokenizer()
        self.name_past_the_limit(records)

    def name_past_the_limit(self, records: list[WatchRecord]) -> None:
        """Logs the watches whose question is past the limit (created before CreateWatch checked it, here or through
        another router). They stay as they are: each is still scored and fires, and its events carry the engine's
        refusal as their ``answer_error``."""
        for record in records:
            try:
                self.check(record.question)
            except InvalidArgumentError as err:
                log.warning("watch %r cannot be answered (%s); it was created before CreateWatch checked that, and "
                            "its events say so in answer_error. Delete it and create it with a shorter question",
                            record.watch_id, err)  # fmt: skip

"""The one check that a segment window fits the retriever's encoder (`data.window` against its token limit).

Three places know a part of the answer, and each calls `check_window_fits_encoder` with what it knows:
the config loader only the configured numbers (`retriever.max_seq_length`), `data_prep.build` also the
passage prefix in tokens and the encoder's positions from its config.json, `retriever.index` the loaded
encoder's real limit and the window a store was built with. One function keeps the rule and its message
the same everywhere.
"""

from __future__ import annotations

from common.errors import UserError

ENCODER_SPECIAL_TOKENS = 2  # [CLS] and [SEP] around every segment the encoder reads
CONFIGURED_LIMIT = "retriever.max_seq_length"


def check_window_fits_encoder(window: int, max_seq_length: int, prefix_tokens: int = 0, *,
                              limit_from: str = CONFIGURED_LIMIT, window_from: str = "data.window",
                              fix: str = "", error: type[UserError] = UserError) -> None:
    """Refuse a window the retriever's encoder cannot read whole: it would cut every long segment silently.

    `max_seq_length` is what the encoder reads (`limit_from` names where that number comes from);
    `prefix_tokens` counts `retriever.passage_prefix`, which the encoder reads before the segment; `fix` is
    appended to the advice; `error` is the exception raised (the config loader's is `ConfigError`).
    """
    need = window + ENCODER_SPECIAL_TOKENS + prefix_tokens
    if need <= max_seq_length:
        return
    prefix = f" + {prefix_tokens} of retriever.passage_prefix" if prefix_tokens else ""
    fits = max_seq_length - ENCODER_SPECIAL_TOKENS - prefix_tokens
    raise error(
        f"{window_from} ({window}) + {ENCODER_SPECIAL_TOKENS} special tokens{prefix} = {need} tokens, but the "
        f"retriever reads at most {max_seq_length} ({limit_from}): the text past token {max_seq_length} of a "
        f"segment would never be embedded; lower data.window to at most {max(fits, 0)}{fix}"
        + (f" or raise {CONFIGURED_LIMIT} (up to the encoder's positions, 512 for embedded:minilm-l6)"
           if limit_from == CONFIGURED_LIMIT else "")
    )

"""Captions -> CLIP BPE token ids, as IRRA tokenises them.

``<|startoftext|>`` + BPE tokens + ``<|endoftext|>``, padded with 0 to ``context_length``.
A caption that does not fit is cut to ``context_length`` tokens and its last token is
replaced by ``<|endoftext|>``, so every row still ends its text with end-of-text (CLIP
pools the text feature at the argmax token, which is end-of-text: id 49407 is the
largest id in the vocabulary).

The BPE vocabulary is the one bundled inside open_clip (``bpe_simple_vocab_16e6.txt.gz``),
so nothing is downloaded.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from open_clip.tokenizer import SimpleTokenizer

__all__ = ["tokenize", "check_context_length", "get_tokenizer", "SOT_TOKEN_ID", "EOT_TOKEN_ID"]

SOT_TOKEN_ID = 49406  # <|startoftext|> in CLIP's vocabulary
EOT_TOKEN_ID = 49407  # <|endoftext|>


@lru_cache(maxsize=1)
def get_tokenizer():  # -> open_clip.tokenizer.SimpleTokenizer
    """open_clip's SimpleTokenizer over its bundled vocabulary (built once per process)."""
    tok = SimpleTokenizer()
    if (tok.sot_token_id, tok.eot_token_id) != (SOT_TOKEN_ID, EOT_TOKEN_ID):  # a different vocabulary
        raise RuntimeError(
            f"open_clip's bundled tokenizer has start/end ids {tok.sot_token_id}/{tok.eot_token_id}, "
            f"expected CLIP's {SOT_TOKEN_ID}/{EOT_TOKEN_ID}"
        )
    return tok


def check_context_length(context_length: int) -> int:
    """``context_length`` if a caption fits in it: at least the start and end tokens (2)."""
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2 (start and end tokens), got {context_length}")
    return context_length


def tokenize(texts: str | list[str], context_length: int = 77) -> torch.LongTensor:
    """Token ids of shape ``(len(texts), context_length)`` (a single string gives one row)."""
    check_context_length(context_length)
    if isinstance(texts, str):
        texts = [texts]
    tok = get_tokenizer()
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [SOT_TOKEN_ID, *tok.encode(text), EOT_TOKEN_ID]
        if len(ids) > context_length:
            ids = ids[:context_length]
            ids[-1] = EOT_TOKEN_ID
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out

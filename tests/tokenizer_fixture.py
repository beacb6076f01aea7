"""A small but real CLIP byte-level BPE tokenizer, written to disk, for tests that cannot reach the hub.

The files are written by `sdjax.tokenizer.write_clip_tokenizer` (openai/clip-vit-large-patch14's layout).
Merges are added so that every word of `COMMON_WORDS` is one token; any other text still tokenizes, character
by character.
"""
from __future__ import annotations

from transformers import CLIPTokenizer

from sdjax.tokenizer import END_OF_WORD, write_clip_tokenizer

MODEL_MAX_LENGTH = 77

COMMON_WORDS = (
    "a", "an", "the", "of", "on", "in", "with", "and", "photo", "painting", "portrait", "astronaut", "riding",
    "horse", "cat", "dog", "red", "blue", "green", "moon", "city", "forest", "castle", "mountain", "beautiful",
    "detailed", "blurry", "ugly", "landscape", "oil",
)


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: repeatedly join the adjacent pair with the lowest merge rank."""
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return symbols


def build_merges(words=COMMON_WORDS) -> list[tuple[str, str]]:
    """Merges under which each word is a single token.

    Each word is first encoded with the merges made so far, then its remaining pieces are joined left to
    right by new merges. New merges rank after all older ones and earlier words are already single tokens,
    so adding them never changes how an earlier word encodes.
    """
    merges: list[tuple[str, str]] = []
    for word in words:
        ranks = {pair: rank for rank, pair in enumerate(merges)}
        pieces = _apply_merges([*word[:-1], word[-1] + END_OF_WORD], ranks)
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
    return merges


def make_clip_tokenizer(folder) -> CLIPTokenizer:
    """Write the tokenizer into `folder` (diffusers' tokenizer/ layout) and load it back from there."""
    return write_clip_tokenizer(folder, build_merges(), model_max_length=MODEL_MAX_LENGTH)

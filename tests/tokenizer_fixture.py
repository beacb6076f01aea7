"""A small but real CLIP byte-level BPE tokenizer, written to disk, for tests that cannot reach the hub.

The layout follows openai/clip-vit-large-patch14's vocab.json: the 256 byte-level characters, then each
of them with the end-of-word marker "</w>", then one token per merge in merge order, then
"<|startoftext|>" and "<|endoftext|>" as the two highest ids (so eos is the argmax of a row of ids, which
CLIP's legacy pooling relies on). Merges are added so that every word of `COMMON_WORDS` is one token;
any other text still tokenizes, character by character.
"""
from __future__ import annotations

import json
import os

from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77

COMMON_WORDS = (
    "a", "an", "the", "of", "on", "in", "with", "and", "photo", "painting", "portrait", "astronaut", "riding",
    "horse", "cat", "dog", "red", "blue", "green", "moon", "city", "forest", "castle", "mountain", "beautiful",
    "detailed", "blurry", "ugly", "landscape", "oil",
)


def byte_alphabet() -> list[str]:
    """CLIP/GPT-2's printable stand-in for each of the 256 bytes, in vocab order."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes, shifted = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + shifted)
            shifted += 1
    return [chr(code) for code in codes]


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


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    alphabet = byte_alphabet()
    tokens = alphabet + [c + END_OF_WORD for c in alphabet] + [a + b for a, b in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}


def make_clip_tokenizer(folder) -> CLIPTokenizer:
    """Write the tokenizer into `folder` (diffusers' tokenizer/ layout) and load it back from there."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    merges = build_merges()
    vocab = build_vocab(merges)
    # SD pads with the end-of-text token, like openai's CLIP.
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
                              unk_token=EOS_TOKEN, pad_token=EOS_TOKEN, model_max_length=MODEL_MAX_LENGTH)
    tokenizer.save_pretrained(folder)  # tokenizer.json, tokenizer_config.json
    # transformers 5 saves neither the slow-tokenizer files nor the special tokens map; SD folders carry them.
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "unk_token": EOS_TOKEN},
                  f, indent=2)
    return CLIPTokenizer.from_pretrained(folder)

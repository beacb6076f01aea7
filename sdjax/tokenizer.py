"""A CLIP-format byte-level BPE tokenizer learned from a caption corpus, for models trained from scratch.

The files are those of openai/clip-vit-large-patch14's tokenizer, so `transformers.CLIPTokenizer` (and
diffusers) load them as they load SD's: vocab.json holds the 256 byte-level characters, then each of them with
the end-of-word marker "</w>", then one token per merge in merge order, then "<|startoftext|>" and
"<|endoftext|>" as the two highest ids (CLIP's legacy pooling takes the argmax of a row of ids as the end of
text). Text outside the corpus still tokenizes, in smaller pieces.
"""
from __future__ import annotations

import collections
import json
import os
import re
import sys
from collections.abc import Iterable

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

# CLIP's pre-tokenizer, restricted to ASCII letters, digits and punctuation (what captions here contain).
_WORD = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")


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


def word_counts(corpus: Iterable[str]) -> collections.Counter:
    """How often each pre-tokenized word occurs, after CLIP's lower-casing and whitespace clean-up."""
    counts = collections.Counter()
    for text in corpus:
        counts.update(_WORD.findall(" ".join(text.lower().split())))
    return counts


def learn_bpe(corpus: Iterable[str], *, max_merges: int = 10_000, min_count: int = 2) -> list[tuple[str, str]]:
    """Merges learned by byte-pair encoding (Sennrich et al. 2016) over the corpus's words: repeatedly join the
    most frequent adjacent pair of symbols (ties broken by the pair itself, so the result is deterministic)
    until no pair occurs `min_count` times or `max_merges` are made."""
    words = {tuple([*word[:-1], word[-1] + END_OF_WORD]): count for word, count in word_counts(corpus).items()}
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs = collections.Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        if pairs[best] < min_count:
            break
        merges.append(best)
        words = {_merge(symbols, best): count for symbols, count in words.items()}
    return merges


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    alphabet = byte_alphabet()
    tokens = alphabet + [c + END_OF_WORD for c in alphabet] + [a + b for a, b in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}


def clip_tokenizer_class():
    """transformers.CLIPTokenizer. sdjax uses transformers for its tokenizers only, so the import silences the
    advice transformers prints on a machine without torch ("PyTorch was not found. Models won't be available"),
    which is the normal way to run sdjax and would only puzzle its users."""
    if "transformers" not in sys.modules and "TRANSFORMERS_VERBOSITY" not in os.environ:
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"  # read once, when transformers sets up its logger
        try:
            import transformers
        finally:
            del os.environ["TRANSFORMERS_VERBOSITY"]
        transformers.logging.set_verbosity_warning()  # its default from then on
    from transformers import CLIPTokenizer
    return CLIPTokenizer


def write_clip_tokenizer(folder: str | os.PathLike, merges: list[tuple[str, str]], *, model_max_length: int = 77):
    """Write a CLIP tokenizer with these merges into `folder` (diffusers' tokenizer/ layout) and load it back."""
    CLIPTokenizer = clip_tokenizer_class()

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    vocab = clip_vocab(merges)
    # SD pads with the end-of-text token, like openai's CLIP.
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
                              unk_token=EOS_TOKEN, pad_token=EOS_TOKEN, model_max_length=model_max_length)
    save_tokenizer(tokenizer, folder)
    return CLIPTokenizer.from_pretrained(folder)


def save_tokenizer(tokenizer, folder: str | os.PathLike) -> None:
    """`tokenizer.save_pretrained(folder)` plus the files SD folders carry that transformers 5 no longer writes:
    vocab.json and merges.txt (what CLIP's original tokenizer reads) and special_tokens_map.json."""
    folder = os.fspath(folder)
    tokenizer.save_pretrained(folder)
    model = json.loads(open(os.path.join(folder, "tokenizer.json"), encoding="utf-8").read())["model"]
    merges = [pair.split(" ") if isinstance(pair, str) else pair for pair in model["merges"]]
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(model["vocab"], f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {name: str(getattr(tokenizer, name)) for name in ("bos_token", "eos_token", "pad_token", "unk_token")
               if getattr(tokenizer, name, None) is not None}
    with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2)

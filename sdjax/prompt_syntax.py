"""Prompt syntaxes: how a prompt's text becomes the text encoder's token ids (and per-token weights).

"diffusers" (the default): the prompt is plain text, cut to the text encoder's 77 positions, exactly as
diffusers' Stable Diffusion pipelines do.

"a1111": the syntax that AUTOMATIC1111's web UI (and ComfyUI) users write:
- emphasis: `(words)` weighs the words 1.1x, `[words]` 1/1.1x, `(words:1.4)` 1.4x; brackets nest and multiply;
  an unclosed bracket runs to the end; `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are the literal characters;
- long prompts: the tokens go in chunks of 75, each encoded on its own as BOS + chunk + EOS + padding (77
  positions) and the embeddings concatenated (77 * K positions); a chunk that fills up with a comma among its
  last 20 tokens ends after that comma, so the phrase after it stays whole; `BREAK` ends a chunk early;
- the weights multiply each token's embedding, then each chunk's embeddings are rescaled to their unweighted
  mean, so emphasis shifts attention between tokens rather than the embeddings' overall scale.
All prompts of one call (positive and negative) are padded with empty chunks to the same count, as A1111 pads
conditional and unconditional embeddings to one length. One difference from A1111: the mean is taken per prompt,
not over the batch, so an image never depends on the other prompts beside it (the same when the batch holds one
prompt, A1111's usual case).
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from sdjax.errors import InvalidArgumentError

SYNTAXES = ("diffusers", "a1111")
ROUND, SQUARE = 1.1, 1 / 1.1
COMMA_BACKTRACK = 20  # A1111's default "comma padding backtrack"
BREAK = None  # the weight marking a BREAK in a parsed prompt

# One lexical unit per match: an escaped character, a bracket, a ":weight)" closing, or a run of plain text.
_UNITS = re.compile(r"\\[()\[\]\\]|[(\[\])]|:\s*([+-]?[.\d]+)\s*\)|[^\\()\[\]:]+|.", re.S)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def check_syntax(name: str) -> str:
    if name not in SYNTAXES:
        raise InvalidArgumentError(f"prompt_syntax must be one of {', '.join(SYNTAXES)}, got {name!r}")
    return name


def parse_emphasis(text: str) -> list[tuple[str, float | None]]:
    """[(text, weight)] of an A1111 prompt; neighbours of equal weight merged, BREAKs as ("BREAK", None)."""
    pieces: list[list] = []  # [text, weight]; the brackets scale every piece from their start onwards
    open_round: list[int] = []
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if piece[1] is not BREAK:
                piece[1] *= factor

    for match in _UNITS.finditer(text):
        unit, weight = match.group(0), match.group(1)
        if unit.startswith("\\"):  # an escaped character; a lone backslash vanishes, as in A1111
            pieces.append([unit[1:], 1.0])
        elif unit == "(":
            open_round.append(len(pieces))
        elif unit == "[":
            open_square.append(len(pieces))
        elif weight is not None and open_round:
            scale_from(open_round.pop(), _number(weight, text))
        elif unit == ")" and open_round:
            scale_from(open_round.pop(), ROUND)
        elif unit == "]" and open_square:
            scale_from(open_square.pop(), SQUARE)
        else:  # plain text, or a bracket / ":" / ":w)" with nothing open: literal
            for i, part in enumerate(_BREAK.split(unit)):
                if i:
                    pieces.append(["BREAK", BREAK])
                pieces.append([part, 1.0])
    for start in reversed(open_round):
        scale_from(start, ROUND)
    for start in reversed(open_square):
        scale_from(start, SQUARE)
    merged: list[list] = []
    for text_piece, weight in pieces:
        if merged and merged[-1][1] == weight and weight is not BREAK:
            merged[-1][0] += text_piece
        else:
            merged.append([text_piece, weight])
    return [(t, w) for t, w in merged] or [("", 1.0)]


def _number(weight: str, prompt: str) -> float:
    try:
        return float(weight)
    except ValueError:
        raise InvalidArgumentError(f"the emphasis weight {weight!r} in the prompt {prompt!r} is not a number") from None


def chunk_tokens(pieces: Sequence[tuple[Sequence[int], float | None]], comma: int | None,
                 size: int = 75) -> list[tuple[list[int], list[float]]]:
    """[(tokens, weights)] chunks of at most `size` tokens from (token ids, weight) pieces (weight None: BREAK)."""
    chunks: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close(keep: int) -> None:
        nonlocal tokens, weights, last_comma
        chunks.append((tokens[:keep], weights[:keep]))
        tokens, weights, last_comma = tokens[keep:], weights[keep:], -1

    for ids, weight in pieces:
        if weight is BREAK:
            close(len(tokens))
            continue
        for token in ids:
            if token == comma:
                last_comma = len(tokens)
            elif len(tokens) == size and last_comma != -1 and size - last_comma <= COMMA_BACKTRACK:
                close(last_comma + 1)  # the words after the comma move on to the next chunk
            if len(tokens) == size:
                close(size)
            tokens.append(token)
            weights.append(weight)
    if tokens or not chunks:
        close(len(tokens))
    return chunks


def a1111_inputs(tokenizer, prompt_lists: Sequence[Sequence[str]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each list of prompts, (ids (N, K * L), weights (N, K, L)) with L the tokenizer's model_max_length and K
    the largest chunk count among all the lists' prompts."""
    length = tokenizer.model_max_length
    comma = tokenizer.get_vocab().get(",</w>")
    per_list = []
    for prompts in prompt_lists:
        rows = []
        for prompt in prompts:
            parsed = parse_emphasis(prompt)
            ids = tokenizer([t for t, _ in parsed], add_special_tokens=False, verbose=False)["input_ids"]
            rows.append(chunk_tokens([(i, w) for i, (_, w) in zip(ids, parsed)], comma, size=length - 2))
        per_list.append(rows)
    count = max(len(chunks) for rows in per_list for chunks in rows)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    result = []
    for rows in per_list:
        ids = np.full((len(rows), count, length), pad, np.int32)
        weights = np.ones((len(rows), count, length), np.float32)
        ids[:, :, :2] = bos, eos  # the empty chunk, overwritten where a prompt has one
        for row, chunks in enumerate(rows):
            for k, (tokens, token_weights) in enumerate(chunks):
                ids[row, k, :len(tokens) + 2] = [bos, *tokens, eos]
                weights[row, k, 1:len(tokens) + 1] = token_weights
        result.append((ids.reshape(len(rows), count * length), weights))
    return result


def emphasize(embeddings: jnp.ndarray, weights: jnp.ndarray) -> jnp.ndarray:
    """Embeddings (N, K * L, D) scaled by per-token weights (N, K, L), each chunk then rescaled to the mean it
    had before."""
    n, k, length = weights.shape
    chunks = embeddings.reshape(n, k, length, -1)
    weighted = chunks * weights[..., None].astype(chunks.dtype)
    mean = lambda z: z.mean(axis=(2, 3), keepdims=True)
    return (weighted * (mean(chunks) / mean(weighted))).reshape(embeddings.shape)

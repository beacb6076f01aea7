"""Textual-inversion embeddings: new prompt tokens whose text-encoder input vectors were learned, loaded as
diffusers' `load_textual_inversion` loads them (`Pipeline.load_textual_inversion`).

Formats: diffusers (`learned_embeds.safetensors` / `.bin`: {token: (D,) or (n, D)}), A1111 (`.pt` with
`string_to_param` {"*": (n, D)} and `name`, or `.safetensors` with `emb_params` (n, D)) and SDXL (`clip_l` for
text_encoder, `clip_g` for text_encoder_2). An embedding of n vectors becomes the tokens `tok`, `tok_1`, ...,
`tok_{n-1}`; `expand_prompt` turns a prompt's `tok` into all of them, as diffusers' `maybe_convert_prompt` does.
The functions here are pure but for `read_embedding` (reads a file); the pipeline changes its tokenizers and
params with what they return.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from sdjax.errors import InvalidArgumentError, WeightsError
from sdjax.weights import tensors as tensor_files

DIFFUSERS_FILES = ("learned_embeds.safetensors", "learned_embeds.bin")
# The key of each text encoder's vectors in an SDXL embedding file.
SDXL_KEYS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}
A1111_KEYS = ("string_to_param.*", "emb_params")
# Where a CLIP text encoder's param tree keeps the token embedding matrix (vocab, D).
TOKEN_EMBEDDING = ("text_model", "embeddings", "token_embedding", "embedding")
EXPECTED_LAYOUT = ("one {token: tensor} entry (diffusers), 'string_to_param' with '*' or 'emb_params' (A1111), "
                   "or 'clip_l' / 'clip_g' (SDXL)")


@dataclasses.dataclass(frozen=True)
class Embedding:
    """One embedding as read: its token and its vectors (n, D), under None (for whichever text encoder has width
    D) or under a text encoder's name (an SDXL file)."""
    token: str
    vectors: dict[str | None, np.ndarray]
    source: str


def read_embedding(source, token: str | None = None) -> Embedding:
    """The embedding in `source`: a file, a folder holding learned_embeds.safetensors (or .bin), or a state dict of
    arrays (torch tensors too). `token` replaces the file's own (its key, its `name`, or the file's stem)."""
    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise InvalidArgumentError(f"token={token!r}: a textual-inversion token is a non-empty string")
    if isinstance(source, Mapping):
        return embedding_from_state(flatten(source), token, None, "the embedding state dict")
    if not isinstance(source, (str, os.PathLike)):
        raise InvalidArgumentError(f"a textual-inversion embedding is a path (.safetensors, .bin, .pt, or a folder "
                                   f"with {DIFFUSERS_FILES[0]}) or a state dict, got {type(source).__name__}")
    path = embedding_file(Path(source))
    return embedding_from_state(read_state(path), token, path.stem, str(path))


def embedding_file(path: Path) -> Path:
    """`path` itself, or for a folder the diffusers file inside it; an error when there is none."""
    if path.is_dir():
        found = [path / name for name in DIFFUSERS_FILES if (path / name).is_file()]
        if not found:
            raise WeightsError(f"{path}: a textual-inversion folder holds {' or '.join(DIFFUSERS_FILES)}; found "
                               f"{sorted(p.name for p in path.iterdir()) or 'nothing'}: pass the file itself")
        return found[0]
    if not path.is_file():
        raise WeightsError(f"{path}: no such textual-inversion file")
    return path


def read_state(path: Path) -> dict[str, Any]:
    """A file's entries, nested dicts flattened to dotted keys ("string_to_param.*"), tensors as numpy."""
    if path.suffix == ".safetensors":
        return {**tensor_files.read_safetensors_metadata(path), **tensor_files.read_safetensors(path)}
    state = tensor_files.load_torch_pickle(path, "embedding")
    if not isinstance(state, Mapping):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a dict; expected {EXPECTED_LAYOUT}")
    return flatten(state)


def flatten(state: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one dict with dotted keys; tensors (torch, jax or numpy) as numpy arrays."""
    flat = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            is_array = tensor_files.is_torch_tensor(value) or hasattr(value, "shape") and hasattr(value, "dtype")
            flat[name] = tensor_files.to_numpy(value) if is_array else value  # `name` and the like stay as they are
    return flat


def embedding_from_state(state: Mapping[str, Any], token: str | None, stem: str | None, source: str) -> Embedding:
    """The token and vectors of one embedding's entries, told apart by layout (`EXPECTED_LAYOUT`)."""
    arrays = {key: value for key, value in state.items() if isinstance(value, np.ndarray) and value.ndim >= 1}
    name = state.get("name") if isinstance(state.get("name"), str) else stem
    if arrays.keys() & SDXL_KEYS.keys():
        vectors = {SDXL_KEYS[key]: arrays[key] for key in SDXL_KEYS if key in arrays}
    elif found := [key for key in A1111_KEYS if key in arrays]:
        vectors = {None: arrays[found[0]]}
    elif len(arrays) == 1:
        [(name, vector)] = arrays.items()
        vectors = {None: vector}
    else:
        raise WeightsError(f"{source}: unknown textual-inversion layout; found keys {sorted(state) or 'none'}, "
                           f"expected {EXPECTED_LAYOUT}")
    token = token or name
    if not token:
        raise InvalidArgumentError(f"{source} does not name its token: pass token=")
    return Embedding(token, {key: as_rows(value, key, source) for key, value in vectors.items()}, source)


def as_rows(vectors: np.ndarray, key: str | None, source: str) -> np.ndarray:
    """(n, D) from (D,) or (n, D); anything else is an error naming the entry."""
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or not vectors.shape[0]:
        raise WeightsError(f"{source}: the {key or 'embedding'} vectors have shape {vectors.shape}; expected (D,) "
                           f"or (n, D)")
    return vectors


def assign(embedding: Embedding, widths: Mapping[str, int]) -> dict[str, np.ndarray]:
    """{text encoder name: vectors (n, D)} for the pipeline's text encoders and their widths (in order). Vectors
    without an encoder go to the first whose width is D; an SDXL file's go to those of its encoders present."""
    if None not in embedding.vectors:
        assigned = {name: rows for name, rows in embedding.vectors.items() if name in widths}
        if not assigned:
            raise InvalidArgumentError(f"{embedding.source} holds vectors for {', '.join(embedding.vectors)}; this "
                                       f"pipeline has {', '.join(widths) or 'no text encoder'}")
        for name, rows in assigned.items():
            if rows.shape[1] != widths[name]:
                raise InvalidArgumentError(f"{embedding.source}: its {name} vectors have width {rows.shape[1]}; "
                                           f"{name} has width {widths[name]}")
        return assigned
    rows = embedding.vectors[None]
    for name, width in widths.items():
        if rows.shape[1] == width:
            return {name: rows}
    described = " and ".join(f"{name} {width}" for name, width in widths.items())
    raise InvalidArgumentError(f"{embedding.source}: embedding width {rows.shape[1]} fits no text encoder of this "
                               f"pipeline (widths: {described})")


def token_names(token: str, count: int) -> list[str]:
    """The tokens of an embedding of `count` vectors: tok, tok_1, ..., tok_{count-1}."""
    return [token] + [f"{token}_{i}" for i in range(1, count)]


def check_new_token(tokenizer, token: str, encoder: str) -> None:
    """Refuse a token (or its multi-vector form tok_1) already in the tokenizer's vocabulary, as diffusers does."""
    vocab = tokenizer.get_vocab()
    taken = [name for name in (token, f"{token}_1") if name in vocab]
    if taken:
        raise InvalidArgumentError(f"token {taken[0]!r} is already in the vocabulary of {encoder}'s tokenizer; "
                                   f"choose another token= (or load a fresh pipeline)")


def grown_table(table, rows: np.ndarray, ids: list[int], size: int):
    """The token embedding matrix resized to `size` rows (as transformers' resize_token_embeddings: kept rows
    copied, rows past the old end zero) with `rows` written at `ids`, in the table's dtype."""
    table = np.asarray(table)
    grown = np.zeros((size, table.shape[1]), table.dtype)
    kept = min(size, table.shape[0])
    grown[:kept] = table[:kept]
    grown[ids] = rows.astype(table.dtype)
    return grown


def expand_prompts(prompts, tokenizer) -> list[str]:
    """`expand_prompt` of each prompt; the prompts unchanged (no tokenizing) when the tokenizer has no added token
    besides its special ones. Added tokens saved with a tokenizer count too, as in diffusers."""
    if all(added.special for added in tokenizer.added_tokens_decoder.values()):
        return list(prompts)
    return [expand_prompt(prompt, tokenizer) for prompt in prompts]


def expand_prompt(prompt: str, tokenizer) -> str:
    """`prompt` with each added token that has multi-vector companions (tok_1, tok_2, ...) replaced by all of
    them, "tok tok_1 tok_2": diffusers' `maybe_convert_prompt`, text replacement included."""
    added = tokenizer.added_tokens_encoder
    for token in set(tokenizer.tokenize(prompt)):
        if token in added:
            count = 1
            while f"{token}_{count}" in added:
                count += 1
            prompt = prompt.replace(token, " ".join(token_names(token, count)))
    return prompt

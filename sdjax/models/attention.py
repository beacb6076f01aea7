"""Scaled dot-product attention: the one place every model attends through.

Backends share one signature so speed work changes only this file:
- "einsum": plain softmax(q k^T / sqrt(d)) v, the reference;
- "chunked": queries processed in chunks under `lax.map`, memory O(chunk * Lk) instead of O(Lq * Lk);
- "xla": `jax.nn.dot_product_attention` (fused cuDNN kernel on GPU where available).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sdjax.errors import InvalidArgumentError

IMPLEMENTATIONS = ("einsum", "chunked", "xla")


def attention(q, k, v, *, mask=None, upcast: bool = False, implementation: str = "einsum", chunk_size: int = 1024):
    """Multi-head attention on (batch, length, heads, head_dim) arrays.

    mask: boolean, broadcastable to (batch, heads, q_len, kv_len); True where a query may attend.
    upcast: compute scores and softmax in float32 whatever the input dtype (diffusers' upcast_attention).
    """
    if implementation == "einsum":
        return _einsum_attention(q, k, v, mask, upcast)
    if implementation == "chunked":
        return _chunked_attention(q, k, v, mask, upcast, chunk_size)
    if implementation == "xla":
        if upcast:
            out = jax.nn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                               v.astype(jnp.float32), mask=mask)
            return out.astype(q.dtype)
        return jax.nn.dot_product_attention(q, k, v, mask=mask)
    raise InvalidArgumentError(
        f"unknown attention implementation {implementation!r}; choose one of {', '.join(IMPLEMENTATIONS)}")


def _einsum_attention(q, k, v, mask, upcast):
    compute_dtype = jnp.float32 if upcast else q.dtype
    scale = q.shape[-1] ** -0.5
    scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(compute_dtype), k.astype(compute_dtype)) * scale
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def _chunked_attention(q, k, v, mask, upcast, chunk_size):
    q_len = q.shape[1]
    if q_len <= chunk_size or q_len % chunk_size:
        return _einsum_attention(q, k, v, mask, upcast)
    chunks = q.reshape(q.shape[0], q_len // chunk_size, chunk_size, *q.shape[2:]).swapaxes(0, 1)
    if mask is not None:
        mask = jnp.broadcast_to(mask, (q.shape[0], q.shape[2], q_len, k.shape[1]))
        mask_chunks = mask.reshape(*mask.shape[:2], q_len // chunk_size, chunk_size, -1).transpose(2, 0, 1, 3, 4)
        out = jax.lax.map(lambda args: _einsum_attention(args[0], k, v, args[1], upcast), (chunks, mask_chunks))
    else:
        out = jax.lax.map(lambda c: _einsum_attention(c, k, v, None, upcast), chunks)
    return out.swapaxes(0, 1).reshape(q.shape)

"""Scaled dot-product attention: the one place every model attends through.

Backends share one signature so speed work changes only this file:
- "einsum": plain softmax(q k^T / sqrt(d)) v, the reference;
- "chunked": queries processed in chunks under `lax.map`, memory O(chunk * Lk) instead of O(Lq * Lk);
- "blocked": one (batch, head) pair at a time, its queries in blocks small enough that the block's scores stay
  in cache, softmax normalised after the value product: XLA:CPU runs the whole-array einsum's score tensor
  through memory several times; this runs 3.5x faster, within 10% of torch's SDPA on the same CPU
  (experiments/perf/results/kernels_*.md);
- "xla": `jax.nn.dot_product_attention` (fused cuDNN kernel on GPU where available);
- "pallas": the Pallas flash attention kernel for TPU that ships with JAX (online softmax over key blocks in VMEM,
  its own backward pass); lengths and head size padded to its 128-lane tiles, padded keys masked out by segment
  ids. Masked attention (the text encoder's causal mask) goes to "xla": only the U-Net's long sequences need it.
  Off TPU it runs only in Pallas' interpret mode (`pltpu.force_tpu_interpret_mode()`, how the tests check it);
- "auto" (the default): on CPU "blocked" where a (batch, head) pair has at least BLOCKED_MIN_SCORES scores, else
  "einsum" (the loop's per-pair overhead outweighs its cache gain on short sequences); "pallas" on TPU for
  unmasked attention; "xla" otherwise (a loop over heads would serialise them on an accelerator).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sdjax.errors import InvalidArgumentError

IMPLEMENTATIONS = ("auto", "blocked", "einsum", "chunked", "xla", "pallas")
DEFAULT = "auto"
BLOCK_SCORES = 1 << 21
"""Scores per query block of the "blocked" backend: 512 queries of 4096 keys (8 MiB in float32). Measured on a Zen 4
EPYC at 4096 tokens: blocks of 2^21-2^22 scores 128 GFLOP/s, 2^20 105, 2^18 67, a whole 4096^2 head 63, the
einsum over all heads 36, torch's SDPA 136 (experiments/perf/results/)."""
BLOCKED_MIN_SCORES = 4096
"""Below this many scores per (batch, head) pair "auto" uses "einsum" on CPU. Measured forward / forward+backward
(Zen 4 EPYC): 64x64 tokens, 16 heads of 4, batch 64: blocked 11/55 ms, einsum 16/97; 64 queries x 32 keys: blocked
12/42, einsum 10/25; 32x32 (the shapes text encoder): blocked 3.6/13, einsum 2.0/7.3; 16x16: blocked 4.9/18,
einsum 2.5/7.2."""


def attention(q, k, v, *, mask=None, upcast: bool = False, implementation: str = DEFAULT, chunk_size: int = 1024):
    """Multi-head attention on (batch, length, heads, head_dim) arrays.

    mask: boolean, broadcastable to (batch, heads, q_len, kv_len); True where a query may attend.
    upcast: compute scores and softmax in float32 whatever the input dtype (diffusers' upcast_attention).
    """
    if implementation == "auto":
        implementation = auto_implementation(q.shape[1], k.shape[1], masked=mask is not None)
    if implementation == "pallas" and mask is None:
        return _pallas_attention(q, k, v, upcast)
    if implementation == "blocked":
        return _blocked_attention(q, k, v, mask)
    if implementation == "einsum":
        return _einsum_attention(q, k, v, mask, upcast)
    if implementation == "chunked":
        return _chunked_attention(q, k, v, mask, upcast, chunk_size)
    if implementation in ("xla", "pallas"):
        if upcast:
            out = jax.nn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                               v.astype(jnp.float32), mask=mask)
            return out.astype(q.dtype)
        return jax.nn.dot_product_attention(q, k, v, mask=mask)
    raise InvalidArgumentError(
        f"unknown attention implementation {implementation!r}; choose one of {', '.join(IMPLEMENTATIONS)}")


def auto_implementation(q_len: int, kv_len: int, masked: bool = False) -> str:
    """The backend "auto" picks for attention of q_len queries over kv_len keys on the default backend."""
    if jax.default_backend() == "tpu" and not masked:
        return "pallas"
    if jax.default_backend() != "cpu":
        return "xla"
    return "blocked" if q_len * kv_len >= BLOCKED_MIN_SCORES else "einsum"


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


def _blocked_attention(q, k, v, mask):
    """Each (batch, head) pair in turn (`lax.map`), its queries in blocks of about BLOCK_SCORES scores; within a
    block exp(scores - max) is multiplied by the values first and divided by its row sums after, so the division
    touches (block, head_dim) numbers rather than (block, kv_len). Both products accumulate in float32, and scores,
    exp and sums are float32 whatever the inputs (bfloat16 sums over thousands of keys would lose digits). That is
    already what `upcast` asks for: a product of two bfloat16 (or float16) numbers is exact in float32, so
    upcasting q and k first would give the same scores, and XLA:CPU would compute them without the CPU's bfloat16
    units. The value product runs in v's dtype."""
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    block = min(q_len, max(1, BLOCK_SCORES // kv_len))
    blocks = -(-q_len // block)
    padding = blocks * block - q_len  # padded queries attend like any other; their rows are dropped at the end
    scale = head_dim ** -0.5

    def per_pair(x, length):  # (batch, length, heads, dim) -> (batch * heads, length, dim)
        return x.transpose(0, 2, 1, 3).reshape(batch * heads, length, x.shape[-1])

    query_blocks = jnp.pad(per_pair(q, q_len), ((0, 0), (0, padding), (0, 0)))
    query_blocks = query_blocks.reshape(batch * heads, blocks, block, head_dim)
    inputs = (query_blocks, per_pair(k, kv_len), per_pair(v, kv_len))
    if mask is not None:
        mask = jnp.broadcast_to(mask, (batch, heads, q_len, kv_len)).reshape(batch * heads, q_len, kv_len)
        mask = jnp.pad(mask, ((0, 0), (0, padding), (0, 0)), constant_values=True)
        inputs += (mask.reshape(batch * heads, blocks, block, kv_len),)

    def attend(query, keys, values, allowed=None):
        # contracting both operands' last axes, not matmul(query, keys.T): XLA:CPU computes a dot of a
        # transposed bfloat16 operand in float32, this one on the CPU's bfloat16 units
        scores = jnp.einsum("qd,kd->qk", query, keys, preferred_element_type=jnp.float32) * scale
        if allowed is not None:
            scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
        weights = jnp.exp(scores - scores.max(axis=-1, keepdims=True))
        totals = weights.sum(axis=-1, keepdims=True, dtype=jnp.float32)
        out = jnp.matmul(weights.astype(values.dtype), values, preferred_element_type=jnp.float32) / totals
        return out.astype(v.dtype)

    def pair(args):
        query_blocks, keys, values, *masks = args
        return jax.lax.map(lambda block_args: attend(block_args[0], keys, values, *block_args[1:]),
                           (query_blocks, *masks))

    out = jax.lax.map(pair, inputs).reshape(batch, heads, blocks * block, head_dim)[:, :, :q_len]
    return out.transpose(0, 2, 1, 3)


PALLAS_TILE = 128  # the TPU kernel's minimum block: lengths and head size are padded to multiples of it


def _pallas_attention(q, k, v, upcast):
    """JAX's Pallas TPU flash attention on (batch, length, heads, head_dim) arrays. Zero-padded head dims add
    nothing to the scores (and give zero output columns, dropped); padded queries are dropped; padded keys carry
    segment id 0, which no query (id 1) attends to."""
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash

    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    out_dtype = v.dtype
    if upcast:
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    padded = lambda n: -(-n // PALLAS_TILE) * PALLAS_TILE
    q_pad, kv_pad, dim_pad = padded(q_len), padded(kv_len), padded(head_dim)

    def per_head(x, length_pad):  # (batch, length, heads, dim) -> (batch, heads, padded length, padded dim)
        x = jnp.pad(x, ((0, 0), (0, length_pad - x.shape[1]), (0, 0), (0, dim_pad - head_dim)))
        return x.transpose(0, 2, 1, 3)

    segments = tpu_flash.SegmentIds(q=jnp.ones((batch, q_pad), jnp.int32),
                                    kv=(jnp.arange(kv_pad) < kv_len).astype(jnp.int32)[None].repeat(batch, 0))
    block_q, block_k = (_largest_block(n) for n in (q_pad, kv_pad))
    blocks = tpu_flash.BlockSizes(
        block_q=block_q, block_k_major=block_k, block_k=block_k, block_b=1,
        block_q_major_dkv=block_q, block_k_major_dkv=block_k, block_k_dkv=block_k, block_q_dkv=block_q,
        block_k_major_dq=block_k, block_k_dq=block_k, block_q_dq=block_q)
    out = tpu_flash.flash_attention(per_head(q, q_pad), per_head(k, kv_pad), per_head(v, kv_pad),
                                    segment_ids=segments, sm_scale=head_dim ** -0.5, block_sizes=blocks)
    return out.transpose(0, 2, 1, 3)[:, :q_len, :, :head_dim].astype(out_dtype)


def _largest_block(length: int, largest: int = 512) -> int:
    """The largest power-of-two multiple of PALLAS_TILE, up to `largest`, that divides `length`."""
    block = PALLAS_TILE
    while block * 2 <= largest and length % (block * 2) == 0:
        block *= 2
    return block

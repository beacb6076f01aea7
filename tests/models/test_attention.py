"""The attention backends against torch's scaled_dot_product_attention (values and gradients), on the shapes
that matter: self-attention over many tokens split into query blocks (with a ragged last block), cross-attention
over a few keys, boolean masks, bfloat16 inputs and diffusers' upcast."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sdjax.models import attention as attention_module
from sdjax.models.attention import attention
from tests.models import bfloat16_dots, optimised_hlo


def _inputs(q_len, kv_len, seed=0, batch=2, heads=3, head_dim=8):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, q_len, heads, head_dim)).astype(np.float32)
    k, v = (rng.standard_normal((batch, kv_len, heads, head_dim)).astype(np.float32) for _ in range(2))
    return q, k, v


def _torch_attention(q, k, v, mask=None):
    """torch's SDPA on (batch, heads, length, dim) tensors, returned in sdjax's (batch, length, heads, dim)."""
    tq, tk, tv = (torch.from_numpy(x).transpose(1, 2) for x in (q, k, v))
    tmask = None if mask is None else torch.from_numpy(np.asarray(mask))
    return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask).transpose(1, 2).numpy()


def _errors(ours, reference):
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return np.linalg.norm(ours - reference) / np.linalg.norm(reference), np.abs(ours - reference).max()


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 40 scores: 70 queries of 4 keys make 7 blocks of 10, 70 of 33 keys 70 blocks of 1."""
    monkeypatch.setattr(attention_module, "BLOCK_SCORES", 40)


@pytest.mark.parametrize("q_len,kv_len", [(70, 70), (70, 4), (70, 33), (1, 9)])
@pytest.mark.parametrize("implementation", ["blocked", "einsum", "chunked", "xla"])
def test_matches_torch_sdpa(small_blocks, implementation, q_len, kv_len):
    q, k, v = _inputs(q_len, kv_len)
    out = jax.jit(lambda *a: attention(*a, implementation=implementation, chunk_size=10))(q, k, v)
    rel, max_abs = _errors(out, _torch_attention(q, k, v))
    assert rel < 1e-6 and max_abs < 1e-5, (rel, max_abs)  # seen: <= 3e-7 relative L2


def test_blocks_cover_every_query_once(monkeypatch):
    """A block size that does not divide the queries pads the last block; padded rows never reach the output."""
    q, k, v = _inputs(23, 23, seed=1)
    reference = _torch_attention(q, k, v)
    for scores in (23 * 5, 23 * 7, 23 * 23, 23 * 100):  # blocks of 5, 7, all 23 queries, and more than there are
        monkeypatch.setattr(attention_module, "BLOCK_SCORES", scores)
        out = attention(q, k, v, implementation="blocked")
        assert out.shape == q.shape
        assert _errors(out, reference)[0] < 1e-6, scores


def test_masks_as_the_text_encoder_uses_them(small_blocks):
    """Causal and padding masks, broadcast over heads (batch, 1, q, k) as CLIP's text encoder passes them."""
    q, k, v = _inputs(12, 12, seed=2)
    causal = np.tril(np.ones((12, 12), bool))
    padding = np.arange(12)[None, :] < np.array([12, 7])[:, None]  # the second prompt has 7 real tokens
    mask = causal[None, None] & padding[:, None, None, :]
    out = attention(q, k, v, mask=mask, implementation="blocked")
    rel, max_abs = _errors(out, _torch_attention(q, k, v, mask))
    assert rel < 1e-6 and max_abs < 1e-5, (rel, max_abs)


def test_gradients_match_torch(small_blocks):
    q, k, v = _inputs(30, 30, seed=3)
    weights = np.random.default_rng(4).standard_normal(q.shape).astype(np.float32)
    loss = lambda *args: jnp.sum(attention(*args, implementation="blocked") * weights)  # noqa: E731
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    tensors = [torch.from_numpy(x).transpose(1, 2).requires_grad_() for x in (q, k, v)]
    out = torch.nn.functional.scaled_dot_product_attention(*tensors).transpose(1, 2)
    (out * torch.from_numpy(weights)).sum().backward()
    for ours, tensor in zip(grads, tensors):
        rel, max_abs = _errors(ours, tensor.grad.transpose(1, 2).numpy())
        assert rel < 1e-5, (rel, max_abs)  # seen: ~3e-7


@pytest.mark.parametrize("upcast", [False, True])
def test_bfloat16_inputs_stay_close_to_float32(small_blocks, upcast):
    """Scores, exp and row sums run in float32 whatever the inputs: bfloat16 q, k, v lose only their own rounding."""
    q, k, v = _inputs(70, 70, seed=5)
    low = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    out = attention(*low, implementation="blocked", upcast=upcast)
    assert out.dtype == jnp.bfloat16
    reference = _torch_attention(*(np.asarray(x, np.float32) for x in low))  # the same rounded inputs, in float32
    rel, max_abs = _errors(out, reference)
    assert rel < 8e-3, (rel, max_abs)  # bfloat16 keeps 8 bits: ~4e-3 relative per rounding; seen 2.6e-3


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks what XLA:CPU is handed")
@pytest.mark.parametrize("upcast", [False, True])
def test_bfloat16_blocked_attention_runs_its_products_in_bfloat16(upcast):
    """Both products (scores and the value product) are bfloat16 dots accumulating in float32, the form XLA:CPU
    runs on bfloat16 units, with or without `upcast` (bfloat16 products are exact in float32)."""
    low = [jnp.asarray(x, jnp.bfloat16) for x in _inputs(64, 64)]
    hlo = optimised_hlo(lambda *a: attention(*a, implementation="blocked", upcast=upcast), *low)
    assert bfloat16_dots(hlo) == 2


@pytest.mark.parametrize("q_len, kv_len, blocked", [(64, 64, True), (64, 32, False), (4096, 1, True)])
def test_auto_on_cpu_is_blocked_only_for_long_sequences(q_len, kv_len, blocked):
    q, k, v = _inputs(q_len, kv_len)
    lowered = jax.jit(lambda *a: attention(*a)).lower(q, k, v).as_text()
    assert ("while" in lowered) == blocked  # the blocked backend's loop over (batch, head) pairs


def test_pallas_flash_kernel_matches_torch_in_interpret_mode():
    """The TPU kernel, run by Pallas' interpreter on CPU: query, key and head sizes that need padding to its
    128-wide tiles; values and gradients against torch's SDPA."""
    from jax.experimental.pallas import tpu as pltpu

    q, k, v = _inputs(70, 33, seed=6, batch=1, heads=2)
    weights = np.random.default_rng(7).standard_normal(q.shape).astype(np.float32)
    loss = lambda *args: jnp.sum(attention(*args, implementation="pallas") * weights)  # noqa: E731
    with pltpu.force_tpu_interpret_mode():
        out = attention(q, k, v, implementation="pallas")
        grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    rel, max_abs = _errors(out, _torch_attention(q, k, v))
    assert rel < 1e-6 and max_abs < 1e-5, (rel, max_abs)
    tensors = [torch.from_numpy(x).transpose(1, 2).requires_grad_() for x in (q, k, v)]
    out = torch.nn.functional.scaled_dot_product_attention(*tensors).transpose(1, 2)
    (out * torch.from_numpy(weights)).sum().backward()
    for ours, tensor in zip(grads, tensors):
        rel, max_abs = _errors(ours, tensor.grad.transpose(1, 2).numpy())
        assert rel < 1e-5, (rel, max_abs)


def test_auto_on_tpu_is_the_pallas_kernel_except_for_masks(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert attention_module.auto_implementation(4096, 77) == "pallas"
    assert attention_module.auto_implementation(77, 77, masked=True) == "xla"  # the text encoder's causal mask
    q, k, v = _inputs(12, 12, seed=8)
    mask = np.tril(np.ones((12, 12), bool))[None, None]
    out = attention(q, k, v, mask=mask, implementation="pallas")  # masked: the fused XLA path, not the kernel
    assert _errors(out, _torch_attention(q, k, v, mask))[0] < 1e-6

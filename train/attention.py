"""Document attention for packed rows, and Ulysses sequence parallelism, as transformers' attention "chattune".

Packed rows reach the model as one flattened row (1, ΣL) plus `cu_seq_lens_q` (cumulative sample lengths,
transformers' varlen convention). Attention is computed per sample, so a row costs Σ len² and nothing
quadratic in the row length exists anywhere (a dense 4D mask at 128k tokens would hold 16 G entries):
  * CUDA with flash-attn: `flash_attn_varlen_func` over cu_seqlens;
  * CUDA without it: FlexAttention with a document BlockMask (masked blocks are skipped), compiled;
  * CPU: causal SDPA per sample. FlexAttention would be the block-sparse choice here too, but torch 2.13 has
    no FlexAttention backward on CPU (NotImplementedError, eager and compiled), so the blocks are the samples.
Sliding windows (Mistral, Gemma) and logit soft-capping (Gemma-2) are applied within each sample.

Sequence parallelism (DeepSpeed-Ulysses): a rank holds L/N positions of every head. An all-to-all trades
them for all L positions of H/N heads, attention runs over the whole row (samples still isolated), and the
inverse all-to-all restores the layout. Its backward is the inverse exchange, so gradients flow to the rank
that owns each position. KV heads that do not divide by N are repeated to the query heads first.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F

NAME = "chattune"
_sp_group = None  # the sequence-parallel process group, set by train/sequence_parallel.py


def set_sequence_parallel_group(group) -> None:
    global _sp_group
    _sp_group = group


def sequence_parallel_size() -> int:
    return dist.get_world_size(_sp_group) if _sp_group is not None else 1


def register() -> str:
    """Register the implementation with transformers (idempotent); returns its name for `set_attn_implementation`."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, chattune_attention)
    return NAME


class _AllToAll(torch.autograd.Function):
    """Split `x` along `scatter_dim` into N parts, send part j to rank j, concatenate what arrives along `gather_dim`."""

    @staticmethod
    def forward(ctx, x, scatter_dim: int, gather_dim: int, group):
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return _exchange(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _exchange(grad.contiguous(), gather_dim, scatter_dim, ctx.group), None, None, None


def _exchange(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    n = dist.get_world_size(group)
    send = torch.stack([part.contiguous() for part in x.chunk(n, dim=scatter_dim)])
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    return _AllToAll.apply(x, scatter_dim, gather_dim, group)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, L, D) → (B, Hkv·n_rep, L, D), query head h reading KV head h // n_rep (transformers' layout)."""
    if n_rep == 1:
        return x
    b, h, length, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, length, d).reshape(b, h * n_rep, length, d)


@torch.compiler.disable
def chattune_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                       sliding_window=None, softcap=None, cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """transformers' attention-interface signature: q (B, H, L, D), k/v (B, Hkv, L, D) → ((B, L, H, D), None).
    `attention_mask` is ignored: rows are right-padded (causal attention never reaches the padding from a real
    token) or packed (`cu_seq_lens_q` gives the samples)."""
    group = _sp_group
    heads, kv_heads = query.shape[1], key.shape[1]
    if group is not None:
        if kv_heads % sequence_parallel_size():  # replicate KV heads so that each rank's query heads find theirs
            key, value = repeat_kv(key, heads // kv_heads), repeat_kv(value, heads // kv_heads)
        query, key, value = (all_to_all(t, 1, 2, group) for t in (query, key, value))
    bounds = None if cu_seq_lens_q is None else [int(b) for b in cu_seq_lens_q.tolist()]
    out = attend(query, key, value, bounds, scaling, dropout if module.training else 0.0, sliding_window, softcap)
    if group is not None:
        out = all_to_all(out, 2, 1, group)
    return out.transpose(1, 2).contiguous(), None


def attend(q, k, v, bounds: list[int] | None, scale, dropout: float = 0.0, window: int | None = None,
           softcap: float | None = None) -> torch.Tensor:
    """Causal attention within each sample: (B, H, L, D) → (B, H, L, D). `bounds`: cumulative sample lengths
    of a single row (B = 1), ending at L; None: each row is one causal sequence."""
    length = q.shape[2]
    if bounds is None:
        bounds_rows = [0, length]
    else:
        if q.shape[0] != 1 or bounds[0] != 0 or bounds[-1] != length:
            raise ValueError(f"cu_seq_lens_q {bounds[:3]}…{bounds[-1:]} does not describe one row of {length} tokens "
                             f"(batch {q.shape[0]})")
        bounds_rows = bounds
    if q.is_cuda:
        from train.modeling import flash_attn_available

        if flash_attn_available() and q.dtype in (torch.float16, torch.bfloat16):  # flash-attn computes in 16 bits
            return _flash(q, k, v, bounds, scale, dropout, window, softcap)
        if bounds is not None and dropout == 0.0:
            return flex_document_attention(q, k, v, bounds, scale, window, softcap)
    k, v = repeat_kv(k, q.shape[1] // k.shape[1]), repeat_kv(v, q.shape[1] // v.shape[1])
    parts = []
    for start, end in zip(bounds_rows[:-1], bounds_rows[1:]):
        if end > start:
            parts.append(_causal(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], scale, dropout, window,
                                 softcap))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _causal(q, k, v, scale, dropout, window, softcap):
    """One sample: SDPA when plain causal; explicit scores where a window cuts in or logits are soft-capped."""
    n = q.shape[2]
    if softcap is None and (window is None or n <= window):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, dropout_p=dropout)
    i = torch.arange(n, device=q.device)
    allowed = i[:, None] >= i[None, :]
    if window is not None:
        allowed &= (i[:, None] - i[None, :]) < window  # transformers' sliding_window: the last `window` keys
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, dropout_p=dropout)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    return torch.matmul(probs, v)


def _flash(q, k, v, bounds, scale, dropout, window, softcap):  # pragma: no cover - needs CUDA and flash-attn
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    extra = {"softmax_scale": scale, "dropout_p": dropout, "causal": True,
             "window_size": (window - 1, 0) if window else (-1, -1), "softcap": softcap or 0.0}
    if bounds is None:
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **extra)
        return out.transpose(1, 2)
    cu = torch.tensor(bounds, dtype=torch.int32, device=q.device)
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    out = flash_attn_varlen_func(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu, longest,
                                 longest, **extra)
    return out.transpose(0, 1)[None]


def document_ids(bounds: list[int], device=None) -> torch.Tensor:
    """Which sample each position of the row belongs to (O(L), the BlockMask's input)."""
    lengths = torch.tensor([b - a for a, b in zip(bounds[:-1], bounds[1:])], device=device)
    return torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)


def document_block_mask(bounds: list[int], window: int | None = None, device=None):
    """FlexAttention BlockMask of causal attention within each sample (and within `window`): blocks of
    128×128 positions that no sample spans are skipped by the kernel."""
    from torch.nn.attention.flex_attention import create_block_mask

    doc = document_ids(bounds, device)

    def mask_mod(b, h, q_idx, kv_idx):
        keep = (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)
        if window is not None:
            keep = keep & (q_idx - kv_idx < window)
        return keep

    length = bounds[-1]
    return create_block_mask(mask_mod, None, None, length, length, device=device)


_last_block_mask: list = [None, None]  # [(bounds, window, device), BlockMask]


@functools.cache
def _compiled_flex():  # pragma: no cover - CUDA only (CPU FlexAttention has no backward)
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def flex_document_attention(q, k, v, bounds, scale, window=None, softcap=None, compiled: bool = True):
    """FlexAttention over the document BlockMask; `compiled=False` runs the reference path (forward-only on CPU)."""
    from torch.nn.attention.flex_attention import flex_attention

    key = (tuple(bounds), window, str(q.device))
    if _last_block_mask[0] != key:  # every layer of a forward (and its recompute) shares the row's mask
        _last_block_mask[:] = [key, document_block_mask(bounds, window, q.device)]
    block_mask = _last_block_mask[1]
    score_mod = None
    if softcap is not None:
        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.tanh(score / softcap) * softcap
    fn = _compiled_flex() if compiled else flex_attention
    return fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])

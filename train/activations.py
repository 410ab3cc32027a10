"""What autograd keeps for backward, counted on the meta device: activations per decoder layer, without data.

The planner (train/plan.py) needs the bytes one decoder layer saves for backward at a given batch and row
length. Formulas per architecture go stale; autograd itself knows. The model is built on the meta device
(no weights, no compute), one forward runs under `saved_tensors_hooks`, and every saved tensor that is not a
parameter is counted once per storage (a saved view keeps its whole base alive, so the base is counted),
attributed to the decoder layer (and its MLP) running at the time.

Attention: on the meta device SDPA would take its math path, which keeps the L × L probabilities. The
kernels training runs (PyTorch's CPU flash kernel, flash-attn, memory-efficient SDPA on CUDA) keep only q,
k, v, the output and the log-sum-exp, so the trace runs the CPU flash kernel's meta implementation.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from train.long_rows import decoder_layers
from train.loss import causal_lm


@dataclass(frozen=True)
class LayerActivations:
    per_layer: list[int]  # bytes saved by each decoder layer (MLP included)
    mlp: list[int]  # of which inside the layer's MLP
    mlp_input: int  # bytes of one MLP input (what a tiled MLP keeps instead of its intermediates)
    outside: int  # saved outside the decoder layers (embedding output, final norm)
    layer_input: int  # bytes of one decoder layer's input hidden states (what checkpointing keeps per layer)
    hidden_16bit: list[int]  # of per_layer: 16-bit tensors of hidden size (fp32 where the residual stream is fp32)


@contextmanager
def _flash_sdpa_on_meta():
    """SDPA as the fused kernels run it (saving q, k, v, out, lse), on meta tensors."""
    plain = torch.nn.functional.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if not query.is_meta or attn_mask is not None:
            return plain(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                         scale=scale, enable_gqa=enable_gqa)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal,
                                                                          scale=scale)[0]

    from transformers import masking_utils

    find_packed = masking_utils.find_packed_sequence_indices  # reads position values: none on meta (one sample/row)
    torch.nn.functional.scaled_dot_product_attention = sdpa
    masking_utils.find_packed_sequence_indices = lambda *args, **kwargs: None
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = plain
        masking_utils.find_packed_sequence_indices = find_packed


def trace_activations(model, batch: int, length: int) -> LayerActivations:
    """Run `model` (built on the meta device, training mode, gradient checkpointing off, SDPA attention) on a
    (batch, length) row of token ids and count what autograd saves. The model's decoder stack is called
    directly: the loss head is planned separately (train/plan.py), as it computes in checkpointed chunks."""
    layers = decoder_layers(model)
    if not layers:
        raise ValueError("no decoder layers found (modules with `self_attn` and `mlp`)")
    params = {id(p) for p in model.parameters()}
    where: list = [None, False]  # [layer index or None, inside its MLP]
    per_layer, mlp, hidden_16bit = [0] * len(layers), [0] * len(layers), [0] * len(layers)
    counted: dict[int, torch.Tensor] = {}  # id(base) -> base, kept alive so ids stay unique
    outside = 0
    hidden = model.config.hidden_size

    def pack(t: torch.Tensor):
        nonlocal outside
        base = t
        while base._base is not None:
            base = base._base
        if id(t) in params or id(base) in params or id(base) in counted:
            return t
        counted[id(base)] = base
        size = base.untyped_storage().nbytes() if not base.is_meta else base.numel() * base.element_size()
        if where[0] is None:
            outside += size
        else:
            per_layer[where[0]] += size
            if base.element_size() == 2 and base.dim() and base.shape[-1] == hidden:
                hidden_16bit[where[0]] += size
            if where[1]:
                mlp[where[0]] += size
        return t

    hooks = []
    mlp_input = [0]
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(lambda m, a, i=i: where.__setitem__(0, i)))
        hooks.append(layer.register_forward_hook(lambda m, a, o: where.__setitem__(0, None)))

        def enter_mlp(m, args):
            where[1] = True
            mlp_input[0] = args[0].numel() * args[0].element_size() if args and torch.is_tensor(args[0]) else 0

        hooks.append(layer.mlp.register_forward_pre_hook(enter_mlp))
        hooks.append(layer.mlp.register_forward_hook(lambda m, a, o: where.__setitem__(1, False)))
    decoder = _decoder(model)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    ids = torch.zeros((batch, length), dtype=torch.long, device="meta")
    try:
        with _flash_sdpa_on_meta(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = decoder(input_ids=ids, use_cache=False)
        del out
    finally:
        for h in hooks:
            h.remove()
    layer_input = batch * length * hidden * torch.tensor([], dtype=dtype).element_size()
    return LayerActivations(per_layer, mlp, mlp_input[0], outside, layer_input, hidden_16bit)


def _decoder(model):
    """The transformers decoder stack (`model.model` of a CausalLM), inside a peft wrapper or not."""
    lm = causal_lm(model)
    return getattr(lm, lm.base_model_prefix, lm)

"""Long-row memory savers that wrap a model's modules: tiled MLPs, activation offloading, per-layer compile.

* Tiled MLP (the TiledMLP idea of Arctic Long Sequence Training): a decoder layer's MLP expands each
  position to the intermediate size (2-3 tensors of L × I, I ≈ 3-4 × hidden). Computed over tiles of
  `tile` positions, each tile under its own checkpoint, only one tile's intermediate exists at a time, in
  forward and in backward (which recomputes the tile). Position-wise, so the result is the same.
* Activation offloading: tensors autograd saves in forward go to pinned host memory and come back for
  backward (`torch.autograd.graph.save_on_cpu`); with gradient checkpointing that is each layer's input.
* torch.compile per decoder layer; the attention function stays eager (it loops over samples and
  exchanges over the sequence-parallel group).
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint


def decoder_layers(model) -> list[torch.nn.Module]:
    """The modules that hold both an `mlp` and a `self_attn`: a transformers decoder layer."""
    return [m for m in model.modules() if isinstance(getattr(m, "mlp", None), torch.nn.Module) and hasattr(m, "self_attn")]


def mlp_modules(model) -> list[torch.nn.Module]:
    """Each decoder layer's MLP."""
    return [layer.mlp for layer in decoder_layers(model)]


def tile_mlps(model, tile: int) -> int:
    """Run every decoder MLP over sequence tiles of `tile` positions; returns how many MLPs were tiled."""
    mlps = mlp_modules(model)
    for mlp in mlps:
        mlp.forward = functools.partial(_tiled_forward, mlp.forward, tile)
    return len(mlps)


def _tiled_forward(forward, tile: int, x: torch.Tensor) -> torch.Tensor:
    if x.shape[-2] <= tile:
        return forward(x)
    parts = x.split(tile, dim=-2)
    if torch.is_grad_enabled():  # keep only each tile's input; recompute its intermediate in backward
        return torch.cat([checkpoint(forward, p, use_reentrant=False) for p in parts], dim=-2)
    return torch.cat([forward(p) for p in parts], dim=-2)


def offload_activations(model, pin_memory: bool = True) -> None:
    """Wrap the model's forward so that what autograd saves during it lives in host memory until backward."""
    inner = model.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        with torch.autograd.graph.save_on_cpu(pin_memory=pin_memory):
            return inner(*args, **kwargs)

    model.forward = forward


def compile_layers(model) -> int:
    """`torch.compile` each decoder layer in place (before sharding wraps them, as torchtitan does)."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile()
    return len(layers)

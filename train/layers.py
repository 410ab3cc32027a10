"""Which modules are a model's decoder layers, and which frozen weights sit outside them.

Both sharded backends split a model the same way (docs/design.md §3): each decoder layer is gathered on its
own, and under LoRA the frozen weights outside the layers (embeddings, final norm, LM head) are kept
whole on every rank instead of sharded. Those are needed at the very start and the very end of the
forward and again at the start of backward, so a sharded copy is gathered whole for most of the step
anyway; sharding them only adds the shard and the gather's buffers to the peak — on a 500M model with
a 49k vocabulary, 0.1-0.2 × the model's size on every rank. Frozen, they need no gradient reduction and
no optimizer state.
"""

from __future__ import annotations

from train.sharding_config import FSDPConfigError


def decoder_layer_classes(model, names: tuple[str, ...]) -> tuple[type, ...]:
    """Module classes to shard individually: the named ones, else the model's `_no_split_modules`."""
    wanted = set(names) or set(getattr(model, "_no_split_modules", None) or [])
    if not wanted:
        wanted = {type(m).__name__ for m in model.modules() if type(m).__name__.endswith("DecoderLayer")}
    found = {type(m) for m in model.modules() if type(m).__name__ in wanted}
    missing = wanted - {c.__name__ for c in found}
    if names and missing:
        raise FSDPConfigError(f"--fsdp_transformer_layer_cls_to_wrap: no module of class {sorted(missing)} in the model "
                              f"(decoder layers here: {sorted({type(m).__name__ for m in model.modules() if 'Layer' in type(m).__name__})})")
    if not found:
        raise FSDPConfigError("cannot detect the decoder layer class; pass --fsdp_transformer_layer_cls_to_wrap")
    return tuple(found)


def replicated_frozen_params(model, units: list) -> set:
    """Frozen parameters outside the per-layer `units` (a LoRA run's embeddings, final norm, LM head):
    the ones kept whole on every rank. Empty for a full fine-tune."""
    in_units = {id(p) for unit in units for p in unit.parameters()}
    return {p for p in model.parameters() if not p.requires_grad and id(p) not in in_units}

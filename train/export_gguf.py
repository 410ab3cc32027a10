"""Export what training wrote to one GGUF file for llama.cpp, Ollama and LM Studio, tensor by tensor.

The source is read one tensor at a time (train/export_sources.py). The file (`write_gguf`) carries the hyperparameters, every tensor in the requested type, the tokenizer
(train/gguf_vocab.py) and the training template as `tokenizer.chat_template` (the same Jinja the HF export
carries, so other runtimes build training's prompt ids). Nothing holds the whole model: the header is written
from the tensors' shapes, then each tensor is read, converted and appended, so peak memory is the largest
tensor a few times over, not the model.

Types: f32, f16 and bf16 convert every matrix and keep 1-D tensors (norms, biases) in f32, as llama.cpp's own
converter does. q8_0 quantizes every matrix whose rows divide into 32-value blocks (others stay f16). q4_0 does
the same at 4 bits but keeps the token embedding and the output matrix at q8_0: they are the most sensitive to
quantization, and llama.cpp's quantizer also keeps them above 4 bits.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import torch

from train.export_sources import ExportError, Source
from train.gguf_arch import add_metadata, arch_spec, tensor_plan

Q = gguf.GGMLQuantizationType
OUTTYPES = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}


# --- writing ------------------------------------------------------------------------------------------

def tensor_type(gguf_name: str, shape: tuple[int, ...], outtype: str) -> gguf.GGMLQuantizationType:
    """The GGML type one tensor is stored in (see the module docstring)."""
    target = OUTTYPES[outtype][0]
    if len(shape) < 2 or target == Q.F32:
        return Q.F32
    if target in (Q.F16, Q.BF16):
        return target
    if shape[-1] % gguf.GGML_QUANT_SIZES[target][0]:
        return Q.F16
    if target == Q.Q4_0 and gguf_name in ("token_embd.weight", "output.weight"):
        return Q.Q8_0
    return target


def _convert(t: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    data = t.detach().float().contiguous().numpy()
    if qtype == Q.F32:
        return data
    if qtype == Q.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def _nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def write_gguf(source: Source, tokenizer, template: str, output: Path, outtype: str, name: str = "",
               pre: str | None = None, origin_gguf: str | None = None, progress: Callable[[str], None] | None = None
               ) -> Path:
    """Write `source` as one GGUF file at `output` (atomically: a temp file renamed at the end)."""
    from data.tokenize import end_of_turn, export_chat_template
    from train.gguf_vocab import build_vocab

    if outtype not in OUTTYPES:
        raise ExportError(f"--outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    cfg = source.weights.config
    spec = arch_spec(cfg)
    plan = tensor_plan(cfg, spec, source.weights.names)
    eot_ids, _ = end_of_turn(tokenizer, template)
    vocab = build_vocab(tokenizer, int(cfg.vocab_size), origin_gguf=origin_gguf, pre=pre, eot_ids=eot_ids)

    tmp = output.with_name(f".{output.name}.tmp")
    writer = gguf.GGUFWriter(tmp, spec.name)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        name = name or output.stem
        # transformers' GGUF loader takes a llama-architecture file named exactly "mistral" for a Mistral, which
        # gguf-py then cannot map; any other name loads
        writer.add_name(f"{name}-model" if name == "mistral" else name)
        ftype = OUTTYPES[outtype][1]
        writer.add_file_type(ftype)
        if outtype in ("q8_0", "q4_0"):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_metadata(writer, cfg, spec)
        vocab.add_to(writer)
        writer.add_chat_template(export_chat_template(template, tokenizer))
        types = []
        for hf, gname, _ in plan:
            shape = source.weights.shape(hf)
            qtype = tensor_type(gname, shape, outtype)
            types.append(qtype)
            if qtype in (Q.F32, Q.F16):
                writer.add_tensor_info(gname, shape, np.dtype(np.float32 if qtype == Q.F32 else np.float16),
                                       _nbytes(shape, qtype))
            else:
                byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
                writer.add_tensor_info(gname, byte_shape, np.dtype(np.uint8), _nbytes(shape, qtype), raw_dtype=qtype)
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for (hf, gname, transform), qtype in zip(plan, types):
            t = source.weights.load(hf)
            if transform is not None:
                t = transform(t)
            writer.write_tensor_data(_convert(t, qtype))
            del t
            if progress:
                progress(f"{gname} {qtype.name}")
        writer.close()
        os.replace(tmp, output)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return output

"""Which floating-point format a run computes in, chosen by what the hardware does natively.

`--bf16 True` (FastChat's flag) means: bf16 autocast where the device computes bf16 natively — a CUDA
GPU with bf16 (Ampere and newer), a CPU with AVX512-BF16 or AMX-BF16 (or Arm BF16). On a CPU without it,
bf16 matmuls are emulated and 10-20x slower than fp32 (docs/design.md §4), so the run computes in fp32 and
says so in one line; `--bf16 force` uses bf16 anyway. On a CUDA GPU without bf16 (T4, V100, RTX 20xx),
`--bf16 True` is an error that points to `--fp16 True`: fp16 autocast with dynamic loss scaling.
Master weights and optimizer state stay fp32 in every case (adapters too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 AVX512/AMX; Arm "bf16" feature


class PrecisionError(ValueError):
    pass


@dataclass(frozen=True)
class Precision:
    name: str  # "bf16" | "fp16" | "fp32"
    note: str = ""  # one line for the log when the choice differs from the flag's plain meaning

    @property
    def compute_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.name]

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return None if self.name == "fp32" else self.compute_dtype

    @property
    def loss_scaling(self) -> bool:
        return self.name == "fp16"


def cpu_flags() -> frozenset[str]:
    """CPU feature flags from /proc/cpuinfo (Linux, x86 `flags` / Arm `Features`); empty elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) at or above which bf16 matmuls run natively; below them oneDNN emulates
# bf16 even on a CPU that has the instructions. ATen's own cap (ATEN_CPU_CAPABILITY) below avx512 does the same
# for its bf16 kernels. Both are how one makes a fast CPU behave like an AVX2-only one (and how users cap it).
NATIVE_BF16_ONEDNN_ISAS = frozenset({"AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX10_1_512_AMX",
                                     "AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "ALL",
                                     "DEFAULT"})


def isa_capped_below_bf16(env: dict | None = None) -> str:
    """The environment variable that caps the CPU ISA below native bf16, or "" when none does."""
    import os

    env = os.environ if env is None else env
    onednn = env.get("ONEDNN_MAX_CPU_ISA", env.get("DNNL_MAX_CPU_ISA", "")).strip().upper()
    if onednn and onednn not in NATIVE_BF16_ONEDNN_ISAS:
        return f"ONEDNN_MAX_CPU_ISA={onednn}"
    aten = env.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    if aten in ("default", "avx2", "zvector", "vsx"):
        return f"ATEN_CPU_CAPABILITY={aten}"
    return ""


def parse_bf16_flag(value) -> str:
    """`--bf16` value → "true" | "false" | "force"."""
    low = str(value).strip().lower()
    if low in ("true", "1", "yes", "y"):
        return "true"
    if low in ("false", "0", "no", "n", "none", ""):
        return "false"
    if low == "force":
        return "force"
    raise PrecisionError(f"--bf16 expects True, False or force, got {value!r}")


def resolve_precision(bf16: str, fp16: bool, device: torch.device, flags: frozenset[str] | None = None,
                      cuda_bf16: bool | None = None, env: dict | None = None) -> Precision:
    """The precision a run computes in. `flags` / `cuda_bf16` / `env` default to this machine's (tests pass them)."""
    bf16 = parse_bf16_flag(bf16)
    if fp16 and bf16 != "false":
        raise PrecisionError("--fp16 and --bf16 are alternatives; pass one")
    if fp16:
        return Precision("fp16")
    if bf16 == "false":
        return Precision("fp32")
    if bf16 == "force":
        return Precision("bf16", "[precision] --bf16 force: bf16 autocast even where the device emulates it")
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported() if cuda_bf16 is None else cuda_bf16
        if not supported:
            name = torch.cuda.get_device_name(device) if cuda_bf16 is None else "this GPU"
            raise PrecisionError(f"--bf16 True: {name} has no bf16 support; use --fp16 True (fp16 with loss scaling)")
        return Precision("bf16")
    if device.type == "cpu":
        found = cpu_flags() if flags is None else flags
        if not (found & NATIVE_BF16_CPU_FLAGS):
            return Precision("fp32", "[precision] --bf16 True: this CPU has no native bf16 (no avx512_bf16/amx_bf16), "
                                     "where bf16 is 10-20x slower than fp32; computing in fp32 "
                                     "(--bf16 force to use bf16 anyway)")
        capped = isa_capped_below_bf16(env)
        if capped:
            return Precision("fp32", f"[precision] --bf16 True: {capped} caps this CPU below native bf16, where bf16 "
                                     "is 10-20x slower than fp32; computing in fp32 (--bf16 force to use bf16 anyway)")
    return Precision("bf16")

"""The CPU probe: one reader of /proc/cpuinfo for the instruction-set flags and the model name, and the keys that
compiled or measured code is valid for (:func:`isa_key`, :func:`cpu_key`)."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from pathlib import Path

import torch

VNNI = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
NATIVE_BF16 = frozenset({"amx_bf16", "avx512_bf16"})


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """/proc/cpuinfo's fields, ``{name: first value}`` (empty without the file). Read once: the CPU does not
    change under a running process. The whole file, not the first processor's block: some ARM kernels give
    ``Features`` only in a later one."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            fields.setdefault(name.strip(), value.strip())
    return fields


def bf16_is_native() -> bool:
    """Whether this CPU computes bf16 convolutions natively (AVX-512 BF16 or AMX), as oneDNN reports it."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_features() -> frozenset[str]:
    """The CPU's instruction-set flags as Linux names them (``avx2``, ``fma``, ``avx512f``, ``avx512_vnni``,
    ``amx_bf16`` ...). ``FCNSEG_CPU_FEATURES`` (comma- or space-separated) overrides the probe: to ask what
    ``auto`` would pick elsewhere, and in tests. Without /proc/cpuinfo, what torch reports stands in."""
    override = os.environ.get("FCNSEG_CPU_FEATURES")
    if override is not None:
        return frozenset(override.replace(",", " ").lower().split())
    info = _cpuinfo()
    flags = info.get("flags", info.get("Features"))  # x86 names them flags, ARM Features
    if flags is not None:
        return frozenset(flags.split())
    capability = torch.backends.cpu.get_cpu_capability()
    guessed = {"AVX2": {"avx2", "fma"}, "AVX512": {"avx2", "fma", "avx512f"}}.get(capability, set())
    return frozenset(guessed | ({"avx512_bf16"} if bf16_is_native() else set()))


def cpu_model_name() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (platform's processor name elsewhere)."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def _isa() -> str:
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "")
    return f"{torch.backends.cpu.get_cpu_capability()}{'/' + isa if isa else ''}"


def isa_key() -> str:
    """The CPU and the instruction sets torch and oneDNN may use on it (``ATEN_CPU_CAPABILITY``,
    ``ONEDNN_MAX_CPU_ISA``), with torch's version: what compiled or measured code is only valid for."""
    return f"{cpu_model_name()} | {_isa()} | torch {torch.__version__}"


def cpu_key() -> str:
    """What a measured kernel choice depends on besides the layer: :func:`isa_key` and the thread count."""
    return f"{cpu_model_name()} | {_isa()} | {torch.get_num_threads()} threads | torch {torch.__version__}"

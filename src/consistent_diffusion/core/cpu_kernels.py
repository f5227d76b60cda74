"""The same numbers on every x86-64 CPU: pin torch's CPU kernels to one instruction set (AVX2).

torch chooses its vectorised ATen kernels, its oneDNN convolutions and MKL's matrix products by
the widest instruction set the CPU has, so an AVX-512 machine rounds a few values differently from
an AVX2 one. Measured on the bench's cricket plain cell (8 images, fp16 metric heads): an AVX-512
CPU's images differ from an AVX2 machine's by 1 level in 0.05% of pixels, and its scores by up to
4e-4; with ``ATEN_CPU_CAPABILITY=avx2`` and ``ONEDNN_MAX_CPU_ISA=AVX2`` every score is identical
(``MKL_CBWR=AVX2`` does the same for MKL on CPUs whose MKL path differs). The cost is speed on
AVX-512 CPUs, so only the bench pins (its committed report must reproduce on any machine); the
variables must be set before the process's first torch computation, and a value the user set wins.
"""

from __future__ import annotations

import os
import platform
import warnings
from collections.abc import MutableMapping

PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}
X86_64 = frozenset({"x86_64", "amd64"})


def pin_cpu_kernels(environ: MutableMapping[str, str] | None = None, machine: str | None = None) -> dict[str, str]:
    """Set every variable of ``PINNED`` that ``environ`` (default ``os.environ``) lacks, on x86-64
    only (the others have no such choice); returns the pinned variables as they now stand."""
    environ = os.environ if environ is None else environ
    if (machine or platform.machine()).lower() not in X86_64:
        return {}
    for name, value in PINNED.items():
        environ.setdefault(name, value)
    return {name: environ[name] for name in PINNED}


def check_pinned(pinned: dict[str, str]) -> str | None:
    """Warn (and return the warning) when torch chose its ATen kernels before ``pin_cpu_kernels``
    ran in this process, so the pin cannot take effect."""
    wanted = pinned.get("ATEN_CPU_CAPABILITY", "").upper()
    if not wanted or wanted == "AVX512":
        return None
    import torch

    chosen = torch.backends.cpu.get_cpu_capability().upper()
    if chosen != "AVX512":
        return None
    message = (f"torch already runs {chosen} CPU kernels in this process (pinned: {wanted}); its numbers "
               "will not match other CPUs bit for bit: start the bench in a fresh process")
    warnings.warn(message, stacklevel=2)
    return message


def cpu_kernels_label(environ: MutableMapping[str, str] | None = None) -> str:
    """The pins in force, 'ATEN_CPU_CAPABILITY=avx2, ...' for a manifest, or 'native'."""
    environ = os.environ if environ is None else environ
    pinned = [f"{name}={environ[name]}" for name in PINNED if name in environ]
    return ", ".join(pinned) if pinned else "native"

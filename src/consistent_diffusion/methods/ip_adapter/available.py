"""Which IP-Adapters a loaded pipeline can take now, for choosers (the web app's image prompt).

``available_adapters(pipe, folders)`` tries the embedded model's own adapters by name
(``EMBEDDED_ADAPTERS``, resolved as the method resolves them: ``embedded.resolve_embedded``, also
for a ``train ip-adapter`` folder) and the user's released-layout folders or weight files; it keeps those that resolve for
the pipeline's family (``sdxl_models/`` or ``models/``) and whose decoupled key/value projections
``W'_k, W'_v`` (inner, C) read the pipeline's cross-attention width C. With none it says why, in
one line. Nothing is loaded but a safetensors header.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from consistent_diffusion.core.errors import ConsistentDiffusionError
from consistent_diffusion.methods.ip_adapter.embedded import read_meta, resolve_embedded, shipped_folder
from consistent_diffusion.methods.ip_adapter.loading import is_sdxl, resolve_adapter

# The embedded model's own adapters (issue #28: style only, subject only), by the names
# ``resolve_adapter`` takes once they ship.
EMBEDDED_ADAPTERS = ("embedded-style", "embedded-subject")


@dataclass(frozen=True)
class AvailableAdapters:
    """names: what ``IPAdapter(adapters=...)`` takes (a shipped name or a path), in the order tried;
    reason: why there is none (one line), "" when there are some."""

    names: tuple[str, ...]
    reason: str = ""


def cross_attention_width(weights: str) -> int | None:
    """C of the first ``ip_adapter.*.to_k_ip.weight`` (inner, C) in a ``.safetensors`` file (header
    only); None for ``.bin`` files or when it cannot be read (loading then says what is wrong)."""
    if not weights.endswith(".safetensors"):
        return None
    try:
        from safetensors import safe_open

        with safe_open(weights, framework="pt") as handle:
            key = next((k for k in handle.keys() if k.endswith("to_k_ip.weight")), None)  # noqa: SIM118
            return None if key is None else int(handle.get_slice(key).get_shape()[1])
    except Exception:  # a corrupt file is reported when it is loaded
        return None


def unfit_reason(candidate: str, pipe: Any) -> str | None:
    """Why ``candidate`` cannot be used with ``pipe`` (one line), or None when it can."""
    try:
        embedded = resolve_embedded(candidate)  # a shipped name or a `train ip-adapter` folder
        weights = str(embedded) if embedded is not None else resolve_adapter(candidate, is_sdxl(pipe)).weights
    except ConsistentDiffusionError as error:
        return str(error).splitlines()[0]
    width, wanted = cross_attention_width(weights), int(pipe.unet.config.cross_attention_dim)
    if width is not None and width != wanted:
        return f"made for cross-attention width {width}, this model's is {wanted}"
    return None


def available_adapters(pipe: Any, folders: Sequence[str] = ()) -> AvailableAdapters:
    """The adapters ``pipe`` can take among the embedded model's own and ``folders`` (see module doc)."""
    names, refused = [], []
    for candidate in (*EMBEDDED_ADAPTERS, *(str(f) for f in folders)):
        why = unfit_reason(candidate, pipe)
        if why is None:
            names.append(candidate)
        elif candidate not in EMBEDDED_ADAPTERS:  # the embedded model's own: the reason below
            refused.append(f"{candidate}: {why}")
    if names:
        return AvailableAdapters(tuple(names))
    if refused:
        return AvailableAdapters((), "no IP-Adapter fits this model (" + "; ".join(refused) + ")")
    installed = any(read_meta(shipped_folder(name)) is not None for name in EMBEDDED_ADAPTERS)
    embedded = ("the embedded model's own fit only the embedded model" if installed else
                f"the embedded model's own ({', '.join(EMBEDDED_ADAPTERS)}) are not installed")
    return AvailableAdapters((), f"no IP-Adapter for this model: {embedded}; give a folder in the released layout "
                                 "(models/ or sdxl_models/ with image_encoder/)")

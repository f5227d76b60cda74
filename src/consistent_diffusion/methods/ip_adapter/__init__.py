"""IP-Adapter (Ye et al. 2023) and InstantStyle (Wang et al. 2024) over diffusers' own loader.

- ``loading``: the released folder layout (weights file + ``image_encoder/``), offline loading,
  and ``installed_adapters``: load into a pipeline for one call, keep other methods' processors
  (re-wrapped around the IP processors), restore the pipeline exactly on exit.
- ``method``: ``IPAdapter`` (registered as ``ip_adapter``): scales or InstantStyle presets, one
  image for the series or one per row, region masks.
"""

from consistent_diffusion.methods.ip_adapter.loading import AdapterFiles, installed_adapters, resolve_adapter
from consistent_diffusion.methods.ip_adapter.method import INSTANTSTYLE_PRESETS, IPAdapter

__all__ = ["INSTANTSTYLE_PRESETS", "AdapterFiles", "IPAdapter", "installed_adapters", "resolve_adapter"]

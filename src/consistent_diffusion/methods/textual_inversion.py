"""Textual inversion: use learned token embeddings (Gal et al. 2023) for one call, on any pipeline.

Reads diffusers' format ({token: (n, dim)} in ``learned_embeds.safetensors``/``.bin``, what
``train textual-inversion`` writes, what diffusers' example script writes) and A1111's
(``string_to_param``). A (n, dim) entry is n vectors behind ``token``, ``token_1`` ... ``token_{n-1}``,
as diffusers names them; the pipeline's own prompt conversion (``maybe_convert_prompt``) expands
``token`` in a prompt to all of them. SDXL: the folder's ``learned_embeds.safetensors`` goes to the
first encoder and ``learned_embeds_2.safetensors`` to the second (a single file with ``clip_l`` /
``clip_g`` entries is read too).

Reversible by construction: for the call the pipeline gets a copy of each tokenizer with the tokens
added, and each text encoder an input-embedding module with the new rows appended; on exit the
original tokenizer and embedding module are put back (the originals are never modified).
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from consistent_diffusion.core.errors import ConfigError, ConsistentDiffusionError
from consistent_diffusion.methods.base import GenerationContext, Method, register
from consistent_diffusion.methods.common import restoring
from consistent_diffusion.models.memory import changed_without_offload

FILE_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")
SECOND_FILE_NAMES = ("learned_embeds_2.safetensors", "learned_embeds_2.bin")
SDXL_KEYS = ("clip_l", "clip_g")


def _read(path: Path) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - name the unreadable file
        raise ConsistentDiffusionError(f"cannot read textual-inversion embeddings {path}: {error}") from None


def _find(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def read_embeddings(path: str | os.PathLike, token: str | None = None) -> tuple[str, list[torch.Tensor]]:
    """(token, [vectors (n, dim) per text encoder]) from a file or a folder (one entry per encoder
    present). ``token`` overrides the stored name (required for files that store none)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"textual-inversion embeddings not found: {path}")
    files = [path]
    if path.is_dir():
        first = _find(path, FILE_NAMES)
        if first is None:
            raise ConfigError(f"{path} holds no learned_embeds.safetensors/.bin (train one with `train textual-inversion`)")
        files = [first] + [p for p in [_find(path, SECOND_FILE_NAMES)] if p is not None]
    names, vectors = [], []
    for file in files:
        state = _read(file)
        if all(key in state for key in SDXL_KEYS):
            vectors += [state[k] for k in SDXL_KEYS]
            continue
        if "string_to_param" in state:  # A1111
            names.append(state.get("name"))
            vectors.append(next(iter(state["string_to_param"].values())))
        elif len(state) == 1:
            (name, tensor), = state.items()
            names.append(name)
            vectors.append(tensor)
        else:
            raise ConfigError(f"{file}: expected one {{token: tensor}} entry (diffusers), string_to_param (A1111) or "
                              f"clip_l/clip_g (SDXL), found keys {sorted(state)[:6]}")
    chosen = token or next((n for n in names if isinstance(n, str) and n), None)
    if not chosen:
        raise ConfigError(f"{path} stores no token name; give token='<my-token>'")
    return chosen, [v.detach().float().reshape(-1, v.shape[-1]) for v in vectors]


def token_names(token: str, count: int) -> list[str]:
    """``token``, ``token_1`` ... for ``count`` vectors (diffusers' naming)."""
    return [token] + [f"{token}_{i}" for i in range(1, count)]


@register("textual_inversion")
@dataclass(frozen=True)
class TextualInversion(Method):
    """Learned embeddings for the call. ``embeddings``: a folder or file (our ``train
    textual-inversion`` output, diffusers' or A1111's); ``token``: the word to use in prompts
    (default: the stored one)."""

    embeddings: str = ""
    token: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.embeddings, (str, os.PathLike)) or not str(self.embeddings):
            raise ConfigError("textual_inversion needs embeddings= (a folder or file of learned embeddings)")
        object.__setattr__(self, "embeddings", str(self.embeddings))
        if self.token is not None and (not isinstance(self.token, str) or not self.token.strip() or " " in self.token):
            raise ConfigError(f"token must be one word, got {self.token!r}")
        read_embeddings(self.embeddings, self.token)  # fail early: missing or unreadable

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "options": {"embeddings": os.path.abspath(self.embeddings), "token": self.token}}

    @contextlib.contextmanager
    def applied(self, ctx: GenerationContext) -> Iterator[GenerationContext]:
        token, vectors = read_embeddings(self.embeddings, self.token)
        pipe = ctx.pipe
        pairs = [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")]
        present = [(t, e) for t, e in pairs if getattr(pipe, t, None) is not None and getattr(pipe, e, None) is not None]
        if len(vectors) < len(present):
            raise ConfigError(f"{self.embeddings} has embeddings for {len(vectors)} text encoder(s); this pipeline has "
                              f"{len(present)} (SDXL needs learned_embeds.safetensors and learned_embeds_2.safetensors)")
        if not any(token in prompt for prompt in ctx.prompts):
            import warnings

            warnings.warn(f"textual_inversion: no prompt contains {token!r}; the embeddings change nothing",
                          UserWarning, stacklevel=3)
        with restoring(ctx), contextlib.ExitStack() as stack:
            for (tokenizer_name, encoder_name), rows in zip(present, vectors, strict=False):
                stack.enter_context(changed_without_offload(pipe, _tokens_added(pipe, tokenizer_name, encoder_name,
                                                                                 token, rows)))
            yield ctx


@contextlib.contextmanager
def _tokens_added(pipe: Any, tokenizer_name: str, encoder_name: str, token: str, vectors: torch.Tensor) -> Iterator[None]:
    """For the block: ``pipe.<tokenizer_name>`` is a copy with ``token``'s names added and the
    encoder's input embeddings a module with the vectors appended; the originals come back on exit."""
    tokenizer, encoder = getattr(pipe, tokenizer_name), getattr(pipe, encoder_name)
    embedding = encoder.get_input_embeddings()
    names = token_names(token, vectors.shape[0])
    if vectors.shape[-1] != embedding.weight.shape[-1]:
        raise ConfigError(f"the {token!r} embeddings have {vectors.shape[-1]} dimensions; {encoder_name} has "
                          f"{embedding.weight.shape[-1]} (trained for another model?)")
    known = [n for n in names if n in tokenizer.get_vocab()]
    if known:
        raise ConfigError(f"the tokenizer already knows {known}; load these embeddings under another token=")
    widened = copy.deepcopy(tokenizer)
    widened.add_tokens(names)
    ids = widened.convert_tokens_to_ids(names)
    rows = max(embedding.weight.shape[0], max(ids) + 1)
    grown = nn.Embedding(rows, embedding.weight.shape[-1], device=embedding.weight.device,
                         dtype=embedding.weight.dtype)
    with torch.no_grad():
        grown.weight[: embedding.weight.shape[0]] = embedding.weight
        grown.weight[ids] = vectors.to(grown.weight)
    grown.requires_grad_(False)
    try:
        setattr(pipe, tokenizer_name, widened)
        encoder.set_input_embeddings(grown)
        yield
    finally:
        encoder.set_input_embeddings(embedding)
        setattr(pipe, tokenizer_name, tokenizer)

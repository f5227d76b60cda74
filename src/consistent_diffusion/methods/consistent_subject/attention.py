"""Subject-driven shared self-attention (ConsiStory, Tewel et al. 2024, sec. 3.2) and its UNet hooks.

In the shared self-attention layers (up blocks by default), image i attends to its own tokens and
to the anchors' tokens inside their subject masks (the paper's ``K+ = [K_i ; K_a1 ; ...]`` with the
additive ``log M+`` bias: 0 where visible, -inf elsewhere), every anchor's mask thinned by dropout
each step (``masks.keep_mask``). Anchors see the other anchors; other images see only the anchors,
so the cost is linear in the batch: each image attends to (1 + anchors) x tokens keys. The
unconditional half shares with the same masks, its own half's keys (as the reference).

``mode="story"`` is StoryDiffusion's consistent self-attention (Zhou et al. 2024): the anchors'
tokens are shared by random sampling (rate ``sample_rate``, redrawn every step) instead of subject
masks, so no cross-attention is recorded.

Vanilla queries (paper sec. 3.3, "layout diversity"): over the first tenth of the steps, the shared
layers' queries are blended ``q = s q_vanilla + (1 - s) q`` with ``s`` falling 0.9 -> 0.1 over the
run (the reference's ``linspace(0.9, 0.1, steps)``), ``q_vanilla`` taken from an extra UNet pass at
the same step with sharing off (a forward pre-hook on the UNet runs it).

Hooks (``installed_subject_sharing``): a ``SubjectAttentionProcessor`` over every self-attention
processor in the shared parts, a ``SubjectMapRecorder`` over every cross-attention processor, and a
UNet forward pre-hook that counts steps, turns recorded maps into masks and runs the vanilla pass.
All are removed on exit, even on error; with ``share=False`` the processors are pass-throughs.

Layout inside a layer: (groups, rows, tokens, channels), groups 2 with classifier-free guidance
(unconditional half first) and 1 without; this method's n rows are the last n of each half (rows
another method prepended later, e.g. StyleAligned's reference, sit in front and are not shared).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from consistent_diffusion.methods.common import unet_part
from consistent_diffusion.methods.consistent_subject import masks as masking


@dataclass
class SubjectState:
    """Per-call facts the hooks share. Rows are this method's view of the batch (0..n-1)."""

    n: int  # this method's rows per CFG half
    groups: int  # 2 with classifier-free guidance, else 1
    anchors: list[int]  # rows whose subject tokens the others see
    positions: list[list[int]]  # subject token positions per row (empty: no subject)
    steps: int  # denoising steps of the call
    mode: str = "subject"  # subject | story
    share: bool = True  # False: every hook passes through (stock output)
    dropout: float = 0.5
    sample_rate: float = 0.5
    seed: int = 0
    window: int = 20  # steps averaged for the masks
    blend_steps: int = 0  # steps (from 1) whose shared queries are blended with vanilla ones
    map_level: int = 2  # down-sampling level of the cross-attention layers that make the masks
    share_levels: set[int] = field(default_factory=set)  # levels of the shared self-attention layers
    attention_levels: set[int] = field(default_factory=set)  # levels of every self-attention layer
    latent_size: tuple[int, int] = (0, 0)
    train_timesteps: int = 1000
    step: int = -1
    timestep: float | None = None  # of the current step
    in_vanilla_pass: bool = False
    layer_maps: list[torch.Tensor] = field(default_factory=list)  # this step's (n, hw) maps, one per layer
    step_maps: list[torch.Tensor] = field(default_factory=list)  # each past step's mean map
    masks: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # grid -> (n, hw) bool, no dropout
    visible: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # grid -> (anchors, hw) bool
    queries: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> vanilla query of this step

    def grid(self, level: int) -> tuple[int, int]:
        """Token grid (h, w) of a layer ``level`` down-samplings below the latent (ceil halving)."""
        h, w = self.latent_size
        for _ in range(level):
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        return h, w

    def sharing_now(self) -> bool:
        """Shared attention runs from step 1 (step 0 has no mask yet) in the main pass."""
        if not self.share or self.in_vanilla_pass or self.step < 1:
            return False
        return self.mode == "story" or bool(self.visible)

    def final_masks(self, grids: Sequence[tuple[int, int]]) -> dict[tuple[int, int], torch.Tensor]:
        """Masks (no dropout) from the last ``window`` steps including the current one: what the
        first pass leaves for feature injection."""
        maps = self.step_maps + ([torch.stack(self.layer_maps).mean(dim=0)] if self.layer_maps else [])
        if not maps:
            return {tuple(g): torch.zeros(self.n, g[0] * g[1], dtype=torch.bool) for g in grids}
        mean = torch.stack(maps[-self.window:]).mean(dim=0)
        return masking.masks_from_maps(mean, self.grid(self.map_level), grids)

    def blend_strength(self) -> float | None:
        """Weight of the vanilla query at this step, or None outside the blend steps."""
        if not self.blend_steps or not 1 <= self.step <= self.blend_steps:
            return None
        return 0.9 - 0.8 * self.step / max(1, self.steps - 1)


def layer_level(name: str, down_blocks: int, up_blocks: int) -> int | None:
    """Down-sampling level of a UNet processor from its name (``down_blocks.i`` -> i, ``mid_block`` ->
    down_blocks - 1, ``up_blocks.i`` -> up_blocks - 1 - i); None for other names."""
    parts = name.split(".")
    if parts[0] == "down_blocks":
        return int(parts[1])
    if parts[0] == "mid_block":
        return down_blocks - 1
    if parts[0] == "up_blocks":
        return up_blocks - 1 - int(parts[1])
    return None


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., tokens, heads * dim) -> (..., heads, tokens, dim)."""
    return x.unflatten(-1, (heads, -1)).transpose(-3, -2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(..., heads, tokens, dim) -> (..., tokens, heads * dim)."""
    return x.transpose(-3, -2).flatten(-2)


def _rest(temb: torch.Tensor | None, args: tuple) -> tuple:
    """The positional arguments after ``attention_mask`` to pass on: none when there are none, so an
    inner processor without ``temb`` (diffusers' ``SlicedAttnProcessor``, attention slicing) works."""
    return (temb, *args) if temb is not None or args else ()


class SubjectMapRecorder:
    """Cross-attention processor that leaves the output to ``inner`` and, at the mask level in the
    main pass, records the subject map of this method's conditional rows (``masks.subject_map``)."""

    def __init__(self, state: SubjectState, inner: Any, level: int | None) -> None:
        self.state, self.inner, self.level = state, inner, level

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        s = self.state
        if (s.share and s.mode == "subject" and not s.in_vanilla_pass and encoder_hidden_states is not None
                and self.level == s.map_level and hidden_states.ndim == 3):
            self._record(attn, hidden_states, encoder_hidden_states)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *_rest(temb, args), **kwargs)

    @torch.no_grad()
    def _record(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor) -> None:
        s = self.state
        batch = hidden_states.shape[0]
        if batch % s.groups or batch // s.groups < s.n:
            return
        rows = slice(batch - s.n, batch)  # this method's rows of the conditional (last) half
        text = encoder_hidden_states[rows]
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)
        query, key = attn.to_q(hidden_states[rows]), attn.to_k(text)
        if attn.norm_q is not None:
            query = _merge_heads(attn.norm_q(_split_heads(query, attn.heads)))
        if attn.norm_k is not None:
            key = _merge_heads(attn.norm_k(_split_heads(key, attn.heads)))
        logits = _split_heads(query, attn.heads).float() @ _split_heads(key, attn.heads).float().transpose(-1, -2)
        probs = (logits * attn.scale).softmax(dim=-1)  # (n, heads, hw, L)
        s.layer_maps.append(masking.subject_map(probs, s.positions))


class SubjectAttentionProcessor:
    """Self-attention processor with subject-driven sharing; same call signature as diffusers'
    ``AttnProcessor2_0``. Outside sharing it delegates to ``inner`` (bit-for-bit stock)."""

    def __init__(self, state: SubjectState, inner: Any, name: str, level: int | None) -> None:
        self.state, self.inner, self.name, self.level = state, inner, name, level

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        s = self.state
        usable = (encoder_hidden_states is None and attention_mask is None and hidden_states.ndim == 3
                  and self.level in s.share_levels and hidden_states.shape[0] % s.groups == 0
                  and hidden_states.shape[0] // s.groups >= s.n)
        if usable and s.in_vanilla_pass and s.blend_strength() is not None:
            self.blended_query(attn, attn.to_q(hidden_states))  # caches the vanilla query
        if not usable or not s.sharing_now():
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *_rest(temb, args), **kwargs)
        return self._shared(attn, hidden_states)

    # -- the parts another sharing processor (StyleAligned's) can reuse --------------------------

    def blended_query(self, attn: Any, query: torch.Tensor) -> torch.Tensor:
        """``s q_vanilla + (1 - s) q`` at the blend steps (paper sec. 3.3), else ``query``. (B, T, C).
        In the vanilla pass it stores ``query`` as this step's vanilla query and returns it."""
        strength = self.state.blend_strength()
        if self.state.in_vanilla_pass:
            if strength is not None:
                self.state.queries[self.name] = query.detach()
            return query
        vanilla = self.state.queries.get(self.name)
        if strength is None or vanilla is None or vanilla.shape != query.shape:
            return query
        return strength * vanilla.to(query.dtype) + (1 - strength) * query

    def key_blocks(self, key: torch.Tensor, value: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The anchors' keys/values every row may also attend to, with their additive bias.

        key/value: (groups, rows, tokens, channels), this method's rows last. Returns
        [(keys (groups, rows, A*tokens, C), values, bias (1, rows, 1, A*tokens))] or [] when not
        sharing now: bias 0 where the row may see the anchor's token, -inf elsewhere (an anchor
        never sees its own copy; rows in front of this method's see nothing)."""
        s = self.state
        if not s.sharing_now() or not s.anchors:
            return []
        groups, rows, tokens, channels = key.shape
        offset = rows - s.n
        anchor_rows = [offset + a for a in s.anchors]
        visible = self._visible(tokens)  # (A, tokens) bool
        if visible is None:
            return []
        shared_k = key[:, anchor_rows].reshape(groups, 1, -1, channels).expand(groups, rows, -1, -1)
        shared_v = value[:, anchor_rows].reshape(groups, 1, -1, value.shape[-1]).expand(groups, rows, -1, -1)
        allowed = visible.unsqueeze(0).expand(rows, -1, -1).clone()  # (rows, A, tokens)
        allowed[:offset] = False
        for j, row in enumerate(anchor_rows):
            allowed[row, j] = False  # its own tokens are already among its keys
        bias = torch.zeros(allowed.shape, dtype=key.dtype, device=key.device)
        bias.masked_fill_(~allowed.to(key.device), float("-inf"))
        return [(shared_k, shared_v, bias.reshape(1, rows, 1, -1))]

    def _visible(self, tokens: int) -> torch.Tensor | None:
        """(A, tokens) bool: which tokens of each anchor the others see at this layer's grid."""
        s = self.state
        grid = s.grid(self.level)
        if grid[0] * grid[1] != tokens:
            return None
        if s.mode == "story":
            return torch.stack([masking.sampled_tokens(tokens, s.sample_rate, s.seed, s.step, grid, j)
                                for j in range(len(s.anchors))])
        return s.visible.get(grid)

    # -- this processor's own shared attention ----------------------------------------------------

    def _shared(self, attn: Any, hidden_states: torch.Tensor) -> torch.Tensor:
        s = self.state
        residual = hidden_states
        batch, tokens, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = self.blended_query(attn, attn.to_q(hidden_states))
        key, value = attn.to_k(hidden_states), attn.to_v(hidden_states)
        if attn.norm_q is not None:
            query = _merge_heads(attn.norm_q(_split_heads(query, attn.heads)))
        if attn.norm_k is not None:
            key = _merge_heads(attn.norm_k(_split_heads(key, attn.heads)))
        rows = batch // s.groups
        q, k, v = (x.reshape(s.groups, rows, tokens, -1) for x in (query, key, value))
        out = extended_attention(q, k, v, self.key_blocks(k, v), heads=attn.heads, scale=attn.scale)
        hidden_states = attn.to_out[1](attn.to_out[0](out.reshape(batch, tokens, -1).to(query.dtype)))
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def extended_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    blocks: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    heads: int, scale: float | None = None, own_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(Q [K ; K_1 ; ...]^T / sqrt(d) + [b_0 ; b_1 ; ...]) [V ; V_1 ; ...] per row, in one call.

    q, k, v: (groups, rows, tokens, C); blocks: extra (keys, values, bias) with keys/values
    (groups, rows, T_b, C) and bias broadcastable to (groups, rows, 1, T_b) (None: 0); own_bias
    likewise for the row's own keys. Returns (groups, rows, tokens, C)."""
    groups, rows, tokens, _ = q.shape
    keys = torch.cat([k, *(b[0] for b in blocks)], dim=2)
    values = torch.cat([v, *(b[1] for b in blocks)], dim=2)
    mask = None
    if blocks or own_bias is not None:
        parts = [own_bias if own_bias is not None else torch.zeros(1, 1, 1, tokens, dtype=q.dtype, device=q.device)]
        for block_keys, _, bias in blocks:
            parts.append(bias if bias is not None else torch.zeros(1, 1, 1, block_keys.shape[2], dtype=q.dtype, device=q.device))
        mask = torch.cat([p.to(q.dtype).expand(groups, rows, 1, p.shape[-1]) for p in parts], dim=-1)
        mask = mask.flatten(0, 1).unsqueeze(1)  # (groups * rows, 1, 1, keys): every head, every query

    def heads_of(x: torch.Tensor) -> torch.Tensor:  # (g, r, n, c) -> (g * r, heads, n, c / heads)
        return _split_heads(x.flatten(0, 1), heads)

    out = F.scaled_dot_product_attention(heads_of(q), heads_of(keys), heads_of(values), attn_mask=mask, scale=scale)
    return _merge_heads(out).unflatten(0, (groups, rows))


def _step_hook(state: SubjectState) -> Any:
    """UNet forward pre-hook: each main call is one denoising step. It closes the previous step's
    maps, makes this step's masks (and the anchors' visible patches), and at the blend steps runs the
    vanilla pass that caches the shared layers' queries."""

    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        if state.in_vanilla_pass:
            return None
        sample = args[0] if args else kwargs["sample"]
        state.latent_size = (int(sample.shape[-2]), int(sample.shape[-1]))
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        state.timestep = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else timestep
        if state.layer_maps:
            state.step_maps.append(torch.stack(state.layer_maps).mean(dim=0))
            state.layer_maps = []
        state.step += 1
        state.queries = {}
        if state.share and state.mode == "subject" and state.step >= 1 and state.step_maps:
            _update_masks(state)
        if state.share and state.blend_strength() is not None:
            state.in_vanilla_pass = True
            try:
                with torch.no_grad():
                    module.forward(*args, **kwargs)
            finally:
                state.in_vanilla_pass = False
        return None

    return hook


def _update_masks(state: SubjectState) -> None:
    """Masks from the mean map of the last ``window`` steps at every shared grid; anchors' visible
    patches with this step's dropout."""
    maps = torch.stack(state.step_maps[-state.window:]).mean(dim=0)  # (n, hw)
    grids = sorted({state.grid(level) for level in state.share_levels})
    state.masks = masking.masks_from_maps(maps, state.grid(state.map_level), grids)
    state.visible = {
        grid: torch.stack([masking.keep_mask(mask[a], state.dropout, state.seed, state.step, grid, j)
                           for j, a in enumerate(state.anchors)])
        for grid, mask in state.masks.items()
    }


@contextlib.contextmanager
def installed_subject_sharing(unet: Any, state: SubjectState, parts: Sequence[str]) -> Iterator[SubjectState]:
    """Install the sharing processors (self-attention in ``parts``), the map recorders (every
    cross-attention) and the step hook on ``unet``; restore the previous processors and remove the
    hook on exit, even on error. Layers someone else replaced meanwhile are left as found (warning)."""
    previous = dict(unet.attn_processors)
    down, up = len(unet.down_blocks), len(unet.up_blocks)
    installed: dict[str, Any] = {}
    for name, processor in previous.items():
        level = layer_level(name, down, up)
        if name.endswith("attn1.processor") and level is not None:
            state.attention_levels.add(level)
        if name.endswith("attn1.processor") and unet_part(name) in parts:
            installed[name] = SubjectAttentionProcessor(state, processor, name, level)
            state.share_levels.add(level)
        elif name.endswith("attn2.processor"):
            installed[name] = SubjectMapRecorder(state, processor, level)
        else:
            installed[name] = processor
    handle = None
    try:
        unet.set_attn_processor(dict(installed))
        handle = unet.register_forward_pre_hook(_step_hook(state), with_kwargs=True)
        yield state
    finally:
        if handle is not None:
            handle.remove()
        current = unet.attn_processors
        restore, replaced = {}, []
        for name, processor in current.items():
            if name in previous and processor is installed.get(name):
                restore[name] = previous[name]
            else:
                restore[name] = processor
                if isinstance(installed.get(name), (SubjectAttentionProcessor, SubjectMapRecorder)):
                    replaced.append(name)
        unet.set_attn_processor(restore)
        if replaced:
            warnings.warn(f"consistent_subject: {len(replaced)} attention processors were replaced while it was "
                          "active; they were left as found", UserWarning, stacklevel=3)


def cross_attention_levels(unet: Any) -> list[int]:
    """Down-sampling levels that have cross-attention layers."""
    down, up = len(unet.down_blocks), len(unet.up_blocks)
    return sorted({layer_level(n, down, up) for n in unet.attn_processors if n.endswith("attn2.processor")} - {None})


MIN_MAP_SIDE = 16  # the coarsest subject-map grid: 8x8 maps do not localise the subject (docs/consistent_subject_diagnosis.md)


def choose_map_level(unet: Any, latent_size: tuple[int, int]) -> int:
    """The level whose grid's short side is nearest max(16, short latent side / 4): SDXL at 1024 px ->
    32x32 (the reference's), SD 1.5 at 512 -> 16x16, the embedded model (16x16 latents) -> 16x16
    (ties: the finer). On the embedded model the 8x8 maps' masks mark the border, not the subject
    (IoU 0.14 with the anchor's foreground; 16x16: 0.66), chosen on the tuning suite's subjects."""
    levels = cross_attention_levels(unet)
    if not levels:
        return 0
    short = min(latent_size)
    target = max(float(MIN_MAP_SIDE), short / 4)
    return min(levels, key=lambda level: (abs(math.ceil(short / 2**level) - target), level))

"""StyleAligned's math and its UNet hooks: AdaIN, shared attention, shared group norm (Hertz et al. 2023).

- ``calc_mean_std`` / ``adain``: AdaIN (Huang & Belongie 2017), as StyleAligned uses it (section 3):
  ``adain(x, y) = sigma(y) * (x - mu(x)) / sigma(x) + mu(y)``, statistics per channel over the token
  axis of (..., tokens, channels) features.
- ``shared_attention``: the paper's shared attention (section 3), on (groups, per, tokens, channels)
  tensors whose row 0 of each group is the reference: with ``Q^_i = AdaIN(Q_i, Q_ref)`` and
  ``K^_i = AdaIN(K_i, K_ref)``, every row attends to ``softmax(Q^_i [K_ref; K^_i]^T / sqrt(d)) [V_ref; V_i]``
  (here as [own; reference], the same attention up to the order of keys).
- ``shared_group_norm``: GroupNorm of each image with statistics pooled with the reference's,
  (B, C, ...) with B = groups * per_group.
- ``SharedAttentionProcessor``: a diffusers attention processor (``AttnProcessor2_0``'s signature)
  that applies ``shared_attention`` on self-attention layers; ``installed_sharing`` puts it (and the
  group-norm hooks) on a UNet and takes it off again.

Layout: ``groups`` is 2 with classifier-free guidance (unconditional half, conditional half) and 1
without; ``per`` (``per_group``) is the number of images per half; row 0 of each group is the reference.
The options (which parts are shared, how) come from a ``StyleAligned`` method, read through
``SharingOptions``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from consistent_diffusion.methods.common import unet_part


class SharingOptions(Protocol):
    """What the processors read from their method (``StyleAligned``'s fields of the same names)."""

    share_group_norm: bool
    share_attention: bool
    adain_queries: bool
    adain_keys: bool
    adain_values: bool
    shared_score_scale: float
    shared_score_shift: float
    only_self_level: float
    full_attention_share: bool
    min_shared_tokens: int
    share_parts: tuple[str, ...]


def calc_mean_std(feat: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over the token axis (-2) of (..., tokens, channels) features.

    Computed (in at least float32) as E[x^2] - E[x]^2 with plain means: torch's var over a non-last axis
    is ~8x slower on CPU, and attention features are O(1), far from cancellation trouble.
    """
    if feat.dtype in (torch.float16, torch.bfloat16):
        feat = feat.float()
    mean = feat.mean(dim=-2, keepdim=True)
    var = (feat * feat).mean(dim=-2, keepdim=True) - mean * mean
    return mean, (var.clamp_min(0) + eps).sqrt()


def adain(feat: torch.Tensor, ref: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """AdaIN (Huang & Belongie 2017, as used in StyleAligned section 3): give ``feat`` the per-channel token
    statistics of ``ref``. feat: (..., tokens, channels); ref broadcastable to it."""
    mean, std = calc_mean_std(feat, eps)
    ref_mean, ref_std = calc_mean_std(ref, eps)
    gain = ref_std / std
    return (feat * gain.to(feat.dtype)).add_((ref_mean - mean * gain).to(feat.dtype))


@dataclass
class _SharingState:
    """Per-call facts the processors and norm hooks need (set by ``installed_sharing``)."""

    per_group: int = 1  # images per CFG half; row 0 of each half is the reference
    active: bool = False


class SharedAttentionProcessor:
    """Self-attention processor with StyleAligned sharing; same call signature as diffusers'
    ``AttnProcessor2_0``. Layers with nothing to share delegate to ``inner`` (the processor that
    was installed before), so disabled sharing is bit-for-bit the stock computation."""

    def __init__(self, method: SharingOptions, state: _SharingState, inner: Any) -> None:
        self.method = method
        self.state = state
        self.inner = inner
        self._warned_mask = False

    def _does_nothing(self) -> bool:
        m = self.method
        return not (m.share_attention or m.full_attention_share or m.adain_queries or m.adain_keys or m.adain_values)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        per = self.state.per_group
        batch = hidden_states.shape[0]
        plain = (
            not self.state.active
            or self._does_nothing()
            or encoder_hidden_states is not None
            or per < 2
            or batch % per != 0
            or _tokens(hidden_states) < self.method.min_shared_tokens
        )
        if not plain and attention_mask is not None:
            if not self._warned_mask:
                warnings.warn("StyleAligned: self-attention with a mask is left unshared", UserWarning, stacklevel=2)
                self._warned_mask = True
            plain = True
        if plain:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        return self._shared(attn, hidden_states, temb)

    def _shared(self, attn: Any, hidden_states: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        m = self.method
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(b, channel, height * width).transpose(1, 2)
        batch, tokens, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        blended = getattr(self.inner, "blended_query", None)  # a subject-sharing processor underneath (see below)
        if blended is not None:
            query = blended(attn, query)
        if attn.norm_q is not None or attn.norm_k is not None:  # per-head norms come first, as in the stock order
            query, key = (
                x if norm is None else _merge_heads(norm(_split_heads(x, attn.heads)))
                for x, norm in ((query, attn.norm_q), (key, attn.norm_k))
            )

        per = self.state.per_group
        groups = batch // per
        # (groups, per, tokens, channels); row 0 of each group is the reference.
        q, k, v = (x.reshape(groups, per, tokens, -1) for x in (query, key, value))
        # Composition: when this layer's previous processor shares subjects (consistent_subject's),
        # its anchors' keys/values join the shared keys, after AdaIN (``extra_keys``).
        out = shared_attention(q, k, v, m, heads=attn.heads, scale=attn.scale,
                               extra_keys=getattr(self.inner, "key_blocks", None))

        hidden_states = out.reshape(batch, tokens, -1).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _tokens(hidden_states: torch.Tensor) -> int:
    """Spatial tokens of an attention input: (B, tokens, C) or (B, C, h, w)."""
    return hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states.shape[-2] * hidden_states.shape[-1]


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., tokens, heads * dim) -> (..., heads, tokens, dim)."""
    return x.unflatten(-1, (heads, -1)).transpose(-3, -2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(..., heads, tokens, dim) -> (..., tokens, heads * dim)."""
    return x.transpose(-3, -2).flatten(-2)


def shared_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    options: SharingOptions,
    heads: int = 1,
    scale: float | None = None,
    extra_keys: Callable[[torch.Tensor, torch.Tensor], list] | None = None,
) -> torch.Tensor:
    """StyleAligned attention on (groups, per, tokens, channels) tensors; row 0 is the reference.

    Queries/keys (and values if asked) are AdaIN'd to the reference's statistics (per channel
    over tokens, i.e. per head and head-dim; the reference maps to itself). Every row attends to
    [own tokens; reference tokens] in one batched attention call: for the reference that is its
    own tokens twice, which gives exactly its plain self-attention (duplicate key/value pairs
    only rescale the softmax), so sharing never changes it. ``shared_score_scale`` multiplies the
    reference keys seen by the other rows; ``shared_score_shift`` is added to the reference
    logits (harmless for the reference row, for the same reason). With ``full_attention_share``
    every row attends to all rows of its group instead (quadratic in the batch). ``extra_keys(k, v)``
    (after AdaIN) returns more (keys, values, bias) blocks every row also attends to, with their
    additive biases (``consistent_subject``'s anchors). Returns (groups, per, tokens, channels).
    """
    groups, per, tokens, channels = q.shape
    ref_q, ref_k, ref_v = q[:, :1], k[:, :1], v[:, :1]
    if options.adain_queries:
        q = adain(q, ref_q)
    if options.adain_keys:
        k = adain(k, ref_k)
    if options.adain_values:
        v = adain(v, ref_v)
    mask = None
    if options.full_attention_share:
        keys = k.flatten(1, 2).unsqueeze(1).expand(-1, per, -1, -1)
        values = v.flatten(1, 2).unsqueeze(1).expand(-1, per, -1, -1)
    elif options.share_attention:
        shared_k = k[:, :1].expand_as(k)
        if options.shared_score_scale != 1.0:
            factor = torch.full((1, per, 1, 1), options.shared_score_scale, dtype=k.dtype, device=k.device)
            factor[:, 0] = 1.0  # the reference's own duplicate stays as is
            shared_k = shared_k * factor
        keys = torch.cat([k, shared_k], dim=-2)
        values = torch.cat([v, v[:, :1].expand_as(v)], dim=-2)
        if options.shared_score_shift != 0.0:
            mask = torch.zeros(1, 1, 1, 2 * tokens, dtype=q.dtype, device=q.device)
            mask[..., tokens:] = options.shared_score_shift
    else:
        keys, values = k, v
    blocks = extra_keys(k, v) if extra_keys is not None else []
    if blocks:
        base = mask if mask is not None else torch.zeros(1, 1, 1, keys.shape[-2], dtype=q.dtype, device=q.device)
        parts = [base.expand(groups, per, 1, -1)] + [bias.to(q.dtype).expand(groups, per, 1, -1) for _, _, bias in blocks]
        keys = torch.cat([keys, *(b[0] for b in blocks)], dim=-2)
        values = torch.cat([values, *(b[1] for b in blocks)], dim=-2)
        mask = torch.cat(parts, dim=-1).flatten(0, 1).unsqueeze(1)  # (groups * per, 1, 1, keys)

    def heads_of(x: torch.Tensor) -> torch.Tensor:  # (g, p, n, c) -> (g * p, heads, n, c / heads)
        return _split_heads(x.flatten(0, 1), heads)

    out = F.scaled_dot_product_attention(heads_of(q), heads_of(keys), heads_of(values), attn_mask=mask, scale=scale)
    return _merge_heads(out).unflatten(0, (groups, per))


def shared_group_norm(
    module: nn.GroupNorm, x: torch.Tensor, per_group: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """GroupNorm where each non-reference image is normalised with the statistics of itself joined
    with the reference along space, as the reference implementation does. x: (B, C, ...).

    ``out``: the stock output, whose reference rows (row 0 of each group of ``per_group``) are
    kept; the other rows are written into it in place. Computed here when not given.
    """
    if out is None:
        out = F.group_norm(x, module.num_groups, module.weight, module.bias, module.eps)
    batch, channels = x.shape[:2]
    groups, spatial = batch // per_group, x[0, 0].numel()
    xg = x.reshape(groups, per_group, channels, spatial)
    # One native group norm over [x_i ; x_ref] per non-reference image (2x the spatial size):
    # fewer, larger kernels than assembling pooled statistics by hand (2-3x faster on CPU).
    joined = torch.cat([xg[:, 1:], xg[:, :1].expand(-1, per_group - 1, -1, -1)], dim=-1)
    normed = F.group_norm(
        joined.reshape(groups * (per_group - 1), channels, 2 * spatial),
        module.num_groups, module.weight, module.bias, module.eps,
    )
    out.view(groups, per_group, channels, spatial)[:, 1:] = normed.view(groups, per_group - 1, channels, -1)[
        ..., :spatial
    ]
    return out


def _group_norm_hook(state: _SharingState) -> Any:
    """A GroupNorm forward hook that replaces the output by ``shared_group_norm`` while ``state`` is active."""

    def hook(module: nn.GroupNorm, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        x = args[0]
        per = state.per_group
        if not state.active or per < 2 or x.shape[0] % per != 0 or not output.is_contiguous():
            return None
        # The reference rows keep the stock output (their pooled statistics are their own).
        target = output.clone() if torch.is_grad_enabled() else output
        return shared_group_norm(module, x, per, out=target)

    return hook


def _switch_vector(count: int, level: float) -> list[bool]:
    """Which self-attention layers stay unshared: a fraction ``level`` of ``count``, spread evenly."""
    if level <= 0 or count == 0:
        return [False] * count
    if level >= 1:
        return [True] * count
    flip = level > 0.5
    fraction = 1 - level if flip else level
    chosen = max(1, int(round(fraction * count)))
    step = count / chosen
    picked = {int(math.floor(i * step)) for i in range(chosen)}
    vec = [i in picked for i in range(count)]
    return [not x for x in vec] if flip else vec


@contextlib.contextmanager
def installed_sharing(unet: Any, options: SharingOptions, per_group: int) -> Iterator[_SharingState]:
    """Install the shared-attention processors (and group-norm hooks) on ``unet``.

    Self-attention layers (``attn1``) get a ``SharedAttentionProcessor`` over their processor,
    except the fraction ``options.only_self_level`` left unshared (``_switch_vector``) and those
    outside ``options.share_parts`` (InstantStyle's decoder-only injection, Wang et al. 2024); GroupNorms
    get ``_group_norm_hook`` when ``options.share_group_norm``. Restores the previous processors
    and removes the hooks on exit, even on error. Layers whose processor was replaced by someone
    else meanwhile are left as they are (warning).
    """
    state = _SharingState(per_group=per_group, active=True)
    previous = dict(unet.attn_processors)
    self_layers = [name for name in previous if name.endswith("attn1.processor")]
    unshared = {name: off or unet_part(name) not in options.share_parts
                for name, off in zip(self_layers, _switch_vector(len(self_layers), options.only_self_level), strict=True)}
    installed: dict[str, Any] = {}
    for name, processor in previous.items():
        if name in unshared and not unshared[name]:
            installed[name] = SharedAttentionProcessor(options, state, processor)
        else:
            installed[name] = processor
    handles = []
    try:
        unet.set_attn_processor(dict(installed))
        if options.share_group_norm:
            for module in unet.modules():
                if isinstance(module, nn.GroupNorm):
                    handles.append(module.register_forward_hook(_group_norm_hook(state)))
        yield state
    finally:
        state.active = False
        for handle in handles:
            handle.remove()
        current = unet.attn_processors
        restore = {}
        replaced = []
        for name, processor in current.items():
            if name in previous and processor is installed.get(name):
                restore[name] = previous[name]
            else:
                restore[name] = processor
                if isinstance(installed.get(name), SharedAttentionProcessor):
                    replaced.append(name)
        unet.set_attn_processor(restore)
        if replaced:
            warnings.warn(
                f"StyleAligned: {len(replaced)} attention processors were replaced while it was active "
                "(e.g. by loading an adapter that sets processors); they were left as found",
                UserWarning,
                stacklevel=3,
            )

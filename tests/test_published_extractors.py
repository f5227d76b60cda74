"""Fast tests of the published extractors ``csd`` and ``dreamsim``: tiny random checkpoints written in
the authors' on-disk layouts (same key names and nesting as the released files, tiny widths), loaded
through our extractors and compared with independent re-implementations of the reference forward
passes (``nn.MultiheadAttention`` for OpenAI CLIP, DINO's fused-qkv attention with ``peft`` LoRA)."""

from __future__ import annotations

import argparse
import json
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from consistent_diffusion.core.errors import ConfigError, ModelNotFoundError
from consistent_diffusion.metrics.extractors import dreamsim
from consistent_diffusion.metrics.extractors.dreamsim import (
    DreamSimExtractor,
    dreamsim_normalize,
    read_lora_deltas,
)
from consistent_diffusion.metrics.extractors.published import (
    CSDExtractor,
    VitShape,
    openai_visual_to_hf,
    resize_shorter_and_center_crop,
    split_qkv,
)
from consistent_diffusion.metrics.extractors.registry import load_features

torch.set_num_threads(1)

WIDTH, LAYERS, PATCH, IMAGE = 128, 2, 8, 32  # 128 // 64 = 2 heads, 4 x 4 patches
# The references' constants, written out here rather than imported.
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _images(n: int = 3, size: int = IMAGE, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _normalized(images: torch.Tensor, mean, std) -> torch.Tensor:
    unit = (images + 1) / 2
    return (unit - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    """Every parameter random (LayerNorm gains around 1), so that a swapped or dropped tensor shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for submodule in module.modules():
            for name, param in submodule.named_parameters(recurse=False):
                gain = isinstance(submodule, nn.LayerNorm) and name == "weight"
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2 + (1.0 if gain else 0.0))
    return module.eval()


# ----------------------------------------------------------------------------- CSD reference (OpenAI clip)


class _QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class _ResidualAttentionBlock(nn.Module):
    """clip/model.py ResidualAttentionBlock, sequence-first, with torch's own fused-in_proj attention."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", _QuickGELU()),
                                              ("c_proj", nn.Linear(4 * width, width))]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _OpenAIVisual(nn.Module):
    """clip/model.py VisionTransformer (the CSD backbone), same parameter names."""

    def __init__(self, width=WIDTH, layers=LAYERS, heads=WIDTH // 64, patch=PATCH, image=IMAGE, out=48):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros((image // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.Module()
        blocks = [_ResidualAttentionBlock(width, heads) for _ in range(layers)]
        self.transformer.resblocks = nn.Sequential(*blocks)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, out))

    def forward(self, x):
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        x = torch.cat([self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1]), x], dim=1)
        x = self.ln_pre(x + self.positional_embedding).permute(1, 0, 2)
        x = self.transformer.resblocks(x).permute(1, 0, 2)
        x = self.ln_post(x[:, 0, :])
        return x if self.proj is None else x @ self.proj


class _CSD(nn.Module):
    """CSD/model.py CSD_CLIP: backbone without proj, style and content copies of proj."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.backbone = _randomize(_OpenAIVisual(), seed)
        generator = torch.Generator().manual_seed(seed + 1)
        proj = self.backbone.proj.detach()
        self.last_layer_style = nn.Parameter(proj + 0.1 * torch.randn(proj.shape, generator=generator))
        self.last_layer_content = nn.Parameter(proj + 0.1 * torch.randn(proj.shape, generator=generator))
        self.backbone.proj = None

    @torch.no_grad()
    def forward(self, pixels):
        feature = self.backbone(pixels)
        style = nn.functional.normalize(feature @ self.last_layer_style, dim=1, p=2)
        content = nn.functional.normalize(feature @ self.last_layer_content, dim=1, p=2)
        return feature, content, style


def _write_csd_checkpoint(path, csd: _CSD) -> None:
    """train_csd.py's save_dict: DDP-prefixed model_state_dict plus optimiser state and argparse args."""
    state = {f"module.{k}": v for k, v in csd.state_dict().items()}
    torch.save({"model_state_dict": state, "opt_bb": {"state": {}, "param_groups": []}, "iter": 5000,
                "args": argparse.Namespace(arch="vit_large", lr_bb=1e-5, eval_k=[1, 10])}, path)


@pytest.fixture
def csd_folder(tmp_path):
    csd = _CSD()
    _write_csd_checkpoint(tmp_path / "checkpoint.pth", csd)
    return tmp_path, csd


def test_csd_style_embedding_matches_the_reference_forward(csd_folder):
    folder, csd = csd_folder
    images = _images()
    feature, content, style = csd(_normalized(images, OPENAI_MEAN, OPENAI_STD))
    extractor = load_features("csd", model=folder)
    ours = extractor.embed(images)
    assert extractor.name == "csd" and ours.shape == (3, 48)
    torch.testing.assert_close(ours, style, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)
    content_head = CSDExtractor(model=folder, head="content").embed(images)
    torch.testing.assert_close(content_head, content, atol=1e-5, rtol=1e-4)
    backbone = CSDExtractor(model=folder, head="backbone").embed(images)
    torch.testing.assert_close(backbone, feature, atol=1e-4, rtol=1e-4)
    assert (ours - content).abs().max() > 1e-2  # the two heads really differ


def test_csd_architecture_is_read_from_shapes_and_qkv_is_split_by_rows(csd_folder):
    folder, csd = csd_folder
    visual = {k: v for k, v in csd.backbone.state_dict().items()}
    hf_state, shape = openai_visual_to_hf(visual)
    assert shape == VitShape(width=WIDTH, layers=LAYERS, patch_size=PATCH, image_size=IMAGE,
                             mlp_width=4 * WIDTH)
    assert shape.heads() == 2 and shape.heads(4) == 4
    fused_w = visual["transformer.resblocks.1.attn.in_proj_weight"]
    fused_b = visual["transformer.resblocks.1.attn.in_proj_bias"]
    for index, name in enumerate(("q_proj", "k_proj", "v_proj")):
        rows = slice(index * WIDTH, (index + 1) * WIDTH)
        assert torch.equal(hf_state[f"encoder.layers.1.self_attn.{name}.weight"], fused_w[rows])
        assert torch.equal(hf_state[f"encoder.layers.1.self_attn.{name}.bias"], fused_b[rows])
    assert torch.equal(hf_state["encoder.layers.0.mlp.fc2.weight"],
                       visual["transformer.resblocks.0.mlp.c_proj.weight"])
    assert torch.equal(hf_state["post_layernorm.bias"], visual["ln_post.bias"])
    # split_qkv by hand: rows 0-1 are q, 2-3 k, 4-5 v.
    weight, bias = torch.arange(12.0).view(6, 2), torch.arange(6.0)
    (wq, bq), (wk, bk), (wv, bv) = split_qkv(weight, bias)
    assert wq.tolist() == [[0, 1], [2, 3]] and wk.tolist() == [[4, 5], [6, 7]]
    assert wv.tolist() == [[8, 9], [10, 11]]
    assert bq.tolist() == [0, 1] and bk.tolist() == [2, 3] and bv.tolist() == [4, 5]
    with pytest.raises(ConfigError, match="not an OpenAI CLIP"):
        openai_visual_to_hf({k: v for k, v in visual.items() if k != "ln_pre.bias"})


def test_csd_accepts_the_hub_mixin_layout_and_ignores_backbone_proj(csd_folder, tmp_path_factory):
    folder, csd = csd_folder
    images = _images()
    expected = CSDExtractor(model=folder / "checkpoint.pth").embed(images)
    hub = tmp_path_factory.mktemp("csd_hub")
    state = {k: v.contiguous() for k, v in csd.state_dict().items()}  # PyTorchModelHubMixin: bare keys
    state["backbone.proj"] = torch.randn(WIDTH, 48)  # a stale CLIP proj must not be used
    save_file(state, str(hub / "model.safetensors"))
    torch.testing.assert_close(CSDExtractor(model=hub).embed(images), expected, atol=1e-6, rtol=0)


def test_csd_is_deterministic_and_every_weight_comes_from_the_file(csd_folder):
    folder, _ = csd_folder
    images = _images()
    torch.manual_seed(1)
    first = CSDExtractor(model=folder)
    torch.manual_seed(2)  # a different random init underneath: the loaded weights must overwrite all of it
    second = CSDExtractor(model=folder)
    assert torch.equal(first.embed(images), first.embed(images))
    torch.testing.assert_close(first.embed(images), second.embed(images), atol=0, rtol=0)


def test_csd_preprocessing_resizes_the_shorter_side_then_centre_crops():
    wide = _images(1, 48)[:, :, :32, :]  # 32 x 48: no resize needed, left = 8
    assert torch.equal(resize_shorter_and_center_crop(wide, 32), wide[:, :, :, 8:40])
    tall = _images(1, 50)[:, :, :, :32]  # 50 x 32: top = round(18 / 2) = 9
    assert torch.equal(resize_shorter_and_center_crop(tall, 32), tall[:, :, 9:41, :])
    grey = torch.full((2, 3, 60, 90), 0.25)
    out = resize_shorter_and_center_crop(grey, 32)
    assert out.shape == (2, 3, 32, 32) and torch.allclose(out, torch.full_like(out, 0.25), atol=1e-5)


def test_csd_missing_or_unreadable_weights_give_clear_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="checkpoint.pth"):
        CSDExtractor(model=tmp_path / "nowhere.pth")
    with pytest.raises(ModelNotFoundError, match="no CSD checkpoint"):
        CSDExtractor(model=tmp_path)  # an empty folder
    with pytest.raises(ModelNotFoundError, match="needs model=PATH"):
        CSDExtractor()
    (tmp_path / "checkpoint.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelNotFoundError, match="not a readable weights file"):
        CSDExtractor(model=tmp_path)
    torch.save({"model_state_dict": {}, "args": _Opaque()}, tmp_path / "checkpoint.pth")
    with pytest.raises(ModelNotFoundError, match="not a readable weights file"):  # arbitrary pickles refused
        CSDExtractor(model=tmp_path)
    with pytest.raises(ConfigError, match="head must be one of"):
        CSDExtractor(model=tmp_path, head="colour")


class _Opaque:
    """An object outside the weights_only allowlist."""


# ----------------------------------------------------------------------------- DreamSim reference


class _DinoAttention(nn.Module):
    """dino/vision_transformer.py Attention: one fused qkv Linear, heads split inside."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attention = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(dim=-1)
        return self.proj((attention @ v).transpose(1, 2).reshape(b, n, c))


class _DinoBlock(nn.Module):
    def __init__(self, width: int, heads: int, act: nn.Module, eps: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width, eps=eps), nn.LayerNorm(width, eps=eps)
        self.attn = _DinoAttention(width, heads)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.act = nn.Linear(width, 4 * width), act
        self.mlp.fc2 = nn.Linear(4 * width, width)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        y = self.mlp.fc2(self.mlp.act(self.mlp.fc1(self.norm2(x))))
        return x + y


class _DinoViT(nn.Module):
    """dino/vision_transformer.py VisionTransformer; ``clip_like`` is DreamSim's load_clip_as_dino
    (pos_drop replaced by a LayerNorm = CLIP's ln_pre, eps 1e-5)."""

    def __init__(self, act: nn.Module, clip_like: bool, seed: int) -> None:
        super().__init__()
        eps = 1e-5 if clip_like else 1e-6
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, WIDTH, PATCH, PATCH)  # with bias, as DINO's PatchEmbed
        self.cls_token = nn.Parameter(torch.zeros(1, 1, WIDTH))
        self.pos_embed = nn.Parameter(torch.zeros(1, (IMAGE // PATCH) ** 2 + 1, WIDTH))
        self.pos_drop = nn.LayerNorm(WIDTH, eps=eps) if clip_like else nn.Dropout(0.0)
        self.blocks = nn.ModuleList([_DinoBlock(WIDTH, WIDTH // 64, act, eps) for _ in range(LAYERS)])
        self.norm = nn.LayerNorm(WIDTH, eps=eps)
        _randomize(self, seed)

    def last_block_tokens(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = self.pos_drop(torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed)
        for block in self.blocks:
            x = block(x)
        return x


class _Extractor(nn.Module):
    def __init__(self, vit: _DinoViT, feature: str, proj: torch.Tensor | None, mean, std) -> None:
        super().__init__()
        self.model, self.feature, self.proj, self.mean, self.std = vit, feature, proj, mean, std

    def forward(self, images):
        tokens = self.model.last_block_tokens(_normalized(images, self.mean, self.std))
        if self.feature == "cls":  # PerceptualModel._extract_cls: block-11 hook, no final norm
            return tokens[:, 0]
        return self.model.norm(tokens)[:, 0] @ self.proj  # ViTExtractor.forward(is_proj=True)


class _Perceptual(nn.Module):
    """dreamsim/model.py PerceptualModel.embed with lora=True (mlp = identity), normalize_embeds=True."""

    def __init__(self, extractors) -> None:
        super().__init__()
        self.extractor_list = nn.ModuleList(extractors)

    @torch.no_grad()
    def embed(self, images):
        embed = torch.cat([extractor(images) for extractor in self.extractor_list], dim=-1)
        embed = (embed.T - torch.mean(embed, dim=1)).T  # normalize_embedding, verbatim
        return (embed.T / torch.norm(embed, dim=1)).T


def _branch(name: str, seed: int) -> tuple[_Extractor, dict]:
    """A tiny branch and the backbone file content DreamSim keeps for it (before LoRA)."""
    if name == "dino_vitb16":
        vit = _DinoViT(nn.GELU(), clip_like=False, seed=seed)
        return _Extractor(vit, "cls", None, IMAGENET_MEAN, IMAGENET_STD), dict(vit.state_dict())
    vit = _DinoViT(_QuickGELU() if name.startswith("clip") else nn.GELU(), clip_like=True, seed=seed)
    proj = torch.randn(WIDTH, 48, generator=torch.Generator().manual_seed(seed + 100)) * 0.2
    content = {"state_dict": {**vit.state_dict(), "proj": proj}}
    return _Extractor(vit, "embedding", proj, OPENAI_MEAN, OPENAI_STD), content


def _write_dreamsim(folder, variant: str, *, dino_layout: str = "hub", rank: int = 4, alpha: float = 8.0):
    """DreamSim's cache folder for ``variant``: backbone files plus the peft adapter that
    ``peft.get_peft_model(PerceptualModel, LoraConfig(target_modules=['qkv'])).save_pretrained`` writes."""
    from peft import LoraConfig, get_peft_model

    names, adapter = dreamsim.DREAMSIM_VARIANTS[variant]
    extractors = []
    for index, name in enumerate(names):
        extractor, content = _branch(name, seed=10 * index)
        extractors.append(extractor)
        if name != "dino_vitb16":
            torch.save(content, folder / f"{name}_pretrain.pth.tar")
        elif dino_layout == "hub":
            (folder / "checkpoints").mkdir(exist_ok=True)
            torch.save(content, folder / "checkpoints" / "dino_vitbase16_pretrain.pth")
        else:  # DINO's full training checkpoint: teacher (= released backbone) and a different student
            student = {f"module.backbone.{k}": torch.randn_like(v) for k, v in content.items()}
            torch.save({"teacher": {**{f"backbone.{k}": v for k, v in content.items()},
                                    "head.mlp.0.weight": torch.randn(8, WIDTH)},
                        "student": {**student, "module.head.mlp.0.weight": torch.randn(8, WIDTH)},
                        "epoch": 100, "args": argparse.Namespace(arch="vit_base")},
                       folder / "dino_vitb16_pretrain.pth")
    reference = _Perceptual(extractors)
    torch.manual_seed(123)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=["qkv"],
                        init_lora_weights=False)  # random A and B, so the update is not zero
    peft_model = get_peft_model(reference, config)
    peft_model.save_pretrained(str(folder / adapter))
    return peft_model


@pytest.mark.parametrize("dino_layout", ["hub", "teacher"])
def test_dreamsim_dino_matches_the_peft_reference(tmp_path, dino_layout):
    peft_model = _write_dreamsim(tmp_path, "dino_vitb16", dino_layout=dino_layout)
    images = _images()
    expected = peft_model.base_model.model.embed(images)
    with peft_model.disable_adapter():
        without_lora = peft_model.base_model.model.embed(images)
    assert (expected - without_lora).abs().max() > 1e-2  # the adapter matters, so the merge is tested
    extractor = load_features("dreamsim", model=tmp_path)
    ours = extractor.embed(images)
    assert extractor.variant == "dino_vitb16" and ours.shape == (3, WIDTH)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.mean(dim=1), torch.zeros(3), atol=1e-6, rtol=0)


def test_dreamsim_ensemble_concatenates_three_lora_branches(tmp_path):
    peft_model = _write_dreamsim(tmp_path, "ensemble", alpha=2.0)
    images = _images(4)
    expected = peft_model.base_model.model.embed(images)
    ours = DreamSimExtractor(model=tmp_path, variant="ensemble").embed(images)
    assert ours.shape == (4, WIDTH + 48 + 48)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    raw = DreamSimExtractor(model=tmp_path, normalize_embeds=False).embed(images)
    torch.testing.assert_close(dreamsim_normalize(raw), ours, atol=1e-6, rtol=0)


def test_dreamsim_reads_a_bin_adapter_and_is_deterministic(tmp_path):
    _write_dreamsim(tmp_path, "dino_vitb16")
    images = _images()
    torch.manual_seed(1)
    first = DreamSimExtractor(model=tmp_path).embed(images)
    adapter = tmp_path / "dino_vitb16_single_lora"
    torch.save(load_file(str(adapter / "adapter_model.safetensors")), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()  # older peft wrote adapter_model.bin
    torch.manual_seed(2)
    extractor = DreamSimExtractor(model=tmp_path)
    assert torch.equal(extractor.embed(images), extractor.embed(images))
    torch.testing.assert_close(extractor.embed(images), first, atol=0, rtol=0)


def test_lora_delta_and_normalisation_by_hand(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 2,
                                                             "target_modules": ["qkv"], "bias": "none"}))
    prefix = "base_model.model.extractor_list.0.model.blocks.3.attn.qkv"
    save_file({f"{prefix}.lora_A.weight": torch.tensor([[1.0, -1.0]]),
               f"{prefix}.lora_B.weight": torch.tensor([[1.0], [0.0], [2.0], [0.0], [0.0], [-1.0]])},
              str(adapter / "adapter_model.safetensors"))
    deltas = read_lora_deltas(adapter)
    assert list(deltas) == [(0, 3)]
    # 2 / 1 * B @ A
    assert deltas[(0, 3)].tolist() == [[2, -2], [0, 0], [4, -4], [0, 0], [0, 0], [-2, 2]]
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ConfigError, match="plain LoRA"):
        read_lora_deltas(adapter)
    assert torch.allclose(dreamsim_normalize(torch.tensor([[1.0, 2.0, 3.0]])),
                          torch.tensor([[-1.0, 0.0, 1.0]]) / 2 ** 0.5)


def test_dreamsim_missing_weights_name_what_to_fetch(tmp_path):
    with pytest.raises(ModelNotFoundError, match="dreamsim_dino_vitb16_checkpoint.zip"):
        DreamSimExtractor(model=tmp_path / "absent")
    with pytest.raises(ModelNotFoundError, match="dreamsim_dino_vitb16_checkpoint.zip"):
        DreamSimExtractor(model=tmp_path)  # no adapter folder
    with pytest.raises(ModelNotFoundError, match="ensemble_lora/adapter_config.json"):
        DreamSimExtractor(model=tmp_path, variant="ensemble")
    _write_dreamsim(tmp_path, "dino_vitb16")
    (tmp_path / "checkpoints" / "dino_vitbase16_pretrain.pth").unlink()
    with pytest.raises(ModelNotFoundError, match="dino_vitbase16_pretrain.pth"):
        DreamSimExtractor(model=tmp_path)
    ensemble = tmp_path / "ensemble"
    ensemble.mkdir()
    _write_dreamsim(ensemble, "ensemble")
    (ensemble / "open_clip_vitb16_pretrain.pth.tar").unlink()
    with pytest.raises(ModelNotFoundError, match="open_clip_vitb16_pretrain.pth.tar"):
        DreamSimExtractor(model=ensemble)
    with pytest.raises(ConfigError, match="variant must be one of"):
        DreamSimExtractor(model=ensemble, variant="dinov2_vitb14_patch")


# ----------------------------------------------------------------------------- the published protocols in score


def test_consistory_and_csd_sets_score_with_local_weights(tmp_path, csd_folder):
    """``score`` with the consistory set: DreamSim on foreground crops (ConsiStory's background-masked
    protocol), mean cosine to the references; the csd set: mean cosine of CSD style descriptors."""
    from consistent_diffusion.metrics.common import cosine_matrix, mean_off_diagonal
    from consistent_diffusion.metrics.consistency import foreground_crop
    from consistent_diffusion.metrics.score import score

    _write_dreamsim(tmp_path, "dino_vitb16")
    folder, _ = csd_folder
    images = torch.ones(3, 3, IMAGE, IMAGE)
    images[:, :, 8:20, 6:22] = _images(3)[:, :, 8:20, 6:22]  # subjects on white, off centre
    references = images[:1].flip(-1)
    options = {"dreamsim": {"model": str(tmp_path)}, "csd": {"model": str(folder)}}
    scores = score(images, metrics=["object", "style"], references=references, model="folder",
                   extractor_sets=["consistory", "csd"], extractor_options=options)
    dreamsim = load_features("dreamsim", model=tmp_path)
    expected = cosine_matrix(dreamsim.embed(foreground_crop(images)), dreamsim.embed(foreground_crop(references)))
    assert scores["object"].per_image == pytest.approx(expected[:, 0].tolist(), abs=1e-5)
    assert "ConsiStory" in scores["object"].details["protocol"] and scores["object"].validated is None
    within = score(images, metrics=["style"], model="folder", extractor_sets=["csd"], extractor_options=options)
    csd = load_features("csd", model=folder)
    expected_style = mean_off_diagonal(cosine_matrix(csd.embed(images)))
    assert within["style"].per_image == pytest.approx(expected_style.tolist(), abs=1e-5)
    assert "CSD" in within["style"].details["protocol"]
    missing = score(images, metrics=["style"], model="folder", extractor_sets=["csd"],
                    extractor_options={"csd": {"model": str(tmp_path / "nowhere")}})["style"]
    assert not missing.measured and "checkpoint" in missing.details["not_measured"]

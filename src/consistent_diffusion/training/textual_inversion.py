"""Textual inversion (Gal et al., ICLR 2023): learn new token embeddings for a concept, model frozen.

A placeholder token ``S*`` (and ``num_vectors - 1`` more, ``S*_1`` ...) is added to the tokenizer(s)
and its embedding v* is optimised so that the frozen UNet denoises the 3-20 exemplar images under
prompts like "a photo of a S*" (paper eq. 2):

    v* = argmin_v E_{z ~ E(x), y, eps ~ N(0, I), t} || eps - eps_theta(z_t, t, c_theta(y; v)) ||^2

(the v-prediction target on v-prediction models). Only v* is trained: it is a separate parameter
(``LearnedEmbeddings``) substituted at the placeholder ids by a forward hook on the text
encoder's input embeddings, so no other row of the embedding matrix can move (the diffusers example
trains the whole matrix and resets the other rows after every step; the result is the same).
Templates are diffusers' (``imagenet_templates_small`` for objects, ``..._style_...`` for styles)
or the user's own ("{}, twitter style" for the embedded model, whose captions read so). The new
rows start from the initializer word's embedding (the mean of its tokens if it has several).

Works for CLIP encoders (SD 1.x/2.x; SDXL trains one vector set per encoder) and the embedded
model's MiniLM (BERT) encoder. The result ``out/embeddings`` holds ``learned_embeds.safetensors``
({token: (num_vectors, dim)}, diffusers' format: stock ``pipe.load_textual_inversion(folder)`` loads
it) and, for SDXL, ``learned_embeds_2.safetensors`` for the second encoder (load it with
``text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2``); our ``textual_inversion`` method
loads either, reversibly, on any of these pipelines.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.training.data import load_image_set
from consistent_diffusion.training.diffusion import (
    added_cond_kwargs,
    encode_images,
    encode_text,
    model_size,
    noise_and_target,
    per_example_mse,
    training_scheduler,
)
from consistent_diffusion.training.loop import (
    Task,
    TrainResult,
    check_out_folder,
    run_training,
    write_validation_images,
)
from consistent_diffusion.training.loop_config import LoopConfig

# diffusers' examples/textual_inversion/textual_inversion.py
OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a cropped painting in the style of {}", "a good painting in the style of {}",
    "a close-up painting in the style of {}", "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}",
    "a large painting in the style of {}",
)
TEMPLATE_SETS = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}
EMBEDDING_FILES = ("learned_embeds.safetensors", "learned_embeds_2.safetensors")


@dataclass(kw_only=True)
class TextualInversionConfig(LoopConfig):
    """A textual-inversion run; the embeddings land in ``out/embeddings``."""

    instance_dir: Path  # folder of 3-20 exemplar images of the concept
    placeholder_token: str  # the new word, e.g. "<my-cat>" (lower case; must be new to the tokenizer)
    initializer_token: str  # a word close to the concept, e.g. "cat" (its embedding starts the new one)
    num_vectors: int = 1  # vectors behind the placeholder (more: more capacity, the paper uses 1)
    templates: tuple[str, ...] = ("object",)  # "object" | "style" (diffusers' sets) or own templates with "{}"
    learning_rate: float = 5e-3
    batch_size: int = 4
    steps: int = 500
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        self.instance_dir = Path(self.instance_dir)
        token = self.placeholder_token
        if not isinstance(token, str) or not token.strip() or " " in token.strip():
            raise ConfigError(f"placeholder_token must be one new word such as '<my-cat>', got {token!r}")
        if token != token.lower():
            raise ConfigError(f"placeholder_token must be lower case (the tokenizers lower-case prompts), got {token!r}")
        if not isinstance(self.initializer_token, str) or not self.initializer_token.strip():
            raise ConfigError("initializer_token is empty; give a word close to the concept, e.g. 'cat'")
        if isinstance(self.num_vectors, bool) or not isinstance(self.num_vectors, int) or not 1 <= self.num_vectors <= 16:
            raise ConfigError(f"num_vectors must be an integer in [1, 16], got {self.num_vectors!r}")
        self.templates = tuple(self.templates)
        if not self.templates or not all(isinstance(t, str) and (t in TEMPLATE_SETS or "{}" in t) for t in self.templates):
            raise ConfigError(f"templates must be 'object', 'style' or texts with '{{}}' for the token, got {self.templates!r}")

    @property
    def prompt_templates(self) -> tuple[str, ...]:
        """The templates with the named sets expanded."""
        expanded: list[str] = []
        for template in self.templates:
            expanded.extend(TEMPLATE_SETS.get(template, (template,)))
        return tuple(expanded)

    @property
    def token_names(self) -> list[str]:
        """The placeholder and its extra vectors' names (``tok``, ``tok_1``, ...), as diffusers names them."""
        return [self.placeholder_token] + [f"{self.placeholder_token}_{i}" for i in range(1, self.num_vectors)]

    @property
    def placeholder_text(self) -> str:
        """What stands for the concept in a training prompt: every vector's token, in order."""
        return " ".join(self.token_names)


class LearnedEmbeddings(nn.Module):
    """The trainable vectors: one (num_vectors, dim) parameter per text encoder. ``forward(index,
    input_ids, embeddings)`` puts encoder ``index``'s vectors at the placeholder ids (>= ``first_id``)."""

    def __init__(self, initial: list[torch.Tensor], first_ids: list[int]) -> None:
        super().__init__()
        self.vectors = nn.ParameterList([nn.Parameter(v.detach().clone().float()) for v in initial])
        self.first_ids = list(first_ids)

    def forward(self, index: int, input_ids: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        first, vectors = self.first_ids[index], self.vectors[index]
        new = (input_ids >= first) & (input_ids < first + vectors.shape[0])
        if not bool(new.any()):
            return embeddings
        replaced = embeddings.clone()
        replaced[new] = vectors[input_ids[new] - first].to(embeddings.dtype)
        return replaced


def text_encoders(pipe: Any) -> list[tuple[Any, Any]]:
    """(tokenizer, text encoder) pairs of the pipeline: one, or two for SDXL-shaped pipelines."""
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "tokenizer_2", None) is not None and getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def add_placeholder_tokens(tokenizer: Any, encoder: Any, names: list[str], initializer: str) -> tuple[int, torch.Tensor]:
    """Add ``names`` to ``tokenizer`` (all must be new), grow ``encoder``'s embeddings to match, and
    return (the first new id, initial vectors (len(names), dim) = the initializer's embedding)."""
    for name in names:
        if name in tokenizer.get_vocab():
            raise ConfigError(f"the tokenizer already knows {name!r}; choose a new placeholder such as '<my-{name.strip('<>')}>'")
    init_ids = tokenizer(initializer, add_special_tokens=False).input_ids
    if not init_ids:
        raise ConfigError(f"initializer_token {initializer!r} has no tokens")
    before = len(tokenizer)
    if tokenizer.add_tokens(names) != len(names):
        raise ConfigError(f"could not add the placeholder tokens {names} to the tokenizer")
    first = tokenizer.convert_tokens_to_ids(names[0])
    if first != before or tokenizer.convert_tokens_to_ids(names[-1]) != before + len(names) - 1:
        raise ConfigError("the placeholder tokens did not get consecutive new ids")
    if len(tokenizer) > encoder.get_input_embeddings().weight.shape[0]:  # never shrink (some configs pad the vocab)
        encoder.resize_token_embeddings(len(tokenizer))
    weight = encoder.get_input_embeddings().weight
    start = weight[init_ids].detach().float().mean(dim=0)
    with torch.no_grad():
        weight[first:first + len(names)] = start.to(weight.dtype)
    return first, start.unsqueeze(0).repeat(len(names), 1)


def check_templates_fit(pipe: Any, templates: tuple[str, ...], config: TextualInversionConfig) -> None:
    """ConfigError when a template, with the token in it, is cut before the token by a tokenizer's
    length limit (the embedded model reads 16 tokens): that prompt would train nothing."""
    for tokenizer, _ in text_encoders(pipe):
        wanted = tokenizer.convert_tokens_to_ids(config.token_names)
        for template in templates:
            ids = tokenizer(template.format(config.placeholder_text), truncation=True,
                            max_length=tokenizer.model_max_length).input_ids
            if not all(i in ids for i in wanted):
                raise ConfigError(f"template {template!r} is longer than this model's {tokenizer.model_max_length}-token "
                                  "prompts once the token is in; shorten it (or put {} first)")


class TextualInversionTask(Task):
    """Textual inversion on one pipeline (modified in place: the tokens stay added)."""

    result_name = "embeddings"
    seed_stream = 3

    def __init__(self, pipe: Any, config: TextualInversionConfig) -> None:
        super().__init__()
        self.pipe, self.config = pipe, config
        self.size = model_size(pipe, config.resolution)
        self.noise_scheduler = training_scheduler(pipe)
        instance = load_image_set(config.instance_dir, self.size, what="exemplar")
        self.instance_files = [str(p) for p in instance.files]
        self.skipped = [(str(p), why) for p, why in instance.skipped]
        self.latents = encode_images(pipe, instance.images)
        for name in ("vae", "text_encoder", "text_encoder_2", "unet"):
            module = getattr(pipe, name, None)
            if module is not None:
                module.requires_grad_(False)
        firsts, initial = [], []
        for tokenizer, encoder in text_encoders(pipe):
            first, start = add_placeholder_tokens(tokenizer, encoder, config.token_names, config.initializer_token)
            firsts.append(first)
            initial.append(start)
        self.modules["embeddings"] = LearnedEmbeddings(initial, firsts)
        self.templates = config.prompt_templates
        check_templates_fit(pipe, self.templates, config)
        self._hooks = [encoder.get_input_embeddings().register_forward_hook(self._substitute(index))
                       for index, (_, encoder) in enumerate(text_encoders(pipe))]

    def _substitute(self, index: int) -> Any:
        def hook(module: Any, args: tuple, output: torch.Tensor) -> torch.Tensor:
            return self.forward_module("embeddings")(index, args[0], output)

        return hook

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def prepare(self, accelerator: Any, device: torch.device) -> None:
        self.pipe.to(device)

    def loss(self, step: int, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        batch = self.config.batch_size
        rows = torch.randint(0, self.latents.mean.shape[0], (batch,), generator=generator)
        latents = self.latents.sample(rows, generator)
        picks = torch.randint(0, len(self.templates), (batch,), generator=generator).tolist()
        prompts = [self.templates[i].format(self.config.placeholder_text) for i in picks]
        noisy, timesteps, target = noise_and_target(self.noise_scheduler, latents, generator)
        embeds, pooled = encode_text(self.pipe, prompts)
        prediction = self.pipe.unet(
            noisy.to(device), timesteps.to(device), encoder_hidden_states=embeds,
            added_cond_kwargs=added_cond_kwargs(self.pipe, pooled, self.size), return_dict=False,
        )[0]
        loss = per_example_mse(prediction, target.to(device)).mean()
        return loss, {}

    def validate(self, step: int, folder: Path) -> None:
        """Each validation prompt (default: the first template with the token) with seed i; the
        pipeline's own prompt conversion expands the token to all its vectors."""
        from consistent_diffusion.methods.base import GenerationContext, run

        prompts = list(self.config.validation_prompts) or [self.templates[0].format(self.config.placeholder_token)]
        ctx = GenerationContext(
            pipe=self.pipe, prompts=prompts, negative_prompts=None,
            generators=[torch.Generator("cpu").manual_seed(index) for index in range(len(prompts))],
            call_kwargs={"num_inference_steps": self.config.validation_steps, "height": self.size, "width": self.size},
        )
        write_validation_images(run(ctx), prompts, folder)

    def export(self, folder: Path) -> None:
        """``learned_embeds.safetensors`` (+ ``_2`` for SDXL's second encoder) and a README."""
        from safetensors.torch import save_file

        module: LearnedEmbeddings = self.modules["embeddings"]  # type: ignore[assignment]
        token = self.config.placeholder_token
        for index, vectors in enumerate(module.vectors):
            save_file({token: vectors.detach().cpu().float().contiguous()}, str(folder / EMBEDDING_FILES[index]),
                      metadata={"format": "pt", "token": token, "initializer": self.config.initializer_token})
        second = (f"\npipe.load_textual_inversion(\"<folder>/learned_embeds_2.safetensors\", token=\"{token}\", "
                  "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)"
                  if len(module.vectors) == 2 else "")
        first_call = (f'pipe.load_textual_inversion("<folder>/learned_embeds.safetensors", token="{token}", '
                      "text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)" if second
                      else 'pipe.load_textual_inversion("<this folder>")')
        (folder / "README.md").write_text(
            f"# Textual inversion (consistent-diffusion): `{token}`\n\n"
            f"{self.config.num_vectors} vector(s), initialised from `{self.config.initializer_token}`; put `{token}` "
            "in a prompt.\n\n"
            f"```python\n{first_call}{second}\n```\n\n"
            f"or `consistent-diffusion generate --textual-inversion <this folder> --prompt \"a photo of {token}\"`; "
            "`training.json` records the base model and options.\n",
            encoding="utf-8",
        )

    def identity(self) -> dict[str, Any]:
        from consistent_diffusion.models.loading import model_identity

        return {**model_identity(self.pipe).to_dict(), "instance_files": self.instance_files,
                "skipped_files": self.skipped}


def train_textual_inversion(config: TextualInversionConfig, pipe: Any, on_step_end: Any = None) -> TrainResult:
    """Learn ``config.placeholder_token`` on ``pipe`` (its tokenizers keep the new tokens; the
    substitution hooks are removed when training ends); the vectors go to ``out/embeddings``."""
    check_out_folder(config)
    task = TextualInversionTask(pipe, config)
    try:
        return run_training(task, config, "textual_inversion", on_step_end=on_step_end)
    finally:
        task.remove_hooks()
        _write_vectors_into(pipe, task)


def _write_vectors_into(pipe: Any, task: TextualInversionTask) -> None:
    """Copy the learned vectors into the embedding rows, so the pipeline generates with them after training."""
    module: LearnedEmbeddings = task.modules["embeddings"]  # type: ignore[assignment]
    with torch.no_grad():
        for index, (_, encoder) in enumerate(text_encoders(pipe)):
            weight = encoder.get_input_embeddings().weight
            first, vectors = module.first_ids[index], module.vectors[index]
            weight[first:first + vectors.shape[0]] = vectors.to(weight.dtype)

"""Images that carry their recipe: PNG text chunks other tools read, and ours that re-creates the image.

Every generated PNG gets two text chunks:

- ``parameters``: the AUTOMATIC1111 infotext other tools (A1111, ComfyUI, Civitai, image viewers)
  read, three parts::

      <prompt>
      Negative prompt: <negative prompt>          (only when there is one)
      Steps: 30, Sampler: DDIM, CFG scale: 7.5, Seed: 3, Size: 64x64, Model hash: 0123456789, Model: embedded, ...

  values holding ``,``, ``:`` or a newline are JSON-quoted, as A1111's ``infotext_utils.quote`` does.
  Its parser (``parse_parameters``) reads A1111's own images too.
- ``consistent-diffusion``: JSON ``{"format", "kind", "request", "image"}`` with everything needed to
  make the same pixels again: for a series image the series manifest without its image list
  (config, methods with their options, model identity, runtime, versions) and which image
  (prompt index, seed) it is. ``series.recreate_image`` reads it back.

The seed in ``parameters`` is ours: each image's noise comes from a CPU ``torch.Generator`` seeded
with it, which A1111's own seeding does not reproduce.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from consistent_diffusion.core.errors import ConfigError

PARAMETERS_KEY = "parameters"  # A1111's chunk name
RECIPE_KEY = "consistent-diffusion"  # our chunk name
RECIPE_FORMAT = "consistent-diffusion/image-recipe/v1"

# diffusers scheduler class -> the sampler name A1111 writes for the same sampler family
A1111_SAMPLERS = {
    "DDIMScheduler": "DDIM",
    "DDPMScheduler": "DDPM",
    "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "DPMSolverMultistepScheduler": "DPM++ 2M",
    "UniPCMultistepScheduler": "UniPC",
    "PNDMScheduler": "PLMS",
    "LMSDiscreteScheduler": "LMS",
    "HeunDiscreteScheduler": "Heun",
}

# A1111's parameter regex (modules/infotext_utils.py, ``re_param_code``)
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")


def quote(value: Any) -> str:
    """A1111's ``infotext_utils.quote``: text with ``,``, ``:`` or a newline becomes a JSON string."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    """Inverse of ``quote`` (A1111's ``infotext_utils.unquote``)."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def format_parameters(prompt: str, negative_prompt: str, fields: dict[str, Any]) -> str:
    """The A1111 infotext: prompt, optional ``Negative prompt:`` line, then ``Key: value, ...``
    (fields whose value is None are left out)."""
    line = ", ".join(f"{key}: {quote(value)}" for key, value in fields.items() if value is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}".strip()


def parse_parameters(text: str) -> dict[str, Any]:
    """Read an A1111 infotext (ours or A1111's) into {"Prompt", "Negative prompt", key: value...};
    ``Size`` also gives ``Size-1``/``Size-2`` as A1111 does. The last line holds the parameters when
    it has at least three ``Key: value`` pairs; otherwise every line is prompt."""
    lines = text.strip().split("\n")
    result: dict[str, Any] = {}
    last = lines[-1] if lines else ""
    if len(_PARAM.findall(last)) >= 3:
        lines = lines[:-1]
        for key, value in _PARAM.findall(last):
            key, value = key.strip(), unquote(value.strip())
            result[key] = value
            size = _SIZE.match(value) if key == "Size" else None
            if size:
                result["Size-1"], result["Size-2"] = size.group(1), size.group(2)
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    return {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative), **result}


def sampler_name(scheduler_class: str) -> str:
    """A1111's name for a diffusers scheduler class (the class name when A1111 has none)."""
    return A1111_SAMPLERS.get(scheduler_class, scheduler_class)


def model_fields(model: dict[str, Any]) -> dict[str, Any]:
    """``Model hash`` (the first 10 hex digits of our weight fingerprint, where A1111 hashes the
    checkpoint file) and ``Model`` (the folder or file name) of a ``ModelIdentity.to_dict()``."""
    fingerprint = model.get("fingerprint")
    name = Path(str(model.get("path") or model.get("spec") or "")).name or str(model.get("spec"))
    return {"Model hash": fingerprint[:10] if fingerprint else None, "Model": name}


def version_field() -> dict[str, str]:
    """``Version``: this tool and its version."""
    from consistent_diffusion import __version__

    return {"Version": f"consistent-diffusion {__version__}"}


def png_text(parameters: str, recipe: dict[str, Any]) -> dict[str, str]:
    """The two chunks of one image: {"parameters": infotext, "consistent-diffusion": recipe JSON}."""
    return {PARAMETERS_KEY: parameters, RECIPE_KEY: json.dumps({"format": RECIPE_FORMAT, **recipe}, sort_keys=True)}


def read_png_text(path: str | os.PathLike) -> dict[str, str]:
    """The text chunks of an image file (tEXt, zTXt and iTXt); ConfigError if it is not a readable image."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()  # text chunks after the image data are read only once it is loaded
            text = dict(getattr(image, "text", {}) or {})
            info = {k: v for k, v in image.info.items() if isinstance(v, str)}
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ConfigError(f"{path} is not a readable image ({error})") from None
    return {**info, **text}


def read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Our recipe chunk of ``path`` as a dict; ConfigError when the image has none (with what it has)."""
    text = read_png_text(path)
    raw = text.get(RECIPE_KEY)
    if raw is None:
        has = " (it has A1111 parameters: `inspect` shows them)" if PARAMETERS_KEY in text else ""
        raise ConfigError(f"{path} carries no consistent-diffusion recipe{has}; only images this tool wrote can be re-created")
    try:
        recipe = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: its recipe chunk is not valid JSON ({error})") from None
    if not isinstance(recipe, dict) or recipe.get("format") != RECIPE_FORMAT:
        raise ConfigError(f"{path}: unknown recipe format {recipe.get('format') if isinstance(recipe, dict) else recipe!r} "
                          f"(this version reads {RECIPE_FORMAT})")
    return recipe

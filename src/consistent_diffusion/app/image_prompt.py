"""The "Image prompt" section of "Make a series": a style image and/or a subject image, each carried
by an IP-Adapter at its own scale, as one ``ip_adapter`` method (two images = two adapters: diffusers
takes a list, paper eq. 5 summed over them).

Which adapters the section offers comes from the library (``methods.ip_adapter.available``): the
embedded model's own once installed, and the folders the app was started with; a person may also
type a folder in the released layout. With none it shows the library's one-line reason.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from consistent_diffusion.core.errors import ConfigError

SLOTS = ("style", "subject")  # what each image of the section carries (its label and default adapter)


@dataclass
class ImagePromptForm:
    """The section as the page sends it. An image without an adapter is refused; an adapter without
    an image is off. preset: InstantStyle blocks for every adapter ("style", "style+layout"; None:
    all blocks)."""

    style_image: str | None = None
    style_adapter: str = ""
    style_scale: float = 1.0
    subject_image: str | None = None
    subject_adapter: str = ""
    subject_scale: float = 1.0
    preset: str | None = None

    def given(self) -> list[tuple[str, str, str, float]]:
        """(slot, image, adapter, scale) of each slot with an image, style first."""
        slots = []
        for slot in SLOTS:
            image = getattr(self, f"{slot}_image")
            if image:
                adapter = os.path.expanduser(str(getattr(self, f"{slot}_adapter") or "").strip())
                slots.append((slot, str(image), adapter, float(getattr(self, f"{slot}_scale"))))
        return slots


def image_prompt_method(form: ImagePromptForm, upload: Callable[[str, str], str], pipe: Any = None) -> Any:
    """The ``ip_adapter`` method ``form`` asks for, or None without an image. ``upload(path, what)``
    checks an uploaded image and returns the path to record; with ``pipe`` every adapter is checked
    against it first (family, cross-attention width), so a wrong one fails before any work."""
    from consistent_diffusion.methods.base import get_method

    given = form.given()
    if not given:
        return None
    for slot, _, adapter, _ in given:
        if not adapter:
            raise ConfigError(f"choose an adapter for the {slot} image (image prompt)")
        if pipe is not None:
            from consistent_diffusion.methods.ip_adapter.available import unfit_reason

            why = unfit_reason(adapter, pipe)
            if why is not None:
                raise ConfigError(f"{slot} image prompt: {why if adapter in why else f'{adapter} is {why}'}")
    images = tuple(upload(image, f"{slot} image prompt") for slot, image, _, _ in given)
    return get_method("ip_adapter", adapters=tuple(a for _, _, a, _ in given), images=images,
                      scales=tuple(s for _, _, _, s in given), preset=form.preset or None)


def adapter_choices(pipe: Any, folders: Sequence[str] = ()) -> tuple[list[str], dict[str, str | None], str]:
    """(choices, default per slot, note) for the section: the adapters ``pipe`` can take
    (``available_adapters``); each slot's default is the first whose name says its slot, else the
    first (None without any); the note is the library's reason when there is none, else ""."""
    from consistent_diffusion.methods.ip_adapter.available import available_adapters

    found = available_adapters(pipe, folders)
    names = list(found.names)
    defaults = {slot: next((n for n in names if slot in os.path.basename(n.rstrip("/"))), names[0] if names else None)
                for slot in SLOTS}
    return names, defaults, found.reason

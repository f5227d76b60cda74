"""Training of the probes shipped in ``assets/probes`` (``consistent-diffusion train probes``); the
probes themselves (inference) are ``consistent_diffusion.metrics.extractors.probes``.

Trained on the dataset's train split only; accuracies are measured on the val split, whose
identities the probes never saw.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.metrics.extractors.probes import PROBE_NAMES, PROBE_SIZE, PROBES_DIR, Probe


@dataclass
class ProbeTrainConfig:
    """Training of one probe."""

    name: str  # style | content
    epochs: int = 12  # passes over the train split
    batch: int = 64  # images per step
    lr: float = 2e-3  # AdamW learning rate (cosine to 0)
    width: int = 32  # encoder width
    embed_dim: int = 64  # embedding size
    identity_weight: float = 0.5  # weight of the identity loss (content probe only)
    blur: float = 0.5  # share of training images mildly blurred (robustness to soft generated images)
    seed: int = 0  # init, order and augmentation

    def __post_init__(self) -> None:
        if self.name not in PROBE_NAMES:
            raise ConfigError(f"probe name must be one of {PROBE_NAMES}, got {self.name!r}")
        for field_name in ("epochs", "batch", "lr", "width", "embed_dim"):
            if not getattr(self, field_name) > 0:
                raise ConfigError(f"{field_name} must be > 0")




def augment(x: torch.Tensor, generator: torch.Generator, blur_share: float = 0.5) -> torch.Tensor:
    """Random shift (up to 4 px, white fill), mild blur for ``blur_share`` of the batch, small noise.

    Blur and noise keep the probes from relying on crispness, which generated images lack.
    """
    b = len(x)
    padded = F.pad(x, (4, 4, 4, 4), value=1.0)
    dy, dx = torch.randint(0, 9, (2,), generator=generator).tolist()
    x = padded[:, :, dy:dy + PROBE_SIZE, dx:dx + PROBE_SIZE]
    blur = torch.rand(b, generator=generator) < blur_share
    if blur.any():
        kernel = torch.tensor([1.0, 2.0, 1.0]) / 4.0
        kernel = (kernel[:, None] * kernel[None, :]).expand(3, 1, 3, 3)
        x = torch.where(blur[:, None, None, None], F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3), x)
    return (x + 0.03 * torch.randn(x.shape, generator=generator)).clamp(-1, 1)


def _labels_for(name: str, records: list[dict], rows: np.ndarray, label_names: list[str]) -> torch.Tensor:
    key = "style" if name == "style" else "category"
    index = {label: k for k, label in enumerate(label_names)}
    return torch.tensor([index[records[i][key]] for i in rows])


def train_probe(config: ProbeTrainConfig, data: str | os.PathLike, threads: int = 1,
                progress: bool = True) -> tuple[Probe, dict]:
    """Train one probe on the train split; return (model, metadata with val accuracy)."""
    from tqdm.auto import tqdm

    from consistent_diffusion.data.emoji import load_emoji_dataset

    torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    dataset = load_emoji_dataset(data)
    label_names = dataset.trained_styles if config.name == "style" else dataset.categories  # held-out styles: no class
    train, val = dataset.trainable("train"), dataset.trainable("val")  # never a held-out style
    pixels = torch.from_numpy(dataset.images).permute(0, 3, 1, 2)
    y = _labels_for(config.name, dataset.records, train, label_names)
    identities = sorted({dataset.records[i]["identity"] for i in train})
    id_index = {identity: k for k, identity in enumerate(identities)}
    y_id = torch.tensor([id_index[dataset.records[i]["identity"]] for i in train])
    use_ids = config.name == "content" and config.identity_weight > 0
    model = Probe(len(label_names), config.width, config.embed_dim, len(identities) if use_ids else 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-2)
    steps = config.epochs * max(1, len(train) // config.batch)
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(config.seed)
    started = time.monotonic()
    model.train()
    for _ in tqdm(range(steps), desc=f"probe {config.name}", disable=not progress):
        pick = torch.randint(0, len(train), (config.batch,), generator=generator)
        x = augment(pixels[train[pick.numpy()]].float() / 127.5 - 1.0, generator, config.blur)
        emb = model.embed(x)
        loss = F.cross_entropy(model.head(emb * 8.0), y[pick])
        if use_ids:
            loss = loss + config.identity_weight * F.cross_entropy(model.identity_head(emb * 16.0), y_id[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
    model.eval()
    model.identity_head = None  # not shipped: only train identities, useless elsewhere
    meta = {"name": config.name, "labels": label_names, "config": asdict(config), "steps": steps,
            "train_minutes": round((time.monotonic() - started) / 60, 2),
            "val": evaluate_probe(model, dataset, val, config.name, label_names)}
    return model, meta


@torch.no_grad()
def evaluate_probe(model: Probe, dataset, rows: np.ndarray, name: str, label_names: list[str]) -> dict:
    """Held-out accuracy (and, for content, cross-style nearest-neighbour identity retrieval)."""
    if len(rows) == 0:
        return {}
    x = torch.from_numpy(dataset.images[rows]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    y = _labels_for(name, dataset.records, rows, label_names)
    emb = torch.cat([model.embed(x[s:s + 256]) for s in range(0, len(x), 256)])
    accuracy = float((model.head(emb * 8.0).argmax(1) == y).float().mean())
    result = {"images": len(rows), "accuracy": round(accuracy, 4), "chance": round(1 / len(label_names), 4)}
    if name == "content":
        result["identity_top1_cross_style"] = round(cross_style_retrieval(dataset, rows, emb), 4)
    return result


def cross_style_retrieval(dataset, rows: np.ndarray, emb: torch.Tensor) -> float:
    """Share of images whose nearest neighbour among *other-style* images is the same identity."""
    styles = [dataset.records[i]["style"] for i in rows]
    identities = [dataset.records[i]["identity"] for i in rows]
    similarity = emb @ emb.T
    same_style = torch.tensor([[a == b for b in styles] for a in styles])
    similarity[same_style] = -2.0
    nearest = similarity.argmax(1).tolist()
    return float(np.mean([identities[i] == identities[j] for i, j in enumerate(nearest)]))


def save_probe(model: Probe, meta: dict, folder: str | os.PathLike = PROBES_DIR) -> Path:
    """Write <name>.safetensors (fp16) and <name>.json into ``folder``."""
    from safetensors.torch import save_file

    from consistent_diffusion.core.outputs import atomic_path, write_text_atomic

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = meta["name"]
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(folder / f"{name}.safetensors") as temp:
        save_file(state, str(temp))
    write_text_atomic(json.dumps(meta, indent=1), folder / f"{name}.json")
    return folder / f"{name}.safetensors"


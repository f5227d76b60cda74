#!/usr/bin/env python
"""Ship an embedded IP-Adapter: its committed stage hand-off becomes the package's adapter folder.

    python scripts/ship_ip_adapter.py --pairing style      # -> assets/ip_adapter/embedded-style
    python scripts/ship_ip_adapter.py --pairing subject    # -> assets/ip_adapter/embedded-subject

Reads ``stages/embedded-ip-adapters/<pairing>.handoff.pt`` (or ``--handoff``), writes the released
layout in float16 with ``adapter.json`` (encoder, pairing, the embedded model's identity, the steps
trained and the stage file it came from), atomically. ``ip_adapter`` then takes it by name
(``embedded-style`` / ``embedded-subject``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ROOT / "stages" / "embedded-ip-adapters"


def main() -> None:
    from consistent_diffusion.methods.ip_adapter.embedded import PAIRINGS, SHIPPED_PREFIX, shipped_folder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairing", choices=PAIRINGS, required=True)
    parser.add_argument("--handoff", type=Path, help="default: the committed stage of this pairing")
    args = parser.parse_args()

    from consistent_diffusion.models.loading import load_pipeline, model_identity
    from consistent_diffusion.training.ip_adapter import export_state

    handoff = args.handoff or STAGES / f"{args.pairing}.handoff.pt"
    pipe = load_pipeline("embedded")
    source = handoff.resolve().relative_to(ROOT).as_posix() if handoff.resolve().is_relative_to(ROOT) else handoff.name
    meta = {"pairing": args.pairing, "base_model": model_identity(pipe).to_dict(),
            "cross_attention_dim": int(pipe.unet.config.cross_attention_dim), "source": source}
    folder = export_state(handoff, shipped_folder(SHIPPED_PREFIX + args.pairing), meta)
    written = sum(path.stat().st_size for path in folder.iterdir())
    print(f"shipped {folder.relative_to(ROOT).as_posix()} ({written / 1e6:.2f} MB) from {source}")


if __name__ == "__main__":
    main()

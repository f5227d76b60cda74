"""Append one committed training stage to a staged run's record (``stages/<run>/record.json``).

    python scripts/stage_record.py --run RUN --stage unet --record stages/embedded-v2/record.json \
        --command "consistent-diffusion train base ..." [--note TEXT]
    python scripts/stage_record.py --run RUN --stage ip-adapter-style --log RUN/log.jsonl \
        --record stages/embedded-ip-adapters/record.json --command "consistent-diffusion train ip-adapter ..."

A long recipe on a 2-core machine is trained in stages that each finish and are committed inside
one working session (``train base --pause-after-minutes``, ``--handoff``, ``--warm-start``). Each
entry says which steps the stage trained, for how long, on how many threads, with which command,
and the stage's validation numbers, read from ``RUN/state/<stage>/log.jsonl`` (this session's part:
the records after the last step of the previous entry of the same stage). Paths are reduced to
their last component, so the record names no machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
from pathlib import Path

from consistent_diffusion.core.outputs import utc_now, write_json_atomic


def log_records(run: Path, stage: str, log: Path | None = None) -> list[dict]:
    path = log or run / "state" / stage / "log.jsonl"
    if not path.is_file():
        raise SystemExit(f"no training log at {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stage_entry(records: list[dict], after_step: int) -> dict:
    """Steps, wall time and last validation of the log records past ``after_step``."""
    mine = [r for r in records if r["step"] > after_step]
    if not mine:
        raise SystemExit(f"the log has nothing after step {after_step}: was this stage already recorded?")
    steps = [r for r in mine if "loss" in r]
    vals = [r for r in mine if "val" in r]
    earlier = [r.get("elapsed_s", 0.0) for r in records if r["step"] <= after_step]
    # a warm-started run's own log starts past the hand-off's step, its elapsed_s counting on from it
    before = max(earlier) if earlier else steps[0].get("elapsed_s", 0.0) - steps[0].get("seconds", 0.0) if steps else 0.0
    elapsed = max(r.get("elapsed_s", 0.0) for r in mine)
    return {
        "steps": [after_step, max(r["step"] for r in mine)],
        "train_minutes": round((elapsed - before) / 60, 1),
        "seconds_per_step": round(sum(r.get("seconds", 0.0) for r in steps) / max(1, len(steps)), 3),
        "last_loss": steps[-1]["loss"] if steps else None,
        "validation": [{"step": r["step"], **r["val"]} for r in vals],
    }


def without_paths(command: str) -> str:
    """Absolute paths in a command line -> their last component."""
    return re.sub(r"(?<![\w.-])/(?:[^\s/]+/)*([^\s/]+)", r"\1", command)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, type=Path, help="the run folder the stage trained in")
    parser.add_argument("--stage", required=True,
                        choices=("vae", "unet", "decoder", "ip-adapter-style", "ip-adapter-subject"))
    parser.add_argument("--log", type=Path, default=None,
                        help="the stage's log.jsonl (default RUN/state/STAGE/log.jsonl, where `train base` writes it)")
    parser.add_argument("--record", required=True, type=Path, help="record.json to append to (created if missing)")
    parser.add_argument("--command", required=True, help="the command line the stage ran")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads the stage trained with")
    parser.add_argument("--note", default="", help="anything the next stage should know")
    args = parser.parse_args()
    record = json.loads(args.record.read_text()) if args.record.is_file() else {"stages": []}
    done = max((e["steps"][1] for e in record["stages"] if e["stage"] == args.stage), default=0)
    entry = {"stage": args.stage, "recorded": utc_now(), "machine": f"{platform.machine()}, {args.threads} threads",
             **stage_entry(log_records(args.run, args.stage, args.log), done),
             "command": without_paths(args.command), "note": args.note}
    record["stages"].append(entry)
    write_json_atomic(record, args.record)
    print(json.dumps(entry, indent=1))


if __name__ == "__main__":
    main()

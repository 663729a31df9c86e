"""The end-to-end part of ``cxr-mq bench``: one embedded demo round, encrypted and plaintext,
on the same data and model, and the ratio of their wall times."""
from __future__ import annotations

from dataclasses import replace

from .config import Settings
from .demo import DemoOptions, run_demo


def round_overhead(settings: Settings, options: DemoOptions | None = None, repeats: int = 1) -> dict:
    """Run the demo machinery for one round in each mode, ``repeats`` times alternating, and
    compare the medians (the machine is shared, so alternate rather than run back to back)."""
    options = options or DemoOptions(rounds=1)
    walls: dict[str, list[float]] = {"encrypted": [], "plaintext": []}
    rows = {}
    for _ in range(repeats):
        for mode in ("plaintext", "encrypted"):
            result = run_demo(replace(options, plaintext=mode == "plaintext"), settings)
            row = result.rounds[-1]
            walls[mode].append(row.wall_seconds)
            rows[mode] = row
    median = {mode: sorted(v)[len(v) // 2] for mode, v in walls.items()}
    return {
        "model": options.model,
        "image_size": options.image_size,
        "hospitals": options.hospitals,
        "round_seconds_encrypted": median["encrypted"],
        "round_seconds_plaintext": median["plaintext"],
        "round_overhead_ratio": median["encrypted"] / median["plaintext"],
        "encrypt_seconds": rows["encrypted"].encrypt_seconds,
        "aggregate_seconds": rows["encrypted"].aggregate_seconds,
        "bytes_per_round_encrypted": rows["encrypted"].bytes_uploaded,
        "bytes_per_round_plaintext": rows["plaintext"].bytes_uploaded,
    }

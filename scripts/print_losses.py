"""Print a fit's losses from its TensorBoard events, first to last: ``train/loss`` at a few optimizer steps and
``val/loss`` at every validation. What TensorBoard would plot, as text, for a terminal or a CI log.

    python scripts/print_losses.py checkpoints/demo/version_0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

TAGS = {"train/loss": "the records it trains on", "val/loss": "the validation records"}


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` for the tags of :data:`TAGS` the run logged, every event kept."""
    acc = EventAccumulator(str(run), size_guidance={SCALARS: 0})  # 0 = keep every event, not a sample
    acc.Reload()
    logged = set(acc.Tags()["scalars"])
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in TAGS if tag in logged}


def spread(points: list[tuple[int, float]], most: int) -> list[tuple[int, float]]:
    """At most ``most`` of ``points``, evenly spaced, the first and the last always among them."""
    if len(points) <= most:
        return points
    picks = sorted({round(i * (len(points) - 1) / (most - 1)) for i in range(most)})
    return [points[i] for i in picks]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run folder (checkpoints/<name>/version_N) or its events file")
    parser.add_argument("--points", type=int, default=7, help="train/loss values to print (default: %(default)s)")
    args = parser.parse_args(argv)
    found = scalars(args.run) if args.run.exists() else {}
    if not found:
        print(f"{args.run}: no train/loss or val/loss in TensorBoard events there", file=sys.stderr)
        return 1
    for tag, points in found.items():
        shown = points if tag == "val/loss" else spread(points, max(2, args.points))
        first, last = points[0][1], points[-1][1]
        print(f"{tag} ({TAGS[tag]}): {first:.3f} -> {last:.3f} over {len(points)} logged value(s)")
        print("  " + "  ".join(f"step {step}: {value:.3f}" for step, value in shown))
    return 0


if __name__ == "__main__":
    sys.exit(main())

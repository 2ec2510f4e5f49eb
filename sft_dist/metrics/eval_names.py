"""The metrics sft_dist's evaluation reports (train/evaluation.py), and which way each is better: what
`training.metric_for_best_model` may name, and the `greater_is_better` it implies.

HF's Trainer guesses the direction from the name alone (better is greater unless it ends in "loss"), which picks
the worst checkpoint by perplexity; sft_dist sets it from this table unless `training.greater_is_better` is given.
"""

from __future__ import annotations

from sft_dist.metrics.text import NAMES as TEXT_NAMES

# name (without the "eval_" prefix) -> greater is better
FROM_LOSS = {"loss": False, "perplexity": False, "mean_token_accuracy": True}
FROM_GENERATION = dict.fromkeys(TEXT_NAMES, True)  # with metrics.generate_eval_rows > 0


def bare(name: str) -> str:
    """The metric's name without HF's "eval_" prefix (the Trainer adds it when missing)."""
    return name.removeprefix("eval_")


def choices(generate_eval_rows: int, sets: tuple[str, ...] = ()) -> dict[str, bool]:
    """The metrics an evaluation of this run reports that a best checkpoint can be chosen by: over all eval rows,
    and per named eval set (`data.eval_files: {name: files}`) as `<name>_<metric>`."""
    base = {**FROM_LOSS, **(FROM_GENERATION if generate_eval_rows > 0 else {})}
    return {**base, **{f"{s}_{m}": better for s in sets for m, better in base.items()}}


def greater_is_better(name: str, sets: tuple[str, ...] = ()) -> bool | None:
    """Which way `name` is better, or None for a name sft_dist does not report."""
    return {**FROM_LOSS, **FROM_GENERATION, **choices(1, sets)}.get(bare(name))

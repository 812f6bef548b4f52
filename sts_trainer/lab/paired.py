"""Paired ratios: one variant's held-out accuracy over another's in the same experiment, on the same seeds and
questions, with the crossed bootstrap 95% interval the experiment gives retention (`retention_interval`).

    python -m sts_trainer.lab.paired --results grid_4x_deep \\
        --variant "VTC uniform 0.5 original positions" --over "VTC uniform 0.5"

reads the folder's `accuracy.json` (written by `python -m sts_trainer.lab.experiment`; it keeps every run's answer to
every held-out question) and prints the ratio of the two variants' pooled accuracies with its interval. Retention is
the paired ratio over `baseline`; a ratio between two sparse variants says which keeps more, with the noise they
share (seeds, questions, foundation pairs) cancelled. With several foundation pairs, the interval resamples pairs,
then seeds within them, as the experiment's does.
"""

import argparse
import json
import os

import numpy as np

from .experiment import retention_interval, run_key


def run_keys(arguments: dict) -> list[str]:
    """The keys of `accuracy.json`'s runs in the experiment's row order: pair 0's seeds, then pair 1's, ..."""
    seeds, pairs = arguments["seeds"], arguments.get("foundation_seeds", 1)
    return [str(run_key(pair, seed)) for pair in range(pairs) for seed in range(seeds)]


def answers(results: dict, variant: str) -> np.ndarray:
    """A variant's answers, (runs, questions) of 0/1, in `run_keys` order."""
    rows = []
    for key in run_keys(results["arguments"]):
        runs = results["runs"].get(key)
        if runs is None:
            raise ValueError(f"accuracy.json has no runs for {key!r}; run the experiment to the end first.")
        if variant not in runs:
            raise ValueError(f"No variant {variant!r} among the runs of {key!r}; they are: {', '.join(runs)}.")
        rows.append(runs[variant]["correct"])
    return np.array(rows, dtype=float)


def paired_ratio(results: dict, variant: str, over: str, resamples: int | None = None) -> tuple[float, float, float]:
    """`variant`'s pooled accuracy over `over`'s, with its crossed bootstrap 95% interval (the experiment's number of
    resamples unless given)."""
    arguments = results["arguments"]
    return retention_interval(answers(results, variant), answers(results, over),
                              resamples or arguments.get("bootstrap", 2000),
                              pairs=arguments.get("foundation_seeds", 1))


def main(argv: list[str] | None = None) -> tuple[float, float, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", required=True, help="an experiment's output folder (with accuracy.json)")
    parser.add_argument("--variant", required=True, help="the variant in the numerator, named as in the experiment")
    parser.add_argument("--over", default="baseline", help="the variant in the denominator (default: baseline)")
    parser.add_argument("--resamples", type=int, help="bootstrap resamples (default: the experiment's)")
    args = parser.parse_args(argv)
    path = os.path.join(args.results, "accuracy.json")
    if not os.path.exists(path):
        parser.error(f"no accuracy.json in {args.results!r}: run `python -m sts_trainer.lab.experiment "
                     f"--output_dir {args.results}` first")
    with open(path) as f:
        results = json.load(f)
    point, low, high = paired_ratio(results, args.variant, args.over, args.resamples)
    print(f"{args.variant} over {args.over}: {100 * point:.1f}% [{100 * low:.1f}, {100 * high:.1f}] "
          f"(crossed bootstrap 95% interval, {len(run_keys(results['arguments']))} runs each)")
    return point, low, high


if __name__ == "__main__":
    main()

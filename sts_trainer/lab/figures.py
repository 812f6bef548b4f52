"""Figures of the accuracy experiment: retention against the regime, and the frontier of saving against retention.

    python -m sts_trainer.lab.figures --results zero_cmp grid_4x_deep --out docs

reads each folder's `accuracy.json` (written by `python -m sts_trainer.lab.experiment`), in the order given (from
the harshest regime to the most LLaVA-like), and writes
- `accuracy_regimes.png`: each variant's retention with its crossed 95% interval in every regime that has it, one
  line per variant (a variant measured in one regime only is a single point);
- `accuracy_frontier.png`: in the last folder's regime, each variant's retention against the share of
  LLaVA-1.5-7B's whole-run training FLOPs `sts-plan` prices its two stages at (variants without a price, the
  equal-compute dense baseline, are left out).
The dashed line marks 100% retention, the dotted one 99%.
"""

import argparse
import json
import os

from .experiment import SUMMARY_NAMES
from .foundation import EXPERIMENT_RECIPES


def load_results(folder: str) -> dict:
    """A folder's `accuracy.json`, with its regime: the file's own, or (files written before it held one) the length
    and the language model's depth it was run with."""
    path = os.path.join(folder, "accuracy.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"No accuracy.json in {folder!r}: run `python -m sts_trainer.lab.experiment "
                                f"--output_dir {folder}` first.")
    with open(path) as f:
        results = json.load(f)
    if "regime" not in results:
        arguments = results["arguments"]
        name = "quick" if arguments.get("quick") else arguments.get("foundation", "default")
        layers = EXPERIMENT_RECIPES[name].lm_layers
        results["regime"] = f"{arguments.get('length', 1.0):g}x, {layers} layers" + (
            ", original positions" if arguments.get("vtc_position_ids") == "original" else "")
    return results


def retention_points(results: list[dict]) -> dict[str, list[tuple[int, float, float, float]]]:
    """Per variant (the baseline left out), (regime index, retention, 95% low, 95% high) in %, for every regime whose
    results have that variant's retention."""
    points: dict[str, list] = {}
    for i, result in enumerate(results):
        for row in result["rows"]:
            if row["variant"] == "baseline" or "pooled_retention" not in row:
                continue
            r = row["pooled_retention"]
            points.setdefault(row["variant"], []).append((i, 100 * r["point"], 100 * r["ci95"][0],
                                                          100 * r["ci95"][1]))
    return points


def plot_regimes(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = retention_points(results)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    shift = 0.25 / max(len(points), 1)  # side by side, so the intervals do not hide each other
    for j, (variant, values) in enumerate(points.items()):
        x = [i + (j - len(points) / 2) * shift for i, *_ in values]
        y = [v[1] for v in values]
        errors = [[v[1] - v[2] for v in values], [v[3] - v[1] for v in values]]
        ax.errorbar(x, y, yerr=errors, marker="o", capsize=3, label=SUMMARY_NAMES.get(variant, variant))
    ax.axhline(100, color="grey", linestyle="--", linewidth=1)
    ax.axhline(99, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(range(len(results)), [r["regime"] for r in results])
    ax.set_xlim(-0.5, len(results) - 0.5)
    ax.set_ylabel("retention of dense accuracy (%), crossed 95% interval")
    ax.set_title("Retention by regime (miniature LLaVA)")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_frontier(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.5))
    for row in result["rows"]:
        saved = row.get("llava_plan_flops_saved")
        if saved is None or "pooled_retention" not in row or row["variant"] == "baseline":
            continue
        r = row["pooled_retention"]
        y = 100 * r["point"]
        ax.errorbar([100 * saved], [y], yerr=[[y - 100 * r["ci95"][0]], [100 * r["ci95"][1] - y]], marker="o",
                    capsize=3, color="C0")
        ax.annotate(SUMMARY_NAMES.get(row["variant"], row["variant"]), (100 * saved, y), textcoords="offset points",
                    xytext=(5, 3), fontsize=7)
    ax.axhline(100, color="grey", linestyle="--", linewidth=1)
    ax.axhline(99, color="grey", linestyle=":", linewidth=1)
    ax.set_xlim(left=0, right=max([ax.get_xlim()[1] * 1.35, 10]))  # room for the names
    ax.set_xlabel("LLaVA-1.5-7B whole-run training FLOPs saved (%, sts-plan)")
    ax.set_ylabel("retention of dense accuracy (%), crossed 95% interval")
    ax.set_title(f"Saving against retention ({result['regime']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", nargs="+", required=True,
                        help="experiment output folders (each with accuracy.json), harshest regime first")
    parser.add_argument("--out", default=".", help="folder for accuracy_regimes.png and accuracy_frontier.png")
    args = parser.parse_args(argv)
    results = [load_results(folder) for folder in args.results]
    os.makedirs(args.out, exist_ok=True)
    paths = {"regimes": os.path.join(args.out, "accuracy_regimes.png"),
             "frontier": os.path.join(args.out, "accuracy_frontier.png")}
    plot_regimes(results, paths["regimes"])
    plot_frontier(results[-1], paths["frontier"])
    for path in paths.values():
        print(f"wrote {path}")
    return paths


if __name__ == "__main__":
    main()

"""Figures of the accuracy experiment: retention against the regime, and the frontier of saving against retention.

    python -m sts_trainer.lab.figures --results zero_cmp grid_4x_deep --out docs

reads each folder's `accuracy.json` (written by `python -m sts_trainer.lab.experiment`), in the order given (from
the harshest regime to the most LLaVA-like), and writes
- `accuracy_regimes.png`: each variant's retention with its crossed 95% interval in every regime that has it, one
  line per variant (a variant measured in one regime only is a single point);
- `accuracy_frontier.png`: in the last folder's regime, each variant's retention against the share of
  LLaVA-1.5-7B's whole-run training FLOPs `sts-plan` prices its two stages at (variants without a price, the
  equal-compute dense baseline, are left out).

    python -m sts_trainer.lab.figures --summary docs/accuracy.md --out docs

reads the summary table of a markdown file (docs/accuracy.md, or an experiment's own accuracy.md: the table under
the line `| variant | regime | retention | 95% low | 95% high | LLaVA-1.5-7B FLOPs saved |`) and writes
- `accuracy_axes.png`: each regime axis alone, from the rows whose regime is a length and a depth only
  (`2x, 12 layers`): retention against training length at each depth measured at two lengths or more, and against
  the language model's depth at each length measured at two depths or more.
The dashed line marks 100% retention, the dotted one 99%.
"""

import argparse
import json
import os
import re

from .experiment import SUMMARY_HEADER, SUMMARY_NAMES
from .foundation import EXPERIMENT_RECIPES

PLAIN_REGIME = re.compile(r"^(\d+(?:\.\d+)?)x, (\d+) layers$")  # a length and a depth, nothing else


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


def read_summary(path: str) -> list[dict]:
    """The summary table's rows in a markdown file, in its order: each {variant, regime, retention, low, high}, the
    last three in %."""
    with open(path) as f:
        lines = [line.strip() for line in f]
    if SUMMARY_HEADER not in lines:
        raise ValueError(f"{path!r} has no summary table: no line reads exactly {SUMMARY_HEADER!r} (the table "
                         "`python -m sts_trainer.lab.experiment` writes into its accuracy.md).")
    rows = []
    for line in lines[lines.index(SUMMARY_HEADER) + 2:]:  # past the header and its |---| line
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) != 6:
            raise ValueError(f"{path!r}: the summary row {line!r} has {len(cells)} cells; the header has 6.")
        try:
            retention, low, high = (float(cell) for cell in cells[2:5])
        except ValueError:
            raise ValueError(f"{path!r}: the summary row {line!r} has a retention or interval that is not a number."
                             ) from None
        rows.append({"variant": cells[0], "regime": cells[1], "retention": retention, "low": low, "high": high})
    return rows


def axis_points(rows: list[dict]) -> dict[str, dict[tuple[float, int], tuple[float, float, float]]]:
    """Per variant, {(length, layers): (retention, low, high)} from the rows whose regime is a length and a depth
    only (the baseline, 100% by definition, left out); rows of other regimes (`, no fixed layout`, `, 3 foundation
    pairs`) lie on no single axis."""
    points: dict[str, dict] = {}
    for row in rows:
        match = PLAIN_REGIME.match(row["regime"])
        if match is None or row["variant"] == "baseline":
            continue
        key = (float(match.group(1)), int(match.group(2)))
        variant = points.setdefault(row["variant"], {})
        if key in variant:
            raise ValueError(f"Two summary rows for {row['variant']!r} in the regime {row['regime']!r}; keep one.")
        variant[key] = (row["retention"], row["low"], row["high"])
    return points


def axis_curves(points: dict) -> tuple[list, list]:
    """The curves of each axis alone, each (variant, the other axis's value, [(x, retention, low, high), ...]) with
    two points or more: against length at each depth, and against depth at each length."""
    length, depth = [], []
    for variant, values in points.items():
        for layers in sorted({d for _, d in values}):
            curve = sorted((x, *values[x, d]) for x, d in values if d == layers)
            if len(curve) > 1:
                length.append((variant, layers, curve))
        for factor in sorted({x for x, _ in values}):
            curve = sorted((d, *values[x, d]) for x, d in values if x == factor)
            if len(curve) > 1:
                depth.append((variant, factor, curve))
    return length, depth


def plot_axes(points: dict, path: str) -> None:
    length, depth = axis_curves(points)
    if not length and not depth:
        raise ValueError("No variant has two regimes that differ in length alone or depth alone: nothing to plot.")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {variant: f"C{i}" for i, variant in enumerate(points)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 7), sharey=True)
    panels = ((axes[0], length, "{:g} layers", "training length (times the 1x recipe's steps and scenes)",
               "Length alone"),
              (axes[1], depth, "{:g}x", "language-model layers", "Depth alone"))
    for ax, curves, fixed, xlabel, title in panels:
        for j, (variant, value, curve) in enumerate(curves):
            nudge = 1 + 0.015 * (j - len(curves) / 2)  # side by side, so the intervals do not hide each other
            x = [c[0] * nudge for c in curve]
            y = [c[1] for c in curve]
            errors = [[c[1] - c[2] for c in curve], [c[3] - c[1] for c in curve]]
            ax.errorbar(x, y, yerr=errors, marker="o", capsize=3, color=colours[variant],
                        label=f"{variant}, {fixed.format(value)}")
        ticks = sorted({c[0] for _, _, curve in curves for c in curve})
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.axhline(100, color="grey", linestyle="--", linewidth=1)
        ax.axhline(99, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        if curves:  # below the panel, where it hides no interval
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=1)
    axes[0].set_ylabel("retention of dense accuracy (%), 95% interval")
    fig.suptitle("Each regime axis alone (miniature LLaVA)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", nargs="+", default=[],
                        help="experiment output folders (each with accuracy.json), harshest regime first: "
                             "accuracy_regimes.png and accuracy_frontier.png")
    parser.add_argument("--summary", help="a markdown file with the summary table (docs/accuracy.md): "
                                          "accuracy_axes.png")
    parser.add_argument("--out", default=".", help="folder for the figures")
    args = parser.parse_args(argv)
    if not args.results and args.summary is None:
        parser.error("give --results (experiment folders), --summary (a markdown file with the summary table), "
                     "or both")
    os.makedirs(args.out, exist_ok=True)
    paths = {}
    if args.results:
        results = [load_results(folder) for folder in args.results]
        paths["regimes"] = os.path.join(args.out, "accuracy_regimes.png")
        paths["frontier"] = os.path.join(args.out, "accuracy_frontier.png")
        plot_regimes(results, paths["regimes"])
        plot_frontier(results[-1], paths["frontier"])
    if args.summary is not None:
        paths["axes"] = os.path.join(args.out, "accuracy_axes.png")
        plot_axes(axis_points(read_summary(args.summary)), paths["axes"])
    for path in paths.values():
        print(f"wrote {path}")
    return paths


if __name__ == "__main__":
    main()

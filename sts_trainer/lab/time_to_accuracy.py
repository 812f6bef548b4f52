"""Time to accuracy: held-out accuracy against cumulative training compute, for dense training, STS's defaults and
`sts_plus` (by default), on the accuracy experiment's testbed.

    python -m sts_trainer.lab.time_to_accuracy --results grid_4x_deep --checkpoints 8 --out docs

Reads a finished experiment folder (`python -m sts_trainer.lab.experiment --output_dir <results>`, run with the
variants asked for here). For each of its seeds, each variant's stage 2 trains again from the stage 1 the experiment
kept, with the same data, seed and arguments, saving the model every `steps / checkpoints` optimizer steps; each
checkpoint, loaded in plain transformers (dense: nothing skipped or compressed), answers the held-out questions.

Cumulative compute at a checkpoint = the variant's whole stage 1 + its stage 2 up to that step:
- training FLOPs from the savings ledger (actual FLOPs of each micro-batch); a dense stage counts what a sparse run
  of the same seed and stage counted as dense for the same micro-batches (`experiment.dense_references`);
- wall-clock: the stage-1 run's as the experiment timed it, plus this run's training seconds up to the step
  (checkpoint saving excluded).
The last point is the run the experiment evaluated; its answers are compared with the experiment's (`reproduced`),
so the curve ends at the experiment's number.

A checkpoint in the middle of a run is not a shorter run: its learning rate has not decayed yet (cosine). The curve
says what a run of this length has reached by a given budget; the experiment's `dense at STS's FLOPs` (drawn as a
point when the folder has it) is the shorter complete run.

Writes `<results>/time_to_accuracy.json` and `.md` and `<out>/time_to_accuracy.png`. Each finished run is kept
(`<results>/curves/seed<N>/<variant>/curve.json`): run the same command again and only what is missing trains.
"""

import argparse
import glob
import json
import os
import statistics
import time

import torch
from transformers import TrainerCallback
from transformers.utils import logging as hf_logging

from ..llava.data import DataArguments
from ..llava.evaluate import read_questions
from ..llava.train import ModelArguments, run
from .experiment import (STAGE2, SUMMARY_NAMES, VARIANTS, ExperimentArguments, _done, _training_args, evaluate_run,
                         stage1_folder, stage2_folder, write_results)
from .foundation import QUICK_RECIPE, EXPERIMENT_RECIPES, build_foundation
from .synthetic import write_dataset

DEFAULT_VARIANTS = ("baseline", "STS (VTC uniform 0.5 + LDS)",
                    "VTC-I uniform 0.15 + full 0.1 + LDS (after VTC uniform 0.5)")
TARGET = 0.99  # the share of dense's final accuracy a variant must reach


class TrainingClock(TrainerCallback):
    """Training seconds up to each optimizer step, the time spent saving checkpoints left out."""

    def __init__(self):
        self.seconds: dict[int, float] = {}
        self._start = self._last = None
        self._saving = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._last = time.perf_counter()
        self.seconds[state.global_step] = self._last - self._start - self._saving

    def on_save(self, args, state, control, **kwargs):
        self._saving += time.perf_counter() - self._last  # from the step's end: logging and saving


def checkpoint_steps(steps: int, checkpoints: int) -> list[int]:
    """The optimizer steps at which a run of `steps` saves with `checkpoints` evenly spaced checkpoints (the last
    one at `steps`)."""
    if checkpoints < 1:
        raise ValueError(f"checkpoints must be >= 1, got {checkpoints}.")
    every = max(1, -(-steps // checkpoints))
    return sorted({*range(every, steps, every), steps})


def compute_to_reach(compute: list[float], accuracy: list[float], target: float) -> float | None:
    """The compute at which a curve (points in order of compute) first reaches `target` accuracy, interpolated
    linearly between the checkpoint below and the one at or above it; the first checkpoint's compute when it is
    already there (an upper bound: nothing earlier was measured); None when no checkpoint reaches it."""
    for i, (x, y) in enumerate(zip(compute, accuracy)):
        if y >= target:
            if i == 0:
                return x
            x0, y0 = compute[i - 1], accuracy[i - 1]
            return x0 + (x - x0) * (target - y0) / (y - y0)
    return None


def _stage1_cost(root: str, stage1: dict, alignment_steps: int) -> tuple[float, float]:
    """A variant's stage 1: its training FLOPs (a dense one's from a VTC run of the same seed, which counts the same
    micro-batches densely) and its wall-clock seconds."""
    if stage1["sts"]:
        return stage1["sts"]["actual_flops"], stage1["wall_clock_seconds"]
    for path in sorted(glob.glob(os.path.join(root, "stage1", "*", "sts_train_summary.json"))):
        other = _done(path)
        if other["sts"] and other["steps"] == alignment_steps and other["sts"]["dense_flops"]:
            return other["sts"]["dense_flops"], stage1["wall_clock_seconds"]
    raise FileNotFoundError(f"No sparse stage-1 run in {root}/stage1 counts its dense FLOPs: run the experiment with a "
                            "VTC variant (e.g. 'VTC uniform 0.5') too.")


def _per_step(records: list[dict], key: str, steps: int) -> list[float]:
    """A ledger's `key` ('dense_flops' or 'actual_flops') summed per optimizer step, over the step's micro-batches."""
    per_step = [0.0] * steps
    for r in records:
        per_step[r["step"]] += r[key]
    return per_step


def _dense_per_step(root: str, steps: int) -> list[float]:
    """Dense training FLOPs of each stage-2 step of this seed, from a sparse stage-2 run's ledger (every run of a
    seed and stage trains on the same micro-batches)."""
    for path in sorted(glob.glob(os.path.join(root, "stage2", "*", "sts_savings.json"))):
        records = _done(path)["micro_batches"]
        if records and records[-1]["step"] == steps - 1 and records[0]["dense_flops"] is not None:
            return _per_step(records, "dense_flops", steps)
    raise FileNotFoundError(f"No sparse stage-2 run in {root}/stage2 counts its dense FLOPs: run the experiment with "
                            "an LDS variant (e.g. 'LDS') too.")


def curve_run(exp: ExperimentArguments, seed: int, name: str, checkpoints: int, training_data,
              test: dict[str, str], questions: list[dict], reference: list[int] | None) -> dict:
    """One seed's curve of one variant: trained and evaluated at each checkpoint, or found when done before."""
    variant = next(v for v in VARIANTS if v.name == name)
    root = os.path.join(exp.output_dir, f"seed{seed}")
    folder = os.path.join(exp.output_dir, "curves", f"seed{seed}", os.path.basename(stage2_folder(root, variant)))
    done = _done(os.path.join(folder, "curve.json"))
    if done is not None:
        print(f"== seed {seed}: {name}: curve done before, reused ==", flush=True)
        return done
    stage1_dir = stage1_folder(root, variant.stage1)
    stage1 = _done(os.path.join(stage1_dir, "sts_train_summary.json"))
    if stage1 is None:
        raise FileNotFoundError(f"{stage1_dir} has no finished stage 1: run the experiment with the variant {name!r} "
                                f"and --output_dir {exp.output_dir} first.")
    steps = exp.scaled("instruction_steps")
    saves = checkpoint_steps(steps, checkpoints)
    stage1_flops, stage1_seconds = _stage1_cost(root, stage1, exp.scaled("alignment_steps"))

    print(f"\n== seed {seed}: {name}: stage 2 with checkpoints at steps {saves} ==", flush=True)
    files = training_data(seed)
    clock = TrainingClock()
    summary = run(ModelArguments(model_name_or_path=stage1_dir, training_stage="instruction"),
                  DataArguments(data_path=files["data_path"], image_folder=files["image_folder"]),
                  _training_args(exp, "stage2", seed, folder, STAGE2[variant.stage2], save_steps=saves[0]),
                  callbacks=[clock])
    if summary["sts"]:
        per_step = _per_step(_done(os.path.join(folder, "sts_savings.json"))["micro_batches"], "actual_flops", steps)
    else:
        per_step = _dense_per_step(root, steps)
    points = []
    for step in saves:
        model_dir = folder if step == steps else os.path.join(folder, f"checkpoint-{step}")
        evaluation = evaluate_run(model_dir, test, questions, os.path.join(folder, "eval", f"step{step}"))
        stage2_flops = float(sum(per_step[:step]))
        points.append({"step": step, "flops": stage1_flops + stage2_flops, "stage2_flops": stage2_flops,
                       "seconds": stage1_seconds + clock.seconds[step], "accuracy": evaluation["scores"]["exact_match"],
                       "scores": evaluation["scores"], "correct": evaluation["correct"]})
        print(f"   step {step}: accuracy {100 * points[-1]['accuracy']:.1f}%", flush=True)
    curve = {"variant": name, "seed": seed, "steps": steps, "stage1_flops": stage1_flops,
             "stage1_seconds": stage1_seconds, "points": points,
             "reproduced": None if reference is None else points[-1]["correct"] == reference}
    with open(os.path.join(folder, "curve.json"), "w") as f:
        json.dump(curve, f, indent=1)
    return curve


def summarize(curves: dict[str, list[dict]], target: float = TARGET) -> dict:
    """Per variant, the mean over seeds at each checkpoint (accuracy, FLOPs and wall-clock, the FLOPs also as a share
    of dense's whole run) and the compute it takes to reach `target` x dense's final accuracy, against dense's."""
    if "baseline" not in curves:
        raise ValueError("The time-to-accuracy summary needs the dense baseline's curves.")
    base = curves["baseline"]
    dense_final = statistics.fmean(c["points"][-1]["accuracy"] for c in base)
    dense_flops = statistics.fmean(c["points"][-1]["flops"] for c in base)
    summary = {"dense_final_accuracy": dense_final, "dense_flops": dense_flops, "target": target,
               "target_accuracy": target * dense_final, "variants": {}}
    for name, runs in curves.items():
        if len({tuple(p["step"] for p in c["points"]) for c in runs}) != 1:
            raise ValueError(f"The seeds of {name!r} saved at different steps; give the same --checkpoints.")
        mean = [{key: statistics.fmean(c["points"][i][key] for c in runs) for key in ("flops", "seconds", "accuracy")}
                | {"step": runs[0]["points"][i]["step"],
                   "accuracy_min": min(c["points"][i]["accuracy"] for c in runs),
                   "accuracy_max": max(c["points"][i]["accuracy"] for c in runs)}
                for i in range(len(runs[0]["points"]))]
        for point in mean:
            point["flops_share"] = point["flops"] / dense_flops
            point["of_dense_final"] = point["accuracy"] / dense_final if dense_final else None  # a smoke run: 0%
        flops = compute_to_reach([p["flops"] for p in mean], [p["accuracy"] for p in mean], target * dense_final)
        seconds = compute_to_reach([p["seconds"] for p in mean], [p["accuracy"] for p in mean], target * dense_final)
        summary["variants"][name] = {"seeds": len(runs), "points": mean, "reach_flops": flops,
                                     "reach_seconds": seconds,
                                     "reproduced": [c["reproduced"] for c in runs]}
    reach = summary["variants"]["baseline"]
    for row in summary["variants"].values():
        row["reach_flops_saved"] = (1.0 - row["reach_flops"] / reach["reach_flops"]
                                    if row["reach_flops"] is not None and reach["reach_flops"] else None)
        row["reach_seconds_saved"] = (1.0 - row["reach_seconds"] / reach["reach_seconds"]
                                      if row["reach_seconds"] is not None and reach["reach_seconds"] else None)
    return summary


def _label(name: str) -> str:
    return SUMMARY_NAMES.get(name, "dense" if name == "baseline" else name)


def markdown(summary: dict, regime: str) -> str:
    pct = lambda v, none="not reached": none if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = [f"Time to accuracy ({regime}): mean over seeds; 99% of dense's final accuracy = "
             f"{100 * summary['target_accuracy']:.1f}% (dense's final: {100 * summary['dense_final_accuracy']:.1f}%).",
             "", "| variant | seeds | FLOPs to reach (% of dense's whole run) | less than dense | wall-clock to reach (s) "
                 "| less than dense | final accuracy | final, % of dense's | curve ends at the experiment's run |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, row in summary["variants"].items():
        last = row["points"][-1]
        seconds = "not reached" if row["reach_seconds"] is None else f"{row['reach_seconds']:.0f}"
        reproduced = ("yes" if all(row["reproduced"]) else "no" if any(r is False for r in row["reproduced"])
                      else "not checked") if row["reproduced"] else "not checked"
        lines.append(f"| {_label(name)} | {row['seeds']} | "
                     f"{pct(None if row['reach_flops'] is None else row['reach_flops'] / summary['dense_flops'])} | "
                     f"{pct(row['reach_flops_saved'])} | {seconds} | {pct(row['reach_seconds_saved'])} | "
                     f"{100 * last['accuracy']:.1f} | {pct(last['of_dense_final'], '')} | {reproduced} |")
    lines += ["", "| variant | step | FLOPs (% of dense's whole run) | wall-clock (s) | accuracy | min | max "
                  "| % of dense's final |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in summary["variants"].items():
        for p in row["points"]:
            lines.append(f"| {_label(name)} | {p['step']} | {100 * p['flops_share']:.1f} | {p['seconds']:.0f} | "
                         f"{100 * p['accuracy']:.1f} | {100 * p['accuracy_min']:.1f} | {100 * p['accuracy_max']:.1f} | "
                         f"{pct(p['of_dense_final'], '')} |")
    return "\n".join(lines)


def plot(summary: dict, path: str, regime: str, shorter_dense: dict | None = None) -> None:
    """Accuracy against the share of dense's whole-run FLOPs and against wall-clock, one line per variant (the band:
    the seeds' range); the dotted line is 99% of dense's final accuracy; `shorter_dense` (accuracy, flops_share,
    seconds) a complete dense run at a smaller budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in ((axes[0], "flops_share", "training FLOPs, % of dense's whole run"),
                           (axes[1], "seconds", "training wall-clock (s), both stages")):
        scale = 100.0 if key == "flops_share" else 1.0
        for name, row in summary["variants"].items():
            x = [scale * p[key] for p in row["points"]]
            ax.plot(x, [100 * p["accuracy"] for p in row["points"]], "o-", label=_label(name))
            ax.fill_between(x, [100 * p["accuracy_min"] for p in row["points"]],
                            [100 * p["accuracy_max"] for p in row["points"]], alpha=0.15)
        if shorter_dense is not None:
            ax.plot(scale * shorter_dense[key], 100 * shorter_dense["accuracy"], "k*", markersize=12,
                    label="dense, a complete shorter run at STS's FLOPs")
        ax.axhline(100 * summary["target_accuracy"], color="grey", linestyle=":", label="99% of dense's final")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"Time to accuracy, {regime}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _shorter_dense(accuracy: dict) -> dict | None:
    row = next((r for r in accuracy["rows"] if r["variant"] == "dense at STS's FLOPs"), None)
    if row is None or "flops_saved" not in row:
        return None
    return {"accuracy": row["overall"]["mean"], "flops_share": 1.0 - row["flops_saved"]["mean"],
            "seconds": row["train_seconds"]["mean"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", required=True, help="A finished experiment folder (its accuracy.json).")
    parser.add_argument("--checkpoints", type=int, default=8, help="Evenly spaced checkpoints of stage 2 (8).")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help="Comma-separated experiment variants (the baseline is always run; default: dense, STS's "
                             "defaults and sts_plus).")
    parser.add_argument("--out", default=None, help="Folder of the figure (default: --results).")
    args = parser.parse_args(argv)
    accuracy = _done(os.path.join(args.results, "accuracy.json"))
    defining = _done(os.path.join(args.results, "experiment.json"))
    if accuracy is None or defining is None:
        raise FileNotFoundError(f"{args.results} holds no finished experiment: run `python -m "
                                f"sts_trainer.lab.experiment --output_dir {args.results}` first.")
    names = list(dict.fromkeys(["baseline", *(n.strip() for n in args.variants.split(",") if n.strip())]))
    known = {v.name: v for v in VARIANTS}
    for name in names:
        if name not in known:
            raise ValueError(f"Unknown variant {name!r}; choose from {list(known)}.")
        if known[name].budget_of or known[name].stage1 == "skipped":
            raise ValueError(f"{name!r} has no curve here: it is a shorter dense run or a control; choose variants "
                             "with both stages trained.")
    checkpoint_steps(1, args.checkpoints)  # validates --checkpoints
    exp = ExperimentArguments(output_dir=args.results, **{**defining, "variants": None})
    torch.set_num_threads(min(2, torch.get_num_threads()))
    hf_logging.set_verbosity_error()
    recipe = QUICK_RECIPE if exp.quick else EXPERIMENT_RECIPES[exp.foundation]
    build_foundation(recipe, exp.foundation_cache)  # the pair the stage-1 runs were composed from, found in the cache
    test = write_dataset(os.path.join(exp.output_dir, "test"), exp.test_samples, "test", 0, "instruction",
                         recipe.image_size)
    questions = read_questions(test["questions_path"])
    curves, data = {name: [] for name in names}, {}

    def training_data(seed: int) -> dict[str, str]:  # a seed's stage-2 scenes, written when a run first needs them
        if seed not in data:
            data[seed] = write_dataset(os.path.join(exp.output_dir, f"seed{seed}", "data"),
                                       exp.scaled("train_samples"), "train", seed, "instruction", recipe.image_size)
        return data[seed]

    for seed in range(accuracy["arguments"]["seeds"]):
        runs = accuracy["runs"].get(str(seed), {})
        for name in names:
            reference = runs.get(name, {}).get("correct")
            curves[name].append(curve_run(exp, seed, name, args.checkpoints, training_data, test, questions,
                                          reference))
    summary = summarize(curves)
    regime = accuracy.get("regime") or exp.regime(recipe.lm_layers)
    shorter = _shorter_dense(accuracy)
    out = args.out or args.results
    os.makedirs(out, exist_ok=True)
    plot(summary, os.path.join(out, "time_to_accuracy.png"), regime, shorter)
    table = markdown(summary, regime)
    write_results(args.results, "time_to_accuracy", {"regime": regime, "checkpoints": args.checkpoints,
                                                     "summary": summary, "shorter_dense": shorter}, table)
    return summary


if __name__ == "__main__":
    main()

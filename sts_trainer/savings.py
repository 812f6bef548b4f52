"""What STS saved in one training run: a per-micro-batch ledger of dense and actual FLOPs, and its report.

"Dense" is what the same micro-batch would have cost without STS (every visual token, every decoder layer); "actual"
is what ran: the sequence length the language model really received and the decoder layers that really executed.
Both come from `flops.step_flops`, the analytic count of matmul FLOPs, forward and backward.

The ledger travels with each checkpoint (`STATE_FILE`, with the STS options of the run), so a resumed run's report
covers the whole run, like `TrainerState.total_flos`. Under several processes each rank keeps its own ledger (its own
micro-batches); the report's totals are the whole run's, summed over the ranks at each checkpoint and at the end
(`ranks`), while its per-micro-batch records are rank 0's. Two states are reported rather than hidden: a run STS did not
sparsify (`not_sparsified`, the reason), and one whose FLOPs `flops.py` cannot count (`flops_not_counted`).
"""

import json
import os
from dataclasses import asdict, dataclass, field

STATE_FILE = "sts_state.json"  # in each checkpoint folder: the ledger so far and the STS options


@dataclass
class MicroBatchRecord:
    step: int  # optimizer step (TrainerState.global_step) the micro-batch belongs to
    dense_flops: float | None  # None when flops.py cannot count the model (see SavingsLedger.flops_not_counted)
    actual_flops: float | None
    kept_fraction: float | None = None  # VTC: kept / all visual tokens
    keep_ratio: float | None = None  # VTC: the keep ratio its schedule gave this step
    full_tokens: bool | None = None  # VTC: a full-token step (every visual token kept)
    skipped_fraction: float | None = None  # LDS: skipped / all decoder layers
    skip_probabilities: list[float] | None = None  # LDS: per layer


@dataclass
class SavingsLedger:
    stage: str
    records: list[MicroBatchRecord] = field(default_factory=list)
    wall_clock_seconds: float | None = None  # the whole run's, resumed parts included
    not_sparsified: str | None = None  # why STS left this run dense ('auto' on a model it cannot sparsify)
    flops_not_counted: str | None = None  # why FLOPs are missing; the run used Trainer's own estimate instead
    # Several processes: each rank's `rank_sums()`, gathered at the last checkpoint or at the end (the whole run's
    # totals are their sums); `resumed`: this rank's sums before the checkpoint a run resumed from, when its own
    # records are not in the ledger (ranks other than 0 resume from rank 0's file).
    ranks: list[dict] | None = None
    resumed: dict | None = None

    def add(self, record: MicroBatchRecord) -> None:
        self.records.append(record)

    def rank_sums(self) -> dict:
        """This process's micro-batches and FLOPs (None when not counted), resumed part included."""
        counted = self.flops_not_counted is None and self.not_sparsified is None
        earlier = self.resumed or {"micro_batches": 0, "dense_flops": 0.0, "actual_flops": 0.0}
        return {
            "micro_batches": earlier["micro_batches"] + len(self.records),
            "dense_flops": earlier["dense_flops"] + sum(r.dense_flops for r in self.records) if counted else None,
            "actual_flops": earlier["actual_flops"] + sum(r.actual_flops for r in self.records) if counted else None,
        }

    def to_dict(self) -> dict:
        return asdict(self)  # the records too, as dicts

    @classmethod
    def from_dict(cls, data: dict) -> "SavingsLedger":
        return cls(**{**data, "records": [MicroBatchRecord(**r) for r in data["records"]]})

    def totals(self) -> dict:
        counted = self.flops_not_counted is None and self.not_sparsified is None
        ranks = self.ranks or [self.rank_sums()]
        dense = sum(r["dense_flops"] for r in ranks) if counted else None
        actual = sum(r["actual_flops"] for r in ranks) if counted else None
        kept = [r.kept_fraction for r in self.records if r.kept_fraction is not None]
        skipped = [r.skipped_fraction for r in self.records if r.skipped_fraction is not None]
        ratios = [r.keep_ratio for r in self.records if r.keep_ratio is not None]
        full_steps = {r.step for r in self.records if r.full_tokens}
        return {
            "stage": self.stage,
            "sparsified": self.not_sparsified is None,
            "not_sparsified_reason": self.not_sparsified,
            "flops_counted": counted,
            "flops_not_counted_reason": self.flops_not_counted,
            "processes": len(ranks),
            "micro_batches": sum(r["micro_batches"] for r in ranks),  # all ranks'
            "per_rank": self.ranks,
            "optimizer_steps": len({r.step for r in self.records}),
            "dense_flops": dense,
            "actual_flops": actual,
            "flops_saving": 1.0 - actual / dense if dense else (None if not counted else 0.0),
            "mean_kept_visual_fraction": sum(kept) / len(kept) if kept else None,
            "mean_scheduled_keep_ratio": sum(ratios) / len(ratios) if ratios else None,
            "full_token_steps": len(full_steps) if ratios else None,
            "mean_skipped_layer_fraction": sum(skipped) / len(skipped) if skipped else None,
            "wall_clock_seconds": self.wall_clock_seconds,
        }

    def summary(self) -> str:
        t = self.totals()
        if self.not_sparsified is not None:
            return f"STS: not sparsified: {self.not_sparsified}"
        processes = f" on {t['processes']} processes" if t["processes"] > 1 else ""
        lines = [f"STS savings ({t['stage']} stage, {t['optimizer_steps']} steps, {t['micro_batches']} micro-batches"
                 f"{processes})"]
        if t["flops_counted"]:
            lines.append(
                f"  training FLOPs  dense {t['dense_flops']:.3e}   actual {t['actual_flops']:.3e}   "
                f"saved {100 * t['flops_saving']:.1f}%"
            )
        else:
            lines.append(f"  training FLOPs not counted: {self.flops_not_counted}")
        if t["mean_kept_visual_fraction"] is not None:
            lines.append(f"  VTC kept {100 * t['mean_kept_visual_fraction']:.1f}% of visual tokens")
        if t["mean_scheduled_keep_ratio"] is not None:
            lines.append(
                f"  VTC keep ratio {t['mean_scheduled_keep_ratio']:.3f} on average (schedule); "
                f"{t['full_token_steps']} of {t['optimizer_steps']} steps with every token"
            )
        if t["mean_skipped_layer_fraction"] is not None:
            lines.append(f"  LDS skipped {100 * t['mean_skipped_layer_fraction']:.1f}% of decoder-layer runs")
        if t["wall_clock_seconds"] is not None:
            lines.append(f"  wall-clock {t['wall_clock_seconds']:.1f} s")
        return "\n".join(lines)

    def write(self, output_dir: str) -> dict[str, str]:
        """Write `sts_savings.json` (totals and every micro-batch) and, for a sparsified run, `sts_savings.png`;
        return their paths."""
        os.makedirs(output_dir, exist_ok=True)
        paths = {"json": os.path.join(output_dir, "sts_savings.json")}
        with open(paths["json"], "w") as f:
            json.dump({"totals": self.totals(), "micro_batches": [asdict(r) for r in self.records]}, f, indent=1)
        if self.records:
            paths["plot"] = os.path.join(output_dir, "sts_savings.png")
            self.plot(paths["plot"])
        return paths

    def plot(self, path: str) -> None:
        """Per-layer skip probability over steps, kept visual tokens, cumulative dense vs actual FLOPs."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        x = list(range(len(self.records)))
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        probs = [r.skip_probabilities for r in self.records if r.skip_probabilities is not None]
        if probs:
            image = axes[0].imshow(list(zip(*probs)), aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis")
            fig.colorbar(image, ax=axes[0], label="skip probability")
            axes[0].set_ylabel("decoder layer")
        else:
            axes[0].text(0.5, 0.5, "LDS off", ha="center", va="center", transform=axes[0].transAxes)
        axes[0].set_title("LDS skip probability per layer")
        axes[0].set_xlabel("micro-batch")

        kept = [r.kept_fraction for r in self.records]
        if any(k is not None for k in kept):
            axes[1].plot(x, [k if k is not None else float("nan") for k in kept], label="kept fraction")
            ratio = [r.keep_ratio if r.keep_ratio is not None else float("nan") for r in self.records]
            axes[1].plot(x, ratio, "--", label="scheduled keep ratio")
            full = [i for i, r in enumerate(self.records) if r.full_tokens]
            if full:
                axes[1].scatter(full, [1.0] * len(full), marker="|", color="C3", label="full-token step")
            axes[1].set_ylim(0, 1.05)
            axes[1].legend(loc="lower right")
        else:
            axes[1].text(0.5, 0.5, "VTC off", ha="center", va="center", transform=axes[1].transAxes)
        axes[1].set_title("VTC kept fraction of visual tokens")
        axes[1].set_xlabel("micro-batch")

        dense, actual, total_dense, total_actual = [], [], 0.0, 0.0
        if self.flops_not_counted is None:
            for r in self.records:
                total_dense += r.dense_flops
                total_actual += r.actual_flops
                dense.append(total_dense)
                actual.append(total_actual)
            axes[2].plot(x, dense, label="dense")
            axes[2].plot(x, actual, label="actual (STS)")
            axes[2].legend()
        else:
            axes[2].text(0.5, 0.5, "FLOPs not counted", ha="center", va="center", transform=axes[2].transAxes)
        axes[2].set_title("cumulative training FLOPs")
        axes[2].set_xlabel("micro-batch")
        fig.suptitle(f"STS savings, {self.stage} stage")
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)

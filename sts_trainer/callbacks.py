"""`TrainerCallback`s of STS."""

import time

from transformers import TrainerCallback

from .distributed import gather_from_ranks
from .savings import SavingsLedger


class SavingsReportCallback(TrainerCallback):
    """At the end of training, writes the savings report (`sts_savings.json`, `sts_savings.png`) to `output_dir` and
    prints its one-screen summary, on the main process. A resumed run's wall-clock adds to the ledger's earlier one.
    Under several processes the totals are summed over the ranks (a collective at the end, on every rank). A run STS
    did not sparsify writes nothing into `output_dir`: its folder is the one `Trainer` leaves (the warning given when
    training started says why)."""

    def __init__(self, ledger: SavingsLedger):
        self.ledger = ledger
        self._start = None
        self._earlier = 0.0
        self.paths: dict[str, str] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()
        self._earlier = self.ledger.wall_clock_seconds or 0.0

    def elapsed(self) -> float:
        """Wall-clock seconds of the run so far, the parts before a resume included."""
        return self._earlier + (time.perf_counter() - self._start if self._start is not None else 0.0)

    def on_train_end(self, args, state, control, **kwargs):
        self.ledger.wall_clock_seconds = self.elapsed()
        if self.ledger.not_sparsified is None:
            self.ledger.ranks = gather_from_ranks(self.ledger.rank_sums())
        if state.is_world_process_zero:
            if self.ledger.records:
                self.paths = self.ledger.write(args.output_dir)
            print(self.ledger.summary() + (f"\n  report: {', '.join(self.paths.values())}" if self.paths else ""))

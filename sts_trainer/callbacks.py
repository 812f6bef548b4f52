"""`TrainerCallback`s of STS."""

import time

from transformers import TrainerCallback

from .savings import SavingsLedger


class SavingsReportCallback(TrainerCallback):
    """At the end of training, writes the savings report (`sts_savings.json`, `sts_savings.png`) to `output_dir` and
    prints its one-screen summary, on the main process. A resumed run's wall-clock adds to the ledger's earlier one."""

    def __init__(self, ledger: SavingsLedger):
        self.ledger = ledger
        self._start = None
        self._earlier = 0.0
        self.paths: dict[str, str] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()
        self._earlier = self.ledger.wall_clock_seconds or 0.0

    def on_train_end(self, args, state, control, **kwargs):
        self.ledger.wall_clock_seconds = self._earlier + time.perf_counter() - self._start
        if state.is_world_process_zero and (self.ledger.records or self.ledger.not_sparsified):
            self.paths = self.ledger.write(args.output_dir)
            print(self.ledger.summary() + f"\n  report: {', '.join(self.paths.values())}")

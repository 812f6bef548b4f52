"""The step timer both benchmarks use (`bench.py` on CPU or GPU, `gpu_bench.py` at real shapes)."""

import time

import torch
from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    """Each optimizer step's wall-clock; on a GPU the device is synchronised at both ends, so the step's kernels are
    inside the time (they run asynchronously to the Python that launches them)."""

    def __init__(self):
        self.times: list[float] = []

    @staticmethod
    def _sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(time.perf_counter() - self._start)

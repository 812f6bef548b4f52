"""The random draws STS makes (which layers LDS skips, which tokens VTC's `random` strategy keeps, which steps see
every token), each from a generator seeded from the training position alone, so both components take their draws
from one place and neither depends on the other."""

import numpy as np
import torch

# The streams of `decision_generator`, one per kind of draw, so that the components' draws are independent.
LDS_STREAM = 0  # which decoder layers LDS skips
VTC_STREAM = 1  # which tokens VTC's `random` strategy keeps
FULL_TOKEN_STREAM = 2  # which optimizer steps VTC runs with every token


def decision_generator(seed: int, step: int, micro_step: int, stream: int = LDS_STREAM) -> torch.Generator:
    """A generator seeded from (seed, step, micro_step, stream) only: identical on every rank, untouched by the global
    RNG, and the same after resuming from a checkpoint. `stream` keeps the components' draws independent."""
    state = np.random.SeedSequence([seed, step, micro_step, stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))

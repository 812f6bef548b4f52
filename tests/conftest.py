import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
torch.set_num_threads(1)


@pytest.fixture
def out_dir(tmp_path):
    return str(tmp_path / "out")

"""Shared pieces of the tests: tiny training runs and what they record."""

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from sts_trainer import STSTrainer, STSTrainingArguments
from sts_trainer.architectures import find_parts
from sts_trainer.lab.tiny import collate, synthetic_samples, tiny_llava, tiny_llava_config
from sts_trainer.token_compression import TokenCompressor


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def tiny_dataset(num_samples=16, images_per_sample=(1,), seed=0, **config_kwargs):
    return ListDataset(synthetic_samples(num_samples, tiny_llava_config(**config_kwargs), images_per_sample, seed=seed))


class LossRecorder(TrainerCallback):
    def __init__(self):
        self.losses = []
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))
        if "loss" in logs:
            self.losses.append(logs["loss"])


def training_args(out_dir, cls=STSTrainingArguments, **overrides):
    defaults = dict(
        output_dir=out_dir,
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    defaults.update(overrides)
    return cls(**defaults)


def train(model, args, dataset=None, trainer_cls=STSTrainer, padding_side="right", callbacks=(), eval_dataset=None):
    recorder = LossRecorder()
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=dataset if dataset is not None else tiny_dataset(),
        data_collator=lambda samples: collate(samples, padding_side),
        eval_dataset=eval_dataset,
        callbacks=[recorder, *callbacks],
    )
    trainer.train()
    return trainer, recorder


def for_alignment(model):
    """Stage-1 trainability of any supported model: only the projector trains."""
    projector = find_parts(model).projector
    for param in model.parameters():
        param.requires_grad = False
    for param in projector.parameters():
        param.requires_grad = True
    return model


class Received:
    """The model inputs as VTC rewrote them: a pre-hook registered after the compressor's, on the same module; the
    compressor is on (one open micro-batch) until `remove()`."""

    def __init__(self, model, ratio, strategy="uniform", position_mode="compact", **compressor_kwargs):
        image_token_id = find_parts(model).image_token_id
        self.compressor = TokenCompressor(image_token_id, ratio, strategy, position_mode, **compressor_kwargs)
        self.compressor.install(model)
        self.batch = self.compressor.micro_batch(step=0)
        self.record = self.batch.__enter__()
        self.kwargs = None
        self.handle = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        self.kwargs = kwargs

    def remove(self):
        self.batch.__exit__(None, None, None)
        self.compressor.remove()
        self.handle.remove()


def plain_training_args(out_dir, **overrides):
    return training_args(out_dir, cls=TrainingArguments, **overrides)


__all__ = ["Trainer", "tiny_llava", "train", "training_args", "plain_training_args", "tiny_dataset", "LossRecorder"]

"""Distributed training that never hangs: every rank calls the same modules in the same order.

ZeRO-3 and FSDP gather a module's parameters from every rank when the module runs (an all-gather each rank must join)
and reduce their gradients in the backward. A rank whose batch has no image skips the vision tower and projector
while a rank with images runs them: the ranks then wait on different collectives and training hangs (LLaVA's most
reported distributed failure). Two things here prevent it:

- `BlankImage`: a batch without images runs the vision tower and projector on one blank image (the architecture's
  `blank_image`) at the place an image batch runs them, and adds 0 * (their output) to the language model's input
  embeddings. Every rank then gathers the same parameters in the same order, forward and backward (the blank's
  output reaches the loss through the language model, as image features do), while the loss and every gradient are
  exactly what they would be without it: the added term is exactly zero, its gradient too. Where an image batch's
  vision path runs decides where the blank's runs: before the model's forward when VTC compresses the forward (VTC
  computes the features in its pre-hook), otherwise after the token embeddings, just before the language model (as
  the model's own forward does).
- `check_ranks_agree`: the options that decide what runs (STS's, the seed, the step counts) must be the same on
  every rank; compared once when training starts, an error names the first that differs.

With `sts_blank_image='off'` under ZeRO-3 or FSDP, `BlankImage` only checks, every forward, that the ranks agree on
having images, and raises an error naming the option when they do not (instead of hanging).
"""

import contextlib

import torch
import torch.distributed as dist

from .architectures import ModelParts
from .arguments import SWITCHES
from .token_compression import TokenCompressor, image_features


def parameter_sharding(trainer) -> str | None:
    """'ZeRO-3' or 'FSDP' when the trainer's parameters are gathered module by module, else None."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return "FSDP"
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None) if trainer.is_deepspeed_enabled else None
    if plugin is not None and plugin.zero_stage == 3:
        return "ZeRO-3"
    return None


def blank_image_mode(option: str, sharding: str | None, world_size: int) -> str | None:
    """What `sts_blank_image` means for this run: 'blank' (run the blank image), 'check' (only check that the ranks
    agree), or None (nothing to do). 'auto' is 'blank' under parameter sharding with more than one process."""
    if option not in SWITCHES:
        raise ValueError(f"sts_blank_image={option!r} is not valid; choose one of {', '.join(SWITCHES)}.")
    if option == "on":
        return "blank"
    if sharding is None or world_size < 2:
        return None
    return "check" if option == "off" else "blank"


class BlankImage:
    """Run the vision path on a blank image for batches without images (`mode='blank'`), or check that every rank's
    batch agrees on having images (`mode='check'`), in the forwards run inside `active()`.

    Hooks: a forward pre-hook on the model, placed first (VTC's removes the vision inputs from the batch), and one on
    the language model, which receives the input embeddings, also placed first. `compressor`: the run's VTC, whose `compresses_now`
    says where an image batch's vision path runs.
    """

    def __init__(self, parts: ModelParts, mode: str = "blank", compressor: TokenCompressor | None = None):
        if mode not in ("blank", "check"):
            raise ValueError(f"mode must be 'blank' or 'check', got {mode!r}.")
        config = getattr(parts.model, "config", None)
        if mode == "blank" and (parts.facts.blank_image is None or config is None):
            raise ValueError(
                f"sts_blank_image: sts_trainer has no blank image for {type(parts.model).__name__} (model_type "
                f"{parts.model_type!r}), which a batch without images would run under ZeRO-3 or FSDP so that every "
                "rank gathers the same parameters. Set sts_blank_image='off' and give every rank images in every "
                "step (the run then stops with an error at the first step where the ranks disagree)."
            )
        self.parts, self.mode, self.compressor = parts, mode, compressor
        self.inputs = parts.facts.blank_image(config) if mode == "blank" else None
        self.blank_forwards = 0  # forwards that ran the blank image
        self.blank_backwards = 0  # of them, those run with gradients (a training forward; not a no-grad teacher's)
        self.visual_tokens = 0  # the blank image's visual tokens, once it ran
        self._active = 0  # depth of open `active()` contexts
        self._pending = False  # a batch without images is in the model's forward: the blank still has to reach it
        self._features: list[torch.Tensor] | None = None
        self._handles = []

    def install(self) -> None:
        if self._handles:
            return
        model, language_model = self.parts.model, self.parts.language_model
        # Both pre-hooks first, before ZeRO-3's or FSDP's own when those are already there (installed for an
        # `evaluate()` after training): an image batch runs its vision path before the language model gathers or
        # prefetches anything, and so must the blank.
        self._handles = [
            model.register_forward_pre_hook(self._before_model, with_kwargs=True, prepend=True),
            language_model.register_forward_pre_hook(self._before_language_model, with_kwargs=True, prepend=True),
            model.register_forward_hook(self._after_model, always_call=True),
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._pending, self._features = False, None

    @contextlib.contextmanager
    def active(self):
        self._active += 1
        try:
            yield
        finally:
            self._active -= 1

    def _before_model(self, module, args, kwargs):
        if not self._active:
            return None
        has_images = any(value is not None for key, value in kwargs.items() if key.startswith("pixel_values"))
        if self.mode == "check":
            self._check(has_images, kwargs)
            return None
        if has_images:
            return None
        self._pending = True
        if self.compressor is not None and self.compressor.compresses_now():
            # where VTC runs an image batch's vision path, and its mode isolator, which ZeRO-3 gathers there too
            self._features = self._blank_features(kwargs, isolator=True)
        return None

    def _before_language_model(self, module, args, kwargs):
        if not self._pending:
            return None
        self._pending = False
        if kwargs.get("inputs_embeds") is None:
            raise ValueError(
                f"sts_blank_image: {type(module).__name__} was called without inputs_embeds as a keyword, so the "
                "blank image's zero cannot be added to its input. Set sts_blank_image='off' and give every rank "
                "images in every step."
            )
        return args, dict(kwargs, inputs_embeds=self._with_blank(kwargs["inputs_embeds"], kwargs))

    def _after_model(self, module, args, output):
        self._pending, self._features = False, None

    def _blank_features(self, kwargs, isolator: bool = False) -> list[torch.Tensor]:
        reference = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        device = reference.device if reference is not None else None
        dtype = next(self.parts.projector.parameters()).dtype
        inputs = {
            key: value.to(device, dtype) if value.is_floating_point() else value.to(device)
            for key, value in self.inputs.items()
        }
        self.blank_forwards += 1
        self.blank_backwards += int(torch.is_grad_enabled())
        features = image_features(self.parts.model, self.parts.facts, inputs)
        self.visual_tokens = sum(len(f) for f in features)
        if isolator and self.compressor.isolator is not None:
            features = [*features, self.compressor.isolator()]
        return features

    def _with_blank(self, embeds: torch.Tensor, kwargs) -> torch.Tensor:
        """`embeds` + 0 * (the blank image's features): the same values, and a graph through the vision path."""
        features = self._features if self._features is not None else self._blank_features(kwargs)
        self._features = None
        total = sum(f.float().sum() for f in features)
        zero = torch.nan_to_num(total, nan=0.0, posinf=0.0, neginf=0.0) * 0.0
        return embeds + zero.to(embeds.dtype)

    def _check(self, has_images: bool, kwargs) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            return
        reference = next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        device = reference.device if reference is not None else torch.device("cpu")
        count = torch.tensor([int(has_images)], device=device)
        dist.all_reduce(count)
        world = dist.get_world_size()
        if 0 < int(count) < world:
            raise ValueError(
                f"This step's batches have images on {int(count)} of {world} ranks, and under parameter sharding "
                "(ZeRO-3, FSDP) the ranks without images would wait forever for the vision tower's parameters. "
                "sts_blank_image='off' is set: set it to 'auto' (a batch without images then runs a blank image "
                "whose contribution is exactly zero), or give every rank images in every step."
            )


# What decides the modules each step runs, besides the STS options: compared across ranks by `check_ranks_agree`.
AGREEING_ARGUMENTS = ("seed", "max_steps", "num_train_epochs", "gradient_accumulation_steps",
                      "per_device_train_batch_size")


def gather_from_ranks(value) -> list | None:
    """`value` of every rank, in rank order (a collective: every rank must call it), or None in a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def check_ranks_agree(settings: dict) -> None:
    """Raise on every rank, naming the first setting and the ranks, when `settings` differ between ranks (each rank
    would skip other layers or keep other tokens, and ZeRO-3 or FSDP would hang or fail later, in a collective)."""
    gathered = gather_from_ranks(settings)
    if gathered is None:
        return
    for name in settings:
        values = [rank_settings.get(name) for rank_settings in gathered]
        if any(value != values[0] for value in values):
            differing = ", ".join(f"rank {rank}: {value!r}" for rank, value in enumerate(values))
            fix = _AGREEMENT_FIXES.get(name, f"launch every rank with the same {name}")
            raise ValueError(
                f"{name} differs between ranks ({differing}). STS decides which layers to skip and which tokens to "
                f"keep from the same settings on every rank; {fix}."
            )


_AGREEMENT_FIXES = {
    "len(train_dataset)": "every rank must read the same training data (the same files at the same paths, and, with "
    "skip_bad_samples, the same images present on every node)",
}


def fill_adam_state(optimizer) -> int | None:
    """Give every parameter of an Adam / AdamW `optimizer` that has no state yet the state Adam starts it with (step
    0, zero moments), as a sharded checkpoint needs; return how many were filled, None for another optimizer.

    An FSDP checkpoint is resumed by loading the optimizer state of every parameter, and a parameter that never had a
    gradient before the checkpoint (a layer LDS skipped in every step so far, a vision layer the projector does not
    read) has none: resuming then fails with "Missing key in checkpoint state_dict". Adam initialises exactly this
    state at a parameter's first gradient and does nothing with it before, so filling it in changes no update.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer wraps the optimizer
    if type(inner) not in (torch.optim.Adam, torch.optim.AdamW):
        return None
    try:
        from torch.optim.optimizer import _get_scalar_dtype
    except ImportError:  # pragma: no cover - torch versions without the helper keep float32 steps
        def _get_scalar_dtype(is_fused=None):
            return torch.float32
    filled = 0
    for group in inner.param_groups:
        for p in group["params"]:
            if inner.state.get(p):
                continue
            on_device = group.get("capturable") or group.get("fused")
            state = inner.state[p]
            state["step"] = (
                torch.zeros((), dtype=_get_scalar_dtype(is_fused=group.get("fused")), device=p.device)
                if on_device else torch.tensor(0.0, dtype=_get_scalar_dtype())
            )
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group.get("amsgrad"):
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            filled += 1
    return filled

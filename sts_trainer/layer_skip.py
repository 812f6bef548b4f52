"""Layer Dynamic Skipper (LDS): skip whole decoder layers, forward and backward, during instruction tuning.

A skipped layer is the identity on the residual stream and its module is not called at all: no forward, no
activations kept for backward, no weight gradient, no hooks (so no ZeRO-3 parameter gather) except transformers' own
`output_hidden_states` recorder, so the hidden states keep one entry per layer. Skipping works by giving each decoder
layer a subclass of its own class whose `__call__` returns the hidden states unchanged when the layer is marked
skipped; the module tree, the parameters and the `state_dict` keys are those of the unpatched model, `remove()`
restores the original classes exactly, and pickling or deep-copying a patched model gives the unpatched one.
"""

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .architectures import find_parts
from .distributed import gather_from_ranks
from .randomness import LDS_STREAM, decision_generator


def skip_probability(
    step: int,
    total_steps: int,
    layer: int,
    num_layers: int,
    alpha: float,
    epsilon: float,
    schedule: str = "quadratic",
    progress: float | None = None,
) -> float:
    """Probability that decoder layer `layer` (0-based, of `num_layers`) is skipped at optimizer step `step` of `total_steps`.

        p = alpha * decay(t) * (1 + epsilon * (2l - (L - 1)) / (L - 1)),   clamped to [0, 1]

    with `decay` = (1 - t)^2 ('quadratic', the paper's), (1 - t) ('linear') or 1 ('constant'), and the stage's
    progress t = e / E, or `progress` when given (`lr_mass_progress`: the share of the learning-rate schedule spent
    before the step). The depth factor grows linearly from 1 - epsilon (first layer) to 1 + epsilon (last layer) and
    averages 1 over the layers, so the mean skip probability at progress t is alpha * decay(t). A one-layer model has
    depth factor 1.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}.")
    if progress is None:
        remaining = min(max((total_steps - step) / total_steps, 0.0), 1.0)
    else:
        remaining = min(max(1.0 - progress, 0.0), 1.0)
    decay = {"quadratic": remaining**2, "linear": remaining, "constant": 1.0}[schedule]
    depth = 1.0 if num_layers == 1 else 1.0 + epsilon * (2 * layer - (num_layers - 1)) / (num_layers - 1)
    return min(max(alpha * decay * depth, 0.0), 1.0)


def redundancy_ranks(similarity: Sequence[float | None]) -> list[int]:
    """Each decoder layer's place in the depth factor of `skip_probability` under `lds_layer_order='redundancy'`:
    the layers ordered by their mean cosine similarity between the hidden states entering and leaving them (high: the
    layer changes the residual stream little), the one that changes it most first (rank 0, skipped least), the most
    redundant last (rank L - 1, skipped most). Ties keep depth order; a layer not yet measured (None: it never ran in
    training) counts as changing it most, so it runs and gets measured."""
    key = [(-2.0 if s is None else s, layer) for layer, s in enumerate(similarity)]  # cosine >= -1
    order = sorted(range(len(key)), key=key.__getitem__)
    ranks = [0] * len(order)
    for rank, layer in enumerate(order):
        ranks[layer] = rank
    return ranks


class SimilarityMeter:
    """Sums, over one decoder layer's executed training forwards, the cosine similarity between the hidden states
    entering and leaving it (the mean over the batch's tokens, padding included), without synchronising the device:
    the sum stays a tensor until `totals()`."""

    def __init__(self):
        self.sum: torch.Tensor | float = 0.0
        self.count = 0

    def add(self, before: torch.Tensor, after: torch.Tensor) -> None:
        with torch.no_grad():
            cosine = torch.nn.functional.cosine_similarity(before.detach().float(), after.detach().float(), dim=-1)
            self.sum = self.sum + cosine.mean()
        self.count += 1

    def totals(self) -> tuple[float, int]:
        return float(self.sum), self.count


def lr_mass_progress(learning_rates: Sequence[float]) -> list[float]:
    """LDS progress by learning-rate mass (`lds_progress='lr_mass'`): for each optimizer step e, the share of the sum
    of all steps' learning rates spent before e (0 at the first step, below 1 at the last). With a decaying schedule
    it runs ahead of e / E while the learning rate is high, so the skip rate falls where the updates are largest."""
    total = float(sum(learning_rates))
    if not total > 0.0 or min(learning_rates, default=0.0) < 0.0:
        raise ValueError(
            "lds_progress='lr_mass' needs a learning-rate schedule with a positive sum and no negative rate; got "
            f"a sum of {total}. Use lds_progress='steps'."
        )
    spent, progress = 0.0, []
    for rate in learning_rates:
        progress.append(spent / total)
        spent += float(rate)
    return progress


def scheduler_learning_rates(scheduler, total_steps: int) -> list[float]:
    """The learning-rate factor of each optimizer step 0 .. total_steps - 1 under `scheduler`, read from its
    `lr_lambdas` (a `LambdaLR`: every `lr_scheduler_type` of transformers except 'reduce_lr_on_plateau'), without
    stepping it: a pure function of the step, so the same on every rank and after resuming. A wrapper holding the
    scheduler as `.scheduler` (accelerate's) is looked through."""
    inner = getattr(scheduler, "scheduler", scheduler)
    if not isinstance(inner, torch.optim.lr_scheduler.LambdaLR) or len(set(inner.lr_lambdas)) != 1:
        raise ValueError(
            f"lds_progress='lr_mass' needs a learning-rate schedule given as one function of the step (a LambdaLR, as "
            f"every lr_scheduler_type except reduce_lr_on_plateau, with one lambda for all parameter groups); the "
            f"trainer has {type(inner).__name__} (a DeepSpeed config with a 'scheduler' section gives DeepSpeed's "
            "own). Use lds_progress='steps', or a scheduler from transformers' get_scheduler."
        )
    return [float(inner.lr_lambdas[0](step)) for step in range(total_steps)]


def schedule_learning_rates(name: str, total_steps: int, warmup_steps: int = 0, **kwargs) -> list[float]:
    """`scheduler_learning_rates` of transformers' `get_scheduler(name, ...)` over `total_steps` steps, for a plan
    made before any trainer exists (`sts-plan`)."""
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                              scheduler_specific_kwargs=kwargs or None)
    return scheduler_learning_rates(scheduler, total_steps)


class _SkippableLayer:
    """Mixed in front of a decoder layer's class. `_sts_skip` is set per instance by `LayerSkipper`.

    A skipped layer returns its input hidden states, so the layer must return the hidden states as a plain tensor.
    Every decoder layer of transformers 5 does (the stacks loop `hidden_states = decoder_layer(hidden_states, ...)`);
    a layer that returns a tuple, as transformers 4 layers and some custom models do, is refused when it first runs
    in training rather than silently given a tensor where its caller indexes a tuple.
    """

    _sts_skip = False
    _sts_original_class: type  # the layer's own class, set on each generated subclass

    def __call__(self, *args, **kwargs):
        if self._sts_skip and self.training:
            hidden_states = args[0] if args else kwargs["hidden_states"]
            # transformers 5 collects `output_hidden_states` with forward hooks on each decoder layer (installed once by
            # `capture_outputs`, inert unless a forward asked for hidden states). Run those and only those: the skipped
            # layer's output, its input, is still recorded (1 + num_layers entries), while every other hook, such as
            # ZeRO-3's parameter gather, stays silent. `output_attentions` has no entry for a skipped layer.
            for hook in self._forward_hooks.values():
                if hook.__module__ == "transformers.utils.output_capturing":
                    hook(self, args or (hidden_states,), hidden_states)
            return hidden_states
        output = super().__call__(*args, **kwargs)
        self.__dict__["_sts_runs"] = self.__dict__.get("_sts_runs", 0) + 1  # checked by `LayerSkipper.check_ran`
        if self.training and not isinstance(output, torch.Tensor):
            raise TypeError(
                f"LDS cannot skip {self._sts_original_class.__name__}: it returns a {type(output).__name__}, not the "
                "hidden-states tensor, so a skipped layer (which returns its input) would not fit its caller. Make the "
                "decoder layer return the hidden states tensor, or turn LDS off with sts_lds='off'."
            )
        meter = self.__dict__.get("_sts_meter")  # lds_layer_order='redundancy': what the layer changed
        if meter is not None and self.training:
            meter.add(args[0] if args else kwargs["hidden_states"], output)
        return output

    def __reduce_ex__(self, protocol):
        # Pickling (torch.save of a whole model) and copy.deepcopy see the layer's own class without `_sts_skip`: the
        # generated class exists only in this process, so a saved model loads where sts_trainer was never imported, and
        # a copy (an EMA model, say) is a plain model that no skipper drives and that `remove()` need not undo.
        # (Not `copyreg.__newobj__`, which pickle refuses for a class other than the object's own.)
        state = {k: v for k, v in self.__getstate__().items() if k not in ("_sts_skip", "_sts_runs", "_sts_meter")}
        return object.__new__, (self._sts_original_class,), state


_SKIPPABLE_CLASSES: dict[type, type] = {}


def _skippable_class(cls: type) -> type:
    if cls not in _SKIPPABLE_CLASSES:
        # The layer's own class name: lookups by name (FSDP's auto wrap by `transformer_layer_cls_to_wrap`, a
        # model's `_no_split_modules`) must still find the patched layers.
        namespace = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "_sts_original_class": cls}
        _SKIPPABLE_CLASSES[cls] = type(cls.__name__, (_SkippableLayer, cls), namespace)
    return _SKIPPABLE_CLASSES[cls]


@dataclass
class SkipRecord:
    """What LDS did in one training micro-batch (`LayerSkipper.micro_batch`): per decoder layer, skipped or not, and
    the probability the decision was drawn with."""

    skipped: list[bool]
    probabilities: list[float]

    @property
    def executed_layers(self) -> int:
        return len(self.skipped) - sum(self.skipped)

    @property
    def skipped_fraction(self) -> float:
        return sum(self.skipped) / len(self.skipped)


class LayerSkipper:
    """The Layer Dynamic Skipper as a component: `install(model)` once (or `install(layers)` with the decoder-layer
    list itself), then, for each training forward, `with skipper.micro_batch(step, micro_step, max_steps) as record:`
    draws which layers to skip and makes them the identity inside the block, filling `record` (a `SkipRecord`);
    `remove()` at the end restores the original layer classes.

    `layers`: the module path of the decoder-layer list (`sts_decoder_layers`) for a model `find_parts` does not know.
    `order`: which layers the depth factor favours: 'depth' (the paper's: deeper layers skipped more) or 'redundancy'
    (the same factors in the order of each layer's measured change of the residual stream, `redundancy_ranks`,
    re-ranked every `rerank_every` optimizer steps from the measurements of every rank, so that all ranks skip alike;
    depth order until the first ranking). The mean skip probability over the layers is the same in both.
    """

    def __init__(
        self, alpha: float = 0.5, epsilon: float = 0.5, schedule: str = "quadratic", seed: int = 0,
        layers: str | None = None, order: str = "depth", rerank_every: int = 25,
    ):
        if order not in ("depth", "redundancy"):
            raise ValueError(f"order={order!r} is not valid; choose depth or redundancy.")
        if rerank_every < 1:
            raise ValueError(f"rerank_every={rerank_every} is out of range; it must be >= 1.")
        self.alpha, self.epsilon, self.schedule, self.seed = alpha, epsilon, schedule, seed
        self.order, self.rerank_every = order, rerank_every
        # 'redundancy': each layer's place in the depth factor (None: depth order), the mean similarities it came
        # from, the step it was made at, and the whole run's sums before a resumed checkpoint (every rank's)
        self.ranks: list[int] | None = None
        self.similarity: list[float | None] | None = None
        self._ranked_at: int | None = None
        self._measured_before: list[tuple[float, int]] | None = None
        self._meters: list[SimilarityMeter] = []
        self.layers_path = layers
        # per optimizer step, the stage's progress for the decay (`lr_mass_progress`); None: step / total steps
        self.progress: Sequence[float] | None = None
        self.layers: nn.ModuleList | None = None
        self._patched: list[nn.Module] = []  # the layer objects install() patched, which decide() marks
        self._original_classes: list[type] | None = None
        self._skipped_all_step: list[bool] | None = None  # skipped in every micro-batch since the optimizer's step
        self._optimizer_hooks: list = []
        self._guarded = False  # an optimizer is guarded (`guard_optimizer`)

    def install(self, model: nn.Module) -> None:
        if self._original_classes is not None:
            return
        if isinstance(model, nn.ModuleList):
            self.layers = model
        else:
            self.layers = find_parts(model, layers=self.layers_path).layers
        self._original_classes = [type(layer) for layer in self.layers]
        self._patched = list(self.layers)
        for layer in self.layers:
            layer.__class__ = _skippable_class(type(layer))
        if self.order == "redundancy":
            self._meters = [SimilarityMeter() for _ in self._patched]
            for layer, meter in zip(self._patched, self._meters):
                layer.__dict__["_sts_meter"] = meter

    def remove(self) -> None:
        if self._original_classes is None:
            return
        self.clear()
        for layer, cls in zip(self.layers, self._original_classes):
            if type(layer) is _skippable_class(cls):
                layer.__class__ = cls
            # else a wrapper derived the layer's class from ours after install (FSDP2's fully_shard does): the class
            # stays, and the layer, no longer marked, runs its forward as usual
            layer.__dict__.pop("_sts_skip", None)
            layer.__dict__.pop("_sts_runs", None)
            layer.__dict__.pop("_sts_meter", None)
        for handle in self._optimizer_hooks:
            handle.remove()
        self._optimizer_hooks.clear()
        self._guarded = False
        self._original_classes = None

    @contextlib.contextmanager
    def micro_batch(self, step: int, micro_step: int, max_steps: int):
        """Skip layers in the training forward (and its backward) run inside; yield the `SkipRecord`."""
        skipped, probabilities = self.decide(step, max_steps, micro_step)
        try:
            yield SkipRecord(skipped, probabilities)
            self.check_ran(skipped)
        finally:
            self.clear()

    def probabilities(self, step: int, total_steps: int) -> list[float]:
        num_layers = len(self.layers)
        progress = None
        if self.progress is not None:
            progress = self.progress[step] if step < len(self.progress) else 1.0
        places = self.ranks if self.ranks is not None else range(num_layers)
        return [
            skip_probability(step, total_steps, place, num_layers, self.alpha, self.epsilon, self.schedule, progress)
            for place in places
        ]

    # ---- lds_layer_order='redundancy' --------------------------------------------------------------------------------

    def measured(self) -> list[tuple[float, int]]:
        """Per layer, the whole run's summed similarity and forward count so far, over every rank (a collective when
        several processes run: every rank must call it at the same point)."""
        local = [meter.totals() for meter in self._meters]
        ranks = gather_from_ranks(local) or [local]
        before = self._measured_before or [(0.0, 0)] * len(local)
        return [(b[0] + sum(r[i][0] for r in ranks), b[1] + sum(r[i][1] for r in ranks))
                for i, b in enumerate(before)]

    def rerank(self, step: int) -> None:
        """Re-rank the layers by their measured redundancy (`redundancy_ranks`); the same on every rank."""
        totals = self.measured()
        self.similarity = [total / count if count else None for total, count in totals]
        self.ranks = redundancy_ranks(self.similarity)
        self._ranked_at = step

    def state(self) -> dict | None:
        """What a checkpoint keeps so that a resumed run ranks as an uninterrupted one would (a collective, see
        `measured`); None under depth order."""
        if self.order != "redundancy":
            return None
        return {"measured": self.measured(), "ranks": self.ranks, "similarity": self.similarity,
                "ranked_at": self._ranked_at}

    def load_state(self, state: dict | None) -> None:
        """Continue from a checkpoint's `state()`: the measurements so far count once, on top of this run's."""
        if self.order != "redundancy" or not state:
            return
        if len(state["measured"]) != len(self._meters):
            raise ValueError(f"The checkpoint's LDS state has {len(state['measured'])} layers, the model "
                             f"{len(self._meters)}: resume with the model it was saved from.")
        self._measured_before = [tuple(m) for m in state["measured"]]
        self.ranks, self.similarity, self._ranked_at = state["ranks"], state["similarity"], state["ranked_at"]

    def decide(self, step: int, total_steps: int, micro_step: int) -> tuple[list[bool], list[float]]:
        """Mark the layers skipped for this micro-batch; returns the decisions and the probabilities they came from.

        One draw per layer for the whole batch, from `decision_generator(seed, step, micro_step)`, so every rank
        skips the same layers (distributed engines require it) and a resumed run repeats an uninterrupted one.
        """
        self._check_not_wrapped()
        if (self.order == "redundancy" and micro_step == 0 and step > 0 and step % self.rerank_every == 0
                and step != self._ranked_at):
            self.rerank(step)
        probs = self.probabilities(step, total_steps)
        draws = torch.rand(len(probs), generator=decision_generator(self.seed, step, micro_step, LDS_STREAM))  # (L,)
        skips = [bool(u < p) for u, p in zip(draws.tolist(), probs)]
        for layer, skip in zip(self._patched, skips):
            layer._sts_skip = skip
            layer.__dict__["_sts_runs"] = 0
        # the first micro-batch of an optimizer step starts the step's record
        previous = None if micro_step == 0 else self._skipped_all_step
        self._skipped_all_step = skips if previous is None else [a and b for a, b in zip(previous, skips)]
        return skips, probs

    def clear(self) -> None:
        for layer in self._patched:
            layer._sts_skip = False

    def _check_not_wrapped(self) -> None:
        """A skip must be a skip that happens: the layers in the list must still be the patched ones. A wrapper that
        replaced a list entry after install (FSDP1's auto wrap puts a `FullyShardedDataParallel` there) calls the
        patched layer itself after gathering its parameters, so the skip would save nothing."""
        for i, (entry, layer) in enumerate(zip(self.layers, self._patched)):
            if entry is not layer:
                raise RuntimeError(
                    f"LDS: decoder layer {i} was replaced by a {type(entry).__name__} after LDS was installed; that "
                    "wrapper gathers and runs the layer whatever LDS decides, so skipped layers would still cost "
                    "their compute. Use FSDP2 (fsdp_version: 2 / \"version\": 2) or DeepSpeed instead of FSDP1, "
                    "or turn LDS off with sts_lds='off'."
                )

    def check_ran(self, skipped: list[bool]) -> None:
        """After a micro-batch's forward: the layers that ran are exactly those not skipped (what the savings ledger
        records). Nothing is checked when no layer ran (a forward that never reached the decoder)."""
        ran = [layer.__dict__.get("_sts_runs", 0) > 0 for layer in self._patched]
        if any(ran) and any(r == s for r, s in zip(ran, skipped)):
            wrong = [i for i, (r, s) in enumerate(zip(ran, skipped)) if r == s]
            raise RuntimeError(
                f"LDS: decoder layers {wrong} did not do what LDS decided (skipped: {skipped}, ran: {ran}). Something "
                "between the decoder stack and its layers hides the decision (a wrapper, a hook that calls the "
                "layer's forward directly); turn LDS off with sts_lds='off' for this setup."
            )

    # ---- the optimizer: a layer skipped in every micro-batch of a step stays still ---------------------------------

    def split_param_groups(self, optimizer: torch.optim.Optimizer) -> None:
        """Give each decoder layer its own parameter groups (each group of `optimizer` split by layer, hyper-
        parameters kept; `sts_layer` in each new group names its layer, None for parameters outside the layers), so
        that `guard_optimizer` can leave a skipped layer out of a step. Call before any step and before a learning-
        rate scheduler is built on the optimizer."""
        layer_of = {id(p): i for i, layer in enumerate(self._patched) for p in layer.parameters()}
        groups = []
        for group in optimizer.param_groups:
            by_layer: dict[int | None, list] = {}
            for p in group["params"]:
                by_layer.setdefault(layer_of.get(id(p)), []).append(p)
            for layer in sorted(by_layer, key=lambda i: -1 if i is None else i):
                groups.append({**group, "params": by_layer[layer], "sts_layer": layer})
        optimizer.param_groups[:] = groups

    def guard_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Leave each decoder layer that was skipped in every micro-batch since the last step out of the optimizer's
        step: its parameter groups (`split_param_groups`) are emptied for the step and restored after it, so neither
        its weights nor its optimizer state change, as under a single process or DDP, where such a layer has no
        gradient. Under DeepSpeed ZeRO its gradient is a zero-filled slice of a flat buffer and Adam would still move
        it along its momentum (and decay it); hooks on the optimizer that steps (the one the engine wraps, which holds
        ZeRO's flat partitions per group, and which ZeRO may step one group at a time) make every backend equal. Only
        the first optimizer given is guarded (until `remove()`)."""
        if self._guarded:  # the first optimizer given, the one that steps: Trainer asks for it more than once, and
            return  # later gets the engine's wrapper of it (DeepSpeed's), which steps it
        self._guarded = True
        hidden: dict[int, tuple[dict, list]] = {}  # id(group) -> (group, its parameters)

        def before_step(opt, args, kwargs):
            skipped = self._skipped_all_step or []
            for group in opt.param_groups:
                layer = group.get("sts_layer")
                if layer is not None and layer < len(skipped) and skipped[layer] and id(group) not in hidden:
                    hidden[id(group)] = (group, group["params"])
                    group["params"] = []

        def after_step(opt, args, kwargs):
            for group, params in hidden.values():
                group["params"] = params
            hidden.clear()

        self._optimizer_hooks += [optimizer.register_step_pre_hook(before_step),
                                  optimizer.register_step_post_hook(after_step)]

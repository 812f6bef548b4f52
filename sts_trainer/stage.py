"""Stage awareness: which training stage a run is in, and which STS components that stage gets."""

from dataclasses import dataclass, replace

from torch import nn

from .architectures import OVERRIDE_OPTIONS, ModelParts, UnknownArchitectureError, find_parts, unwrap


@dataclass
class SparsityPlan:
    """What STS does in one training run."""

    stage: str  # 'alignment', 'instruction' or 'none'
    vtc: bool
    lds: bool
    parts: ModelParts | None  # None when neither component runs
    # Why STS leaves the run dense although it was not switched off: 'auto' on a model it cannot sparsify.
    not_sparsified: str | None = None
    note: str | None = None  # worth a warning: how the stage was detected, where that may surprise
    args: object = None  # the arguments for this stage: `sts_preset`'s section applied (`for_stage`)

    def without_lds(self, reason: str) -> "SparsityPlan":
        """This plan with LDS turned off for `reason`, which becomes the note (and, when nothing is left to
        sparsify, why the run is not sparsified)."""
        if not self.vtc:
            return replace(self, lds=False, parts=None, not_sparsified=reason, note=None)
        return replace(self, lds=False, note=reason if self.note is None else f"{self.note} {reason}")

    def describe(self, args=None) -> str:
        args = self.args if args is None else args
        if self.not_sparsified is not None:
            return f"STS: not sparsified: {self.not_sparsified}"
        parts = [f"stage={self.stage}"]
        if self.vtc:
            # M-RoPE models always keep the full sequence's positions (see architectures.py)
            positions = "original (M-RoPE)" if self.parts.facts.rope_index else args.vtc_position_ids
            keep = f"keep_ratio={args.vtc_keep_ratio}"
            if args.vtc_keep_schedule != "constant":
                keep += (f" -> {args.vtc_keep_ratio_end} ({args.vtc_keep_schedule} over "
                         f"{args.vtc_keep_schedule_fraction:g} of the stage)")
            if args.vtc_full_token_fraction:
                keep += f", full-token steps {args.vtc_full_token_fraction:g}"
                if args.vtc_distill_weight:
                    keep += f" with self-distillation {args.vtc_distill_weight:g}"
            if args.vtc_mode_isolator:
                keep += f", mode isolator {args.vtc_mode_isolator} tokens"
            parts.append(f"VTC on ({keep}, strategy={args.vtc_strategy}, position_ids={positions})")
        else:
            parts.append("VTC off")
        parts.append(
            f"LDS on (alpha={args.lds_alpha}, epsilon={args.lds_epsilon}, schedule={args.lds_schedule}, "
            f"{'' if args.lds_progress == 'steps' else f'progress={args.lds_progress}, '}"
            f"{'' if args.lds_layer_order == 'depth' else f'order=redundancy (every {args.lds_rerank_every} steps), '}"
            f"{len(self.parts.layers)} decoder layers)"
            if self.lds
            else "LDS off"
        )
        if self.parts is not None:
            parts.insert(0, f"model_type={self.parts.model_type}")
        return "STS: " + ", ".join(parts)


def detect_stage(parts: ModelParts) -> tuple[str, str | None]:
    """'instruction' when a decoder-layer parameter is trainable (LoRA adapters in the layers count), else 'alignment';
    and a note for the log where the answer may surprise.

    Decoder layers decide, not the whole language model: stage-1 recipes that also train the token embeddings or the
    LM head (new special tokens) are still alignment, and the note says so.
    """
    if not any(p.requires_grad for p in parts.model.parameters()):
        raise ValueError(
            f"No parameter of the model ({type(parts.model).__name__}) requires grad, so there is nothing to train. "
            "Unfreeze the parts this stage trains (the projector in alignment, the language model in instruction "
            "tuning), or add adapters."
        )
    if any(p.requires_grad for p in parts.layers.parameters()):
        return "instruction", None
    in_layers = {id(p) for p in parts.layers.parameters()}
    if any(p.requires_grad and id(p) not in in_layers for p in parts.language_model_parameters()):
        return "alignment", (
            "the language model's embeddings or LM head train but none of its decoder layers do, so the stage is "
            "'alignment' (VTC on, LDS off). Set sts_stage='instruction' if this is instruction tuning."
        )
    return "alignment", None


def find_named_parts(model: nn.Module, args) -> ModelParts:
    """`find_parts` with the parts the user named in `args`: sts_projector, sts_decoder_layers, sts_image_token_id."""
    return find_parts(model, args.sts_projector, args.sts_decoder_layers, args.sts_image_token_id)


def asks_for_sparsity(args) -> bool:
    """The user asked for STS explicitly: a stage named, a component forced on, or a part of the model named."""
    named = (args.sts_decoder_layers, args.sts_projector, args.sts_image_token_id)
    return args.sts_stage in ("alignment", "instruction") or "on" in (args.sts_vtc, args.sts_lds) or any(
        value is not None for value in named
    )


def plan_sparsity(model: nn.Module, args) -> SparsityPlan:
    """Resolve `args.sts_stage` and the `sts_vtc` / `sts_lds` switches against `model` as it is now.

    With `sts_stage='auto'` and nothing else asked for, a model whose architecture STS does not know (GPT-2, BERT, a
    custom module) is not sparsified: the plan says why, and the run is plain `Trainer`. Asked for explicitly, the
    architecture error stands.
    """
    if args.sts_stage == "none" and args.sts_vtc != "on" and args.sts_lds != "on":
        return SparsityPlan(stage="none", vtc=False, lds=False, parts=None, args=args)
    try:
        parts = find_named_parts(model, args)
    except UnknownArchitectureError:
        if asks_for_sparsity(args):
            raise
        base = unwrap(model)
        model_type = getattr(getattr(base, "config", None), "model_type", None)
        reason = (
            f"sts_trainer does not know the architecture {model_type!r} ({type(base).__name__}), so this run trains "
            f"as plain Trainer. To sparsify it, name its parts with {OVERRIDE_OPTIONS}."
        )
        return SparsityPlan(stage="none", vtc=False, lds=False, parts=None, not_sparsified=reason, args=args)
    stage, note = detect_stage(parts) if args.sts_stage == "auto" else (args.sts_stage, None)
    args = args.for_stage(stage)
    vtc = args.sts_vtc == "on" or (args.sts_vtc == "auto" and stage == "alignment" and parts.is_multimodal)
    lds = args.sts_lds == "on" or (args.sts_lds == "auto" and stage == "instruction")
    if vtc and not parts.is_multimodal:
        raise ValueError(
            f"sts_vtc='on' but the model ({parts.model_type}) has no visual tokens to compress; "
            "use sts_vtc='auto' or 'off'."
        )
    plan = SparsityPlan(stage=stage, vtc=vtc, lds=lds, parts=parts if (vtc or lds) else None, note=note, args=args)
    if lds and args.torch_compile:
        plan = lds_incompatible(plan, args, "torch_compile=True cannot be combined with LDS: every new set of skipped "
                                "layers is a new graph, and after torch.compile's recompilation limit the whole model "
                                "silently falls back to eager")
    return plan


def asks_for_lds(args) -> bool:
    """LDS was asked for explicitly: switched on, or the instruction stage named (where it is the default)."""
    return args.sts_lds == "on" or (args.sts_stage == "instruction" and args.sts_lds == "auto")


def lds_incompatible(plan: SparsityPlan, args, why: str) -> SparsityPlan:
    """LDS cannot run in this setup (`why`): an error when it was asked for explicitly, else the plan without it
    (the run trains as it would without STS's LDS, and the plan's note says why)."""
    fix = "turn LDS off with sts_lds='off'"
    if asks_for_lds(args):
        raise ValueError(f"{why}. Change that setting, or {fix}.")
    return plan.without_lds(f"LDS is off: {why}. It was not asked for explicitly (sts_stage='auto', sts_lds="
                            f"'auto'); sts_lds='on' would ask for it, and stop here with this error.")

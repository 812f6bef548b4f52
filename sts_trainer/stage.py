"""Stage awareness: which training stage a run is in, and which STS components that stage gets."""

from dataclasses import dataclass

from torch import nn

from .architectures import ModelParts, find_parts


@dataclass
class SparsityPlan:
    """What STS does in one training run."""

    stage: str  # 'alignment', 'instruction' or 'none'
    vtc: bool
    lds: bool
    parts: ModelParts | None  # None when neither component runs

    def describe(self, args) -> str:
        parts = [f"stage={self.stage}"]
        if self.vtc:
            # M-RoPE models always keep the full sequence's positions (see architectures.py)
            positions = "original (M-RoPE)" if self.parts.facts["rope_index"] else args.vtc_position_ids
            parts.append(
                f"VTC on (keep_ratio={args.vtc_keep_ratio}, strategy={args.vtc_strategy}, position_ids={positions})"
            )
        else:
            parts.append("VTC off")
        parts.append(
            f"LDS on (alpha={args.lds_alpha}, epsilon={args.lds_epsilon}, schedule={args.lds_schedule}, "
            f"{len(self.parts.layers)} decoder layers)"
            if self.lds
            else "LDS off"
        )
        if self.parts is not None:
            parts.insert(0, f"model_type={self.parts.model_type}")
        return "STS: " + ", ".join(parts)


def detect_stage(parts: ModelParts) -> str:
    """'alignment' when no language-model parameter is trainable (LoRA adapters on it count), else 'instruction'."""
    trainable = any(p.requires_grad for p in parts.language_model_parameters())
    return "instruction" if trainable else "alignment"


def plan_sparsity(model: nn.Module, args) -> SparsityPlan:
    """Resolve `args.sts_stage` and the `sts_vtc` / `sts_lds` switches against `model` as it is now."""
    if args.sts_stage == "none" and args.sts_vtc != "on" and args.sts_lds != "on":
        return SparsityPlan(stage="none", vtc=False, lds=False, parts=None)
    parts = find_parts(model, args.sts_projector, args.sts_decoder_layers, args.sts_image_token_id)
    stage = detect_stage(parts) if args.sts_stage == "auto" else args.sts_stage
    vtc = args.sts_vtc == "on" or (args.sts_vtc == "auto" and stage == "alignment" and parts.is_multimodal)
    lds = args.sts_lds == "on" or (args.sts_lds == "auto" and stage == "instruction")
    if vtc and not parts.is_multimodal:
        raise ValueError(
            f"sts_vtc='on' but the model ({parts.model_type}) has no visual tokens to compress; "
            "use sts_vtc='auto' or 'off'."
        )
    return SparsityPlan(stage=stage, vtc=vtc, lds=lds, parts=parts if (vtc or lds) else None)

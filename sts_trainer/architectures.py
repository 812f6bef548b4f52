"""Where STS finds the parts it works on, per `config.model_type`: plain data, no registry.

Each entry names, as attribute paths from the `*ForConditionalGeneration` / `*ForCausalLM` model:
- `language_model`: the decoder stack whose parameters decide the stage (with the model's output embeddings);
- `layers`: its list of decoder layers (LDS skips entries of it; the list itself is never shortened);
- `projector`: the module that maps vision features into the language model (VTC works on its output);
- `image_token`: the config attribute holding the id of the image placeholder token.
Text-only causal LMs have no projector and no image token: LDS works on them, VTC does not.
"""

from dataclasses import dataclass

from torch import nn

_LLAVA = {
    "language_model": "model.language_model",
    "layers": "model.language_model.layers",
    "projector": "model.multi_modal_projector",
    "image_token": "image_token_id",
}
_CAUSAL_LM = {"language_model": "model", "layers": "model.layers", "projector": None, "image_token": None}

ARCHITECTURES: dict[str, dict[str, str | None]] = {
    "llava": _LLAVA,
    "llama": _CAUSAL_LM,
    "mistral": _CAUSAL_LM,
    "qwen2": _CAUSAL_LM,
    "qwen3": _CAUSAL_LM,
}


@dataclass
class ModelParts:
    """The parts of one model that STS touches."""

    model: nn.Module  # the transformers model itself (a PEFT wrapper removed)
    model_type: str
    language_model: nn.Module
    layers: nn.ModuleList
    projector: nn.Module | None
    image_token_id: int | None

    @property
    def is_multimodal(self) -> bool:
        return self.projector is not None

    def language_model_parameters(self):
        """Parameters of the language model: its decoder stack and its output embeddings (the LM head)."""
        yield from self.language_model.parameters()
        head = self.model.get_output_embeddings()
        if head is not None:
            yield from head.parameters()


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (the model itself otherwise)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _get(root: nn.Module, path: str) -> nn.Module:
    module = root
    for name in path.split("."):
        module = getattr(module, name)
    return module


def find_parts(model: nn.Module) -> ModelParts:
    """Locate language model, decoder layers, projector and image token id of `model`, or explain what is missing."""
    base = unwrap(model)
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None)
    facts = ARCHITECTURES.get(model_type)
    if facts is None:
        raise ValueError(
            f"sts_trainer does not know the architecture {model_type!r} ({type(base).__name__}). "
            f"Supported model types: {', '.join(sorted(ARCHITECTURES))}."
        )
    image_token = facts["image_token"]
    return ModelParts(
        model=base,
        model_type=model_type,
        language_model=_get(base, facts["language_model"]),
        layers=_get(base, facts["layers"]),
        projector=_get(base, facts["projector"]) if facts["projector"] else None,
        image_token_id=getattr(config, image_token) if image_token else None,
    )

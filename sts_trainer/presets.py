"""Named STS recipes: the options of each stage, selected with one training argument (`sts_preset`).

A recipe has an 'alignment' and an 'instruction' section; once the trainer knows the stage, the section for it sets
every STS option the user did not give explicitly (`STSTrainingArguments.for_stage`). The same recipe can live in a YAML
file (`configs/sts_plus.yaml` holds `sts_plus`), which `sts_preset` and `sts-plan --sts_config` also accept.

`sts_plus`, the compute-first recipe, chosen from the frontier measured on the miniature-LLaVA testbed
(docs/accuracy.md): of the settings that save at least 55% of LLaVA-1.5-7B's whole-run training FLOPs (`sts-plan`),
the one that kept the most accuracy there (86.3% of the dense baseline, against 89.8% for STS's defaults, which
save 25.2%). It trades accuracy for compute; measure it on your task before adopting it.
- alignment: the paper's VTC, 'uniform' at 0.5 (LDS off: the language model is frozen);
- instruction tuning: VTC on as well, 'uniform' keeping 15% of each image's tokens, one optimizer step in ten with
  every token, composed with LDS at its defaults (alpha 0.5, epsilon 0.5, quadratic decay).
"""

from pathlib import Path

import yaml  # a dependency of transformers

STAGE_SECTIONS = ("alignment", "instruction")

PRESETS: dict[str, dict[str, dict]] = {
    "sts_plus": {
        "alignment": {"vtc_strategy": "uniform", "vtc_keep_ratio": 0.5},
        "instruction": {
            "sts_vtc": "on",
            "vtc_strategy": "uniform",
            "vtc_keep_ratio": 0.15,
            "vtc_full_token_fraction": 0.1,
            "sts_lds": "on",
            "lds_alpha": 0.5,
        },
    },
}


def load_preset(name_or_path: str) -> dict[str, dict]:
    """The recipe named `name_or_path` in `PRESETS`, or read from that YAML file: {'alignment': {...},
    'instruction': {...}}, a missing section empty. Option names are checked by `STSTrainingArguments`."""
    if name_or_path in PRESETS:
        recipe = PRESETS[name_or_path]
    elif name_or_path.endswith((".yaml", ".yml")):
        if not Path(name_or_path).is_file():
            raise FileNotFoundError(f"sts_preset: no recipe file at {name_or_path!r}.")
        with open(name_or_path) as f:
            recipe = yaml.safe_load(f) or {}
    else:
        raise ValueError(
            f"sts_preset={name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a .yaml recipe file."
        )
    if not isinstance(recipe, dict) or set(recipe) - set(STAGE_SECTIONS):
        raise ValueError(
            f"The recipe {name_or_path!r} must be a mapping with the sections {', '.join(STAGE_SECTIONS)} only; it "
            f"has {sorted(recipe) if isinstance(recipe, dict) else type(recipe).__name__}."
        )
    sections = {stage: recipe.get(stage) or {} for stage in STAGE_SECTIONS}
    for stage, options in sections.items():
        if not isinstance(options, dict):
            raise ValueError(f"The recipe {name_or_path!r}: its '{stage}' section must map option names to values.")
    return sections

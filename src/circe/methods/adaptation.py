"""How a method changes the text tower it fine-tunes: all of it, or low-rank adapters (LoRA).

A pretrained language model knows far more language than a CIR training set shows; fine-tuning
all of it on one benchmark's sentences can trade that for the benchmark's habits. LoRA (peft's
`inject_adapter_in_model`) leaves the pretrained weights as they are and trains, next to each
attention projection W, a product B·A of rank r (B starts at zero, so training starts from the
pretrained model exactly); the text projection into the shared space trains in full. The
recipe is part of the training config (`text_adaptation`, `lora_rank`), so a checkpoint
records it and `load_trained_method` builds the same adapters before reading the weights.
"""

from __future__ import annotations

from typing import Any

import torch

from circe.backbones.base import Backbone

ADAPTATIONS = ("full", "lora")


def text_lora_targets(backbone: Backbone) -> tuple[str, tuple[str, ...]]:
    """(the text tower's module name inside the backbone, its attention projections' names),
    or a ValueError naming the backbones that have them."""
    targets = getattr(backbone, "text_lora_targets", None)
    if targets is None:
        raise ValueError(
            f"text_adaptation lora: {backbone.identity.spec} does not name its text tower's "
            "attention projections; LoRA is available on language-model backbones "
            "(the default circe-minilm, lm:DIR)"
        )
    return targets


def adapt_text_tower(method: torch.nn.Module, adaptation: str, rank: int) -> None:
    """Apply `adaptation` to the text tower `method` trains (nothing to do for "full")."""
    if adaptation not in ADAPTATIONS:
        raise ValueError(f"text_adaptation must be one of {', '.join(ADAPTATIONS)}")
    if adaptation == "full":
        return
    if "text" not in method.inputs.trains:
        raise ValueError(
            f"text_adaptation {adaptation}: {type(method).__name__} does not train its text "
            "tower here, so there is nothing to adapt"
        )
    from peft import LoraConfig, inject_adapter_in_model

    backbone = method.backbone
    module_name, projections = text_lora_targets(backbone)
    text = backbone.get_submodule(module_name)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=projections)
    inject_adapter_in_model(config, text)
    # Of the language model only the adapters train; the rest of the text tower (its
    # projection into the shared space) as before.
    prefix = module_name + "."
    for name, parameter in backbone.named_parameters():
        if name.startswith(prefix):
            parameter.requires_grad_("lora_" in name)


def adaptation_of(train_config: dict[str, Any]) -> tuple[str, int]:
    """(text_adaptation, lora_rank) of a saved training config (runs from before the
    setting existed fine-tuned in full)."""
    return train_config.get("text_adaptation", "full"), int(train_config.get("lora_rank", 8))

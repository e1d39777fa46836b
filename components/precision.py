"""What `training.precision: bf16` means inside the training loop, next to DeepSpeed's own bf16 mode.

DeepSpeed's bf16 mode casts the module's registered parameters, which in LLM2VecGen are only the trained tensors
(the special rows and the two projections), and keeps float32 master copies of them in its optimizer. The frozen
backbone is deliberately not registered (components/model.py), so DeepSpeed leaves it as loaded: in float32 it
would do all of the compute and hold all of the memory at full precision while only the small head was bf16.
"""

from __future__ import annotations

import torch

from components.spec import BackboneSpec, TrainingSpec


def training_backbone(backbone: BackboneSpec, training: TrainingSpec) -> BackboneSpec:
    """The backbone as the training loop loads it: in bfloat16 under bf16 precision, else as the spec says.

    The weights are the same (the fingerprint is of the float32 weights), so the saved model still loads on the
    spec's backbone in any dtype.
    """
    if training.precision == "bf16" and backbone.dtype != "bfloat16":
        return backbone.model_copy(update={"dtype": "bfloat16"})
    return backbone


@torch.no_grad()
def restore_full_precision(model: torch.nn.Module) -> int:
    """Replace each trained tensor by DeepSpeed's float32 master copy where it keeps one (ZeRO 1-3, the bf16
    optimizer); returns how many were replaced. For after the last step: what is refitted and saved is then the
    float32 result of training, not its bf16 working copy.

    Every rank must call it: under ZeRO the master copies are partitioned and gathering one is a collective.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    replaced = 0
    for parameter in model.parameters():
        full = safe_get_full_fp32_param(parameter)
        if full is not None:
            parameter.data = full.detach().clone().to(parameter.device, torch.float32)
            replaced += 1
    return replaced

"""Router-guided patch ablation: run-time detection (and purification) of triggered inputs that only a pMoE allows.

A pMoE's routers score every 4x4 patch of the input before the experts see it; a backdoored model's routers learn
to send the trigger's patch to the experts. Per input, the 64 positions are ranked by the routers' softmax
probabilities combined over the experts (``combine: max``, default: a position's largest probability under any
expert, so a patch that one expert singles out ranks high; ``sum``: summed over experts), and the top ``top_m`` are
occluded (:mod:`.patch_ablation`: scores, threshold at ``frr`` on held-out clean inputs, purification and the model
verdict). The ranking comes from the same forward pass that predicts the input's label, so an input costs
1 + ``top_m`` + 1 forward passes.

On a model without routers it does not apply: the plan skips such models (``needs: routing``), and a job built by
hand gets a summary that says so.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..models.architectures import PatchMoE
from . import DefenseContext, DefenseResult
from .patch_ablation import Ranker, not_applicable, run_patch_ablation

DEFENSE = {"name": "router_ablation", "title": "Router ablation", "level": "input", "needs": "routing"}

COMBINE = ("max", "sum")


def has_routers(model: nn.Module) -> bool:
    return isinstance(getattr(model, "moe", None), PatchMoE) and hasattr(model, "features")


def router_ranker(combine: str = "max") -> Ranker:
    """Rank the positions by the routers' probabilities, combined over experts by ``combine``; the logits of the
    same pass (the pMoE's forward, split where the routers read the shared map)."""
    if combine not in COMBINE:
        raise ValueError(f"router_ablation.combine must be one of {COMBINE}, got {combine!r}")

    @torch.inference_mode()
    def rank(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = model.features(x)
        probs = model.moe.routing_probs(feats)  # (B, experts, 64)
        scores = probs.amax(dim=1) if combine == "max" else probs.sum(dim=1)
        return model.head(model.moe(feats)[0]), scores

    return rank


def run(ctx: DefenseContext) -> DefenseResult:
    if not has_routers(ctx.model):
        return not_applicable(f"{type(ctx.model).__name__} has no routers to rank patches with")
    combine = ctx.config["combine"]
    return run_patch_ablation(ctx, "router_ablation", router_ranker(combine), {"ranking": "router",
                                                                                "combine": combine})

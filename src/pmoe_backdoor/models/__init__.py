"""Models: the architectures (``architectures``: the pMoE and a dense WRN), the inference form with folded
BatchNorms (``inference``), model files (``checkpoint``), routing analysis (``routing``) and K models as one batched
computation (``packed``).

The model contract, which every stage relies on: ``model(x)`` maps a float batch (N, 3, 32, 32), scaled as
``runtime.to_input`` scales the uint8 images, to logits (N, classes); the last layer is a Linear at ``model.head.fc``
(its input is the penultimate feature that Activation Clustering and Spectral Signatures read). A routed model also
answers ``model(x, return_routing=True)`` with ``(logits, [each router's chosen positions])``.

The registry lives here, without torch: the DAG build and the config checks ask what a model *can* do (capabilities,
not names); its builder is imported only when a model is built. Adding a model: a builder function
``(num_classes, **its config keys) -> nn.Module`` honouring the contract, one ``register_model`` line below, its
``arch`` in config/schema.yaml's ``model`` definition (tests/test_registries.py checks the schema against this).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..registry import Registry, import_attribute


@dataclass(frozen=True)
class ModelKind:
    """An architecture (the config's ``arch``) and its capabilities."""

    name: str
    builder: str  # "module:function" building it from (num_classes, **config keys)
    # routers that pick patches per expert: routing statistics and maps, routing flips at deployment
    routing: bool = False
    # a fixed list of module slots that homologous models can exchange: merging by module switching (MSD)
    module_slots: bool = False
    # expert channels that Fine-Pruning ranks and prunes (the authors prune the pMoE's experts)
    prunable_channels: bool = False

    def load(self) -> Callable[..., Any]:
        return import_attribute(self.builder)


MODELS: Registry[ModelKind] = Registry("model name (arch)")
register_model = MODELS.register
model_kind = MODELS.lookup


register_model(ModelKind("pmoe", "pmoe_backdoor.models.architectures:build_pmoe", routing=True, module_slots=True,
                         prunable_channels=True))
register_model(ModelKind("wrn", "pmoe_backdoor.models.architectures:build_wrn"))
# the source papers' architectures, as positive controls (models/controls.py)
register_model(ModelKind("vgg", "pmoe_backdoor.models.controls:build_vgg"))
register_model(ModelKind("preact_resnet18", "pmoe_backdoor.models.controls:build_preact_resnet18", module_slots=True))

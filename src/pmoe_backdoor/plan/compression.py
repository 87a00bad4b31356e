"""The plan of the compression-activated backdoors (Tian et al.). Mixed into :class:`Plan`; it reads the main
study's attributes (``self.config``, ``self.compress``, ...)."""

from __future__ import annotations

from typing import Any

from ..naming import CLEAN
from .common import RESULTS, canonical


class CompressionPlan:
    # An attack model lives at {dataset}/{model}/compression/{variant}-{target}/seed{seed}: the `attack` wildcard is
    # "<variant>-<target label>", so the Neural Cleanse job script (which names runs by that wildcard) serves it too.
    # The faithful variant at a bit width other than the authors' 8 is "faithful<bits>bit".

    @staticmethod
    def compression_variant(attack: str) -> tuple[str, int]:
        """(variant, weight bits) of an `attack` wildcard: "faithful4bit-1" -> ("faithful", 4)."""
        name = attack.rsplit("-", 1)[0]
        if name.endswith("bit") and name[:-3].rstrip("0123456789") == "faithful":
            return "faithful", int(name[len("faithful"):-3])
        return name, 8

    @staticmethod
    def compression_dir(dataset: str, model: str, attack: str, seed: int | str) -> str:
        return f"{RESULTS}/{dataset}/{model}/compression/{attack}/seed{seed}"

    @staticmethod
    def compression_target(wc: Any) -> int:
        """The target label of an attack model, from its `attack` wildcard "<variant>-<target>"."""
        return int(wc.attack.rsplit("-", 1)[1])

    def compression_train_params(self, wc: Any) -> dict[str, Any]:
        """The attack recipe of one model: the train block, its variant, the pruning keys, the dataset's lr drop."""
        variant, bits = self.compression_variant(wc.attack)
        prune = self.compress["prune"]
        cfg = dict(self.compress["train"], variant=variant, bits=bits, prune_rate=prune["rate"],
                   prune_lower=prune["lower"], prune_upper=prune["upper"], alpha=prune["alpha"])
        by_dataset = self.compress.get("lr_drop_epoch_by_dataset", {})
        if wc.dataset in by_dataset:
            cfg["lr_drop_epoch"] = by_dataset[wc.dataset]
        return canonical(cfg)

    def compression_max_fp32_asr(self, wc: Any) -> float:
        return self.compress.get("max_fp32_asr_by_dataset", {}).get(wc.dataset, self.compress["max_fp32_asr"])

    def compression_runs(self, dataset: str) -> list[tuple[str, str, int]]:
        """(model, attack wildcard, seed) of every attack model of a dataset."""
        c = self.compress
        if not c["enabled"] or dataset not in c["datasets"]:
            return []
        targets = c.get("targets_by_dataset", {}).get(dataset, c["targets"])
        names = [f"faithful{b}bit" if v == "faithful" and b != 8 else v
                 for v in c["variants"] for b in (c["bits"] if v == "faithful" else [8])]
        models = [c["model"]] if isinstance(c["model"], str) else c["model"]
        return [(m, f"{v}-{t}", s) for m in models for v in names for t in targets for s in range(c["seeds"])]

    def compression_eval_targets(self, dataset: str) -> list[str]:
        return [f"{self.compression_dir(dataset, m, a, s)}/evaluation.json"
                for m, a, s in self.compression_runs(dataset)]

    def compression_nc_targets(self, dataset: str) -> list[str]:
        """Neural Cleanse on each released (fp32) attack model, when the neural_cleanse block is enabled."""
        if not self.nc["enabled"]:
            return []
        return [f"{self.compression_dir(dataset, m, a, s)}/neural_cleanse/fp32.json"
                for m, a, s in self.compression_runs(dataset)]

    def compression_clean_nc(self, dataset: str) -> list[str]:
        """The clean models' fp32 Neural Cleanse summaries (the negatives of the ROC-AUC), when the study has them:
        those of the detection table and, when the blindspot table runs Neural Cleanse at fp32, its clean seeds."""
        if not self.nc["enabled"] or "fp32" not in self.nc["precisions"]:
            return []
        runs = {run for run, attack, _ in self.nc_runs(dataset) if attack == CLEAN}
        if "fp32" in self.blind.get("precisions", []):
            runs |= {run for run, attack in self.blindspot_runs(dataset) if attack == CLEAN}
        return [f"{run}/neural_cleanse/fp32.json" for run in sorted(runs)]

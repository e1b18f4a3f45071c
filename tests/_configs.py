"""Config specs of the tests: ``"cifar10_vit"`` is ``configs/cifar10_vit.yaml``, ``"cifar10_vit+diff"`` that
recipe with the attention-kind overlay ``configs/kinds/diff.yaml`` layered over it (as users write it)."""
from __future__ import annotations

from _training_data import CONFIGS


def config_args(spec: str) -> list[str]:
    recipe, _, kind = spec.partition("+")
    args = ["--config", str(CONFIGS / f"{recipe}.yaml")]
    if kind:
        args += ["--config", str(CONFIGS / "kinds" / f"{kind}.yaml")]
    return args

"""The benchmark's LoRA baseline: Hugging Face PEFT's LoRA as a `Method` the library's `fit` trains.

LoRA is not a library method. `PeftLora` injects PEFT LoRA layers into the same timm model every
other row uses, so the training loop, optimiser, schedule and model selection are exactly those of
the other rows; `lora_size` and `choose_rank` size a LoRA task analytically, to find the rank that
matches another row's stored size. Its norm layers follow a norm policy (`norms`: task, affine,
base or split) exactly as the library's methods apply it (`taps_cl.methods.norms.NormPolicy`), so
that the external reference can be measured under every policy the library rows are.
"""

from __future__ import annotations

import statistics
import warnings
from dataclasses import dataclass

from torch import Tensor, nn

from taps_cl.methods.base import LayerRecord, Method, TaskState
from taps_cl.methods.layers import (
    adaptable_layers,
    cpu_copy,
    freeze,
    head_parameters,
    head_state,
    layer_kind,
    trainable,
)
from taps_cl.methods.norms import DEFAULT_NORM_SPLIT, NORM_POLICIES, NormPolicy
from taps_cl.methods.options import check_choice, check_number
from taps_cl.models import backbones


@dataclass(frozen=True)
class LoraOptions:
    """Options of the benchmark's LoRA baseline (PEFT's LoraConfig underneath)."""

    # LoRA rank r; each layer's rank is capped at the rank its weight can have at most.
    rank: int = 8
    # LoRA alpha; None gives alpha = rank, i.e. the update is scaled by 1 in every layer.
    alpha: float | None = None
    # Norm policy (taps_cl.methods.norms): "task" is what this baseline always did.
    norms: str = "task"
    norm_split: float = DEFAULT_NORM_SPLIT  # with norms "split": the share keeping base stats

    def __post_init__(self) -> None:
        object.__setattr__(self, "rank", check_number("peft-lora", "rank", self.rank, minimum=1,
                                                      integer=True))
        if self.alpha is not None:
            object.__setattr__(self, "alpha",
                               check_number("peft-lora", "alpha", self.alpha, positive=True))
        check_choice("peft-lora", "norms", self.norms, NORM_POLICIES)
        object.__setattr__(self, "norm_split", check_number(
            "peft-lora", "norm_split", self.norm_split, minimum=0, maximum=1))

    @property
    def policy(self) -> NormPolicy:
        return NormPolicy(self.norms, self.norm_split)


def lora_targets(model: nn.Module, head: frozenset[str]) -> list[tuple[str, nn.Module]]:
    """Adaptable layers PEFT can give a low-rank update: Linear and groups=1 Conv2d.

    PEFT 0.21 accepts a grouped conv only when the rank is a multiple of its groups (a depthwise
    conv of Lite0 has 32–1152 groups), so depthwise convs keep their base weights.
    """
    return [(n, m) for n, m in adaptable_layers(model, head) if getattr(m, "groups", 1) == 1]


def _fan(module: nn.Module) -> tuple[int, int]:
    """(inputs per output of the LoRA A factor, outputs): C_in·k_h·k_w and C_out for a conv."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return module.in_channels * kh * kw, module.out_channels
    return module.in_features, module.out_features


def layer_ranks(targets: list[tuple[str, nn.Module]], rank: int) -> dict[str, int]:
    """Rank per targeted layer: r, capped at min(fan-in, fan-out) (more adds numbers, not rank)."""
    return {name: min(rank, *_fan(module)) for name, module in targets}


def lora_numbers(targets: list[tuple[str, nn.Module]], rank: int) -> int:
    """Numbers in the A and B factors at rank r: Σ_l r_l·(C_in·k² + C_out)."""
    ranks = layer_ranks(targets, rank)
    return sum(ranks[name] * sum(_fan(module)) for name, module in targets)


def norm_numbers(model: nn.Module, policy: NormPolicy | None = None) -> int:
    """Numbers a task stores for its norm layers under `policy` (default "task": parameters and
    statistics of every norm layer, as TAPS stores them by default)."""
    return sum(v.numel() for v in (policy or NormPolicy()).state(model).values())


class PeftLora(Method):
    """LoRA from Hugging Face PEFT on Linear/groups=1 Conv2d layers; the head trains too, and the
    norm layers as the norm policy says.

    Not registered in taps_cl.methods (the library's own method "lora" is another thing): it
    exists for this benchmark, trained by the library's `fit` so the loop, optimiser, schedule and
    model selection are exactly those of the others.
    """

    name = "peft-lora"
    Config = LoraOptions
    mergeable = False  # the task state keeps the A/B factors, not a merged weight

    def prepare(self, model: nn.Module, head: frozenset[str]) -> nn.Module:
        """Freeze the base, inject PEFT LoRA layers, make the head and the norm parameters the
        policy trains trainable."""
        import peft

        cfg = self.config
        freeze(model)
        targets = lora_targets(model, head)
        self.layers = [
            (name, layer_kind(m), m.weight.numel(), getattr(m, "groups", 1) == 1)
            for name, m in adaptable_layers(model, head)
        ]
        ranks = layer_ranks(targets, cfg.rank)
        alpha = float(cfg.alpha if cfg.alpha is not None else cfg.rank)
        # PEFT scales by alpha/r per layer: keep that scale the same where the rank was capped.
        capped = {name: r for name, r in ranks.items() if r != cfg.rank}
        peft_cfg = peft.LoraConfig(
            r=cfg.rank,
            lora_alpha=alpha,
            target_modules=[name for name, _ in targets],
            rank_pattern={f"^{_escape(n)}": r for n, r in capped.items()},
            alpha_pattern={f"^{_escape(n)}": alpha * r / cfg.rank for n, r in capped.items()},
            lora_dropout=0.0,
            bias="none",
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft.inject_adapter_in_model(peft_cfg, model)
        cfg.policy.make_trainable(model)
        trainable(head_parameters(model, head))
        return model

    def set_train_mode(self, model: nn.Module) -> None:
        """Train mode, but norm layers that keep the base's statistics in eval mode."""
        self.config.policy.train_mode(model)

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        """One group: LoRA factors, the trained norm parameters and the head."""
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "weight_decay": weight_decay, "name": "task"}]

    def extract(self, model: nn.Module, head: frozenset[str]) -> TaskState:
        """A/B factors of every targeted layer, the norm tensors the policy stores, the head."""
        tensors: dict[str, Tensor] = {}
        stored: dict[str, int] = {}
        for name, module in model.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                tensors[f"lora/{name}.lora_A.weight"] = cpu_copy(a)
                tensors[f"lora/{name}.lora_B.weight"] = cpu_copy(b)
                stored[name] = a.numel() + b.numel()
        for key, value in self.config.policy.state(model).items():
            tensors[f"set/{key}"] = cpu_copy(value)
        tensors.update(head_state(model, head))
        layers = [
            LayerRecord(name, kind, None, name in stored, base, stored.get(name, 0))
            for name, kind, base, _ in self.layers
        ]
        return TaskState(tensors=tensors, layers=layers)


def _escape(name: str) -> str:
    return name.replace(".", r"\.")


def lora_size(spec: str, head: frozenset[str], rank: int, num_classes: int,
              policy: NormPolicy | None = None) -> int:
    """Analytic numbers a LoRA task stores: A/B factors + norm state (by `policy`) + head."""
    model = backbones.create_model(spec, num_classes=num_classes)
    targets = lora_targets(model, head)
    heads = sum(p.numel() for n, p in model.named_parameters() if n in head)
    return lora_numbers(targets, rank) + norm_numbers(model, policy) + heads


def choose_rank(spec: str, head: frozenset[str], classes: list[int], target: float,
                max_rank: int = 1024, policy: NormPolicy | None = None) -> tuple[int, float]:
    """The rank whose mean LoRA task size (norms stored by `policy`, default "task") is nearest
    `target`, and that mean size."""
    model = backbones.create_model(spec, num_classes=classes[0])
    targets = lora_targets(model, head)
    fixed = statistics.fmean(
        norm_numbers(model, policy) + sum(p.numel() for n, p in
                                  backbones.create_model(spec, num_classes=c).named_parameters()
                                  if n in head)
        for c in classes
    )
    best = min(range(1, max_rank + 1),
               key=lambda r: (abs(lora_numbers(targets, r) + fixed - target), r))
    return best, lora_numbers(targets, best) + fixed

"""Gradient task similarity: a task's signature, the cosine matrix, clustering.

The signature recipe (``RECIPE``; a contract: signatures are stored with tasks and compared later,
so changing any step below means a new ``RECIPE`` and old signatures are refused, not mixed in):

1. Take a fresh copy of the base with the task's new head (`backbones.build_task_model`), in eval
   mode throughout — no BatchNorm statistic changes, no dropout.
2. Fit the head: zero it, then minimise cross-entropy + ``head_l2``·‖head weights‖² with
   full-batch L-BFGS (``head_steps`` iterations, strong-Wolfe line search) on the frozen base's
   features (the head module's input) of ``head_samples`` training images drawn with
   ``numpy.random.default_rng([seed, 0])``. Zero start + a convex, regularised problem: the same
   data gives the same head whatever torch's global RNG holds.
3. Attach signature adapters: zero-initialised bottleneck adapters (`methods.adapter.Bottleneck`,
   reduction ``reduction``, ReLU) on the middle third of the backbone's blocks,
   ``blocks[n//3 : 2n//3]`` (the middle block when that is empty). Their down projections are
   drawn, block by block in module order (weight, then bias), uniformly in ±1/√fan_in from a
   ``torch.Generator`` seeded with ``seed`` — the same numbers for every task of a base, which is
   what makes signatures of different tasks comparable.
4. For ``batches`` training batches of ``batch_size`` images (positions from
   ``numpy.random.default_rng([seed, 1])``: successive slices of fresh permutations), take the
   gradient of the mean cross-entropy with respect to the signature adapters' up projections
   (weights and biases, in block order; with U = 0 the down projections get no gradient), flatten
   it and scale it to unit length.
5. Average the unit gradients and scale the mean to unit length: a float32 vector.

Similarity of two tasks is the cosine of their signatures, S(t, t′) ≈ E[cos(g_t, g_t′)] as in
Gangwar et al. (2025). Tasks are grouped by average-linkage agglomerative clustering on the
distance 1 − cosine (`cluster`).

Pure torch/numpy: nothing here touches the registry (`taps_cl.manager` reads stored signatures).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import Dataset

import taps_cl.serialization as serialization
from taps_cl.errors import MethodError, TapsError
from taps_cl.methods.blocks import BlockSite, Bottleneck, hook_blocks, site_name, trace_blocks
from taps_cl.methods.layers import freeze
from taps_cl.methods.options import check_number

log = logging.getLogger(__name__)

# The recipe's name: bump it whenever a step of the module docstring changes.
RECIPE = "taps-cl/gradient-signature/1"
# The ModuleDict on a model `task_signature` consumed that holds its signature adapters.
SIGNATURE_ATTR = "taps_signature_adapters"
# The tensor's name in a signature artifact.
TENSOR_KEY = "signature"
# Automatic grouping (`cluster` without k) merges groups while their average distance 1 − cosine
# stays below this, i.e. while their tasks' gradients agree with an average cosine above 0.5 —
# more aligned than not. On ImageNet Lite0, letters A–J vs k–t measure 0.75 and letters, digits
# and Fashion-MNIST against each other 0.02–0.24 (see SignatureConfig.head_l2).
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class SignatureConfig:
    """How a signature is computed (module docstring); part of the recipe stored with it."""

    # Training batches whose unit gradients are averaged. Measured on ImageNet Lite0 at 64 px
    # over three data seeds: with 4 batches (and 256 head images) cos(A–J, k–t) ranged 0.28–0.56,
    # with 16 (and 512) 0.73–0.79, the unrelated pairs staying ≤ 0.33.
    batches: int = 16
    # Images per gradient batch (fewer when the training set is smaller).
    batch_size: int = 32
    # L-BFGS iterations fitting the linear head on frozen features.
    head_steps: int = 100
    # Training images (at most) whose features the head is fitted on.
    head_samples: int = 512
    # L2 weight on the head's weights while fitting: keeps the head's predictions soft, so the
    # gradient speaks for every image, not only the few a near-separating head still gets wrong.
    # Measured on ImageNet Lite0 at 64 px (letters A–J, k–t, digits, Fashion-MNIST): cos(A–J,
    # k–t) is 0.45 at 1e-3, 0.75 at 0.1, 0.80 at 1; letters vs Fashion-MNIST -0.01, 0.02, 0.20.
    head_l2: float = 0.1
    # Seeds the signature adapters' down projections and the choice of images; the same for every
    # task that is to be compared.
    seed: int = 0
    # Reduction factor of the signature adapters (a block of C channels gets max(1, C // r)).
    reduction: int = 16

    def __post_init__(self) -> None:
        for name in ("batches", "batch_size", "head_steps", "head_samples", "reduction"):
            object.__setattr__(self, name, check_number(
                "signature", name, getattr(self, name), minimum=1, integer=True))
        object.__setattr__(self, "seed", check_number(
            "signature", "seed", self.seed, minimum=0, integer=True))
        object.__setattr__(self, "head_l2", check_number(
            "signature", "head_l2", self.head_l2, minimum=0))


# ------------------------------------------------------------------------------- the signature


def task_signature(
    model: nn.Module, head: frozenset[str], train: Dataset, *, example: Tensor,
    config: SignatureConfig = SignatureConfig(), device: str = "cpu",
) -> Tensor:
    """The task's gradient signature: a unit-length float32 vector on the CPU (module docstring).

    `model` is a fresh copy of the base with the task's head; it is consumed: its head is
    refitted, signature adapters stay attached (``model.taps_signature_adapters``, which
    `signature_meta` reads) and it is moved to `device`. `example` is one input batch of the
    task's size (for block shapes). On the CPU the result is bit-for-bit the same for the same
    data and config.
    """
    n = len(train)  # type: ignore[arg-type]
    if n == 0:
        raise TapsError("signature: the training set is empty")
    target = torch.device(device)
    model.to(target).float().eval()
    freeze(model)
    head_module = _head_module(model, head)

    picks = np.random.default_rng([config.seed, 0]).permutation(n)[: config.head_samples]
    images, labels = _batch(train, picks)
    features = _head_inputs(model, head_module, images, config.batch_size, target)
    if head_module(features[:1]).shape[-1] < 2:
        raise TapsError("signature: a task with one class has no loss gradient to compare "
                        "(it needs at least two classes)")
    _fit_head(head_module, features, labels.to(target), config)

    sites = signature_sites(model, head, example.to(target))
    adapters = signature_adapters(sites, config)
    holder = hook_blocks(model, SIGNATURE_ATTR, sites, adapters, "signature")
    ups = [p for site in sites for p in (holder[site.key].up.weight, holder[site.key].up.bias)]
    for p in ups:
        p.requires_grad_(True)

    total: Tensor | None = None
    for positions in _batch_positions(n, config):
        x, y = _batch(train, positions)
        with torch.enable_grad():  # also when the caller runs under no_grad
            loss = F.cross_entropy(model(x.to(target)), y.to(target))
            grads = torch.autograd.grad(loss, ups)
        g = torch.cat([t.reshape(-1) for t in grads]).detach().float()
        norm = torch.linalg.vector_norm(g)
        if not torch.isfinite(norm):
            raise TapsError("signature: the task loss has a non-finite gradient")
        if norm == 0:  # a batch the fitted head gets exactly right tells nothing
            continue
        total = g / norm if total is None else total + g / norm
    if total is None:
        raise TapsError("signature: every batch has a zero gradient (nothing to compare)")
    signature = (total / torch.linalg.vector_norm(total)).cpu().float()
    log.debug("signature: %d numbers from %d signature blocks", signature.numel(), len(sites))
    return signature


def signature_sites(model: nn.Module, head: frozenset[str], example: Tensor) -> list[BlockSite]:
    """The blocks that get signature adapters: the middle third, ``blocks[n//3 : 2n//3]``."""
    sites = trace_blocks(model, head, example)
    n = len(sites)
    middle = sites[n // 3 : 2 * n // 3]
    return middle or [sites[n // 2]]


def signature_adapters(sites: Sequence[BlockSite],
                       config: SignatureConfig) -> dict[str, Bottleneck]:
    """Signature adapters by site key: zero up projections, down projections from `config.seed`."""
    generator = torch.Generator().manual_seed(config.seed)
    adapters = {}
    for site in sites:
        adapter = Bottleneck(site, config.reduction, "relu")
        with torch.no_grad():
            for param in (adapter.down.weight, adapter.down.bias):
                # PyTorch's default bound for both (kaiming_uniform with a=√5): 1/√fan_in.
                bound = 1.0 / math.sqrt(adapter.down.weight[0].numel())
                param.copy_((torch.rand(param.shape, generator=generator) * 2 - 1) * bound)
        adapters[site.key] = adapter
    return adapters


def _head_module(model: nn.Module, head: frozenset[str]) -> nn.Module:
    """The one module holding the head's parameters (its input is the frozen feature vector)."""
    owners = sorted({key.rpartition(".")[0] for key in head})
    if len(owners) != 1 or not owners[0]:
        raise MethodError(f"signature: the classifier head {sorted(head)} is not one module; "
                          "signatures need a single classifier layer")
    return dict(model.named_modules())[owners[0]]


def _batch(train: Dataset, positions: np.ndarray) -> tuple[Tensor, Tensor]:
    items = [train[int(i)] for i in positions]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


def _head_inputs(model: nn.Module, head_module: nn.Module, images: Tensor, batch_size: int,
                 device: torch.device) -> Tensor:
    """What the head module receives for `images`, computed in chunks without gradients."""
    seen: list[Tensor] = []

    def capture(module: nn.Module, args: tuple) -> None:
        seen.append(args[0].detach())

    handle = head_module.register_forward_pre_hook(capture)
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                model(images[start : start + batch_size].to(device))
    finally:
        handle.remove()
    if len(seen) != math.ceil(len(images) / batch_size):
        raise MethodError("signature: the classifier head does not run once per forward pass")
    return torch.cat(seen)


def _fit_head(head_module: nn.Module, features: Tensor, labels: Tensor,
              config: SignatureConfig) -> None:
    """Zero the head, then full-batch L-BFGS on cross-entropy + head_l2·‖weights‖²."""
    params = list(head_module.parameters())
    weights = [p for name, p in head_module.named_parameters() if not name.endswith("bias")]
    with torch.no_grad():
        for p in params:
            p.zero_()
            p.requires_grad_(True)
    optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=config.head_steps,
                                  line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(head_module(features), labels)
        loss = loss + config.head_l2 * sum(w.pow(2).sum() for w in weights)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    for p in params:
        p.requires_grad_(False)
        p.grad = None


def _batch_positions(n: int, config: SignatureConfig) -> list[np.ndarray]:
    """Training positions of each gradient batch: successive slices of seeded permutations."""
    size = min(config.batch_size, n)
    rng = np.random.default_rng([config.seed, 1])
    needed = config.batches * size
    order = np.concatenate([rng.permutation(n) for _ in range(math.ceil(needed / n))])
    return [order[i * size : (i + 1) * size] for i in range(config.batches)]


# ------------------------------------------------------------------------------- storage


def signature_meta(model: nn.Module, config: SignatureConfig = SignatureConfig()) -> dict[str, Any]:
    """The recipe of the signature `task_signature` computed on `model`, for `signature_to_bytes`.

    Recipe name, config and signature blocks: signatures whose recipes differ are not compared.
    """
    adapters = getattr(model, SIGNATURE_ATTR, None)
    if not isinstance(adapters, nn.ModuleDict):
        raise MethodError("signature_meta: the model has no signature adapters "
                          "(pass the model task_signature consumed)")
    return {"recipe": RECIPE, "config": dataclasses.asdict(config),
            "blocks": [site_name(key) for key in adapters]}


def signature_to_bytes(signature: Tensor, meta: dict[str, Any]) -> bytes:
    """A signature as a safetensors artifact (kind "signature") with `meta` as its metadata.

    `meta` should come from `signature_meta` (extra keys, e.g. the task's name, are kept); the
    recipe name is always recorded.
    """
    if signature.dim() != 1 or not signature.is_floating_point():
        raise TapsError(f"signature must be a 1-D float tensor, got shape "
                        f"{tuple(signature.shape)} of {signature.dtype}")
    fields = {"kind": "signature", **meta, "recipe": meta.get("recipe", RECIPE)}
    return serialization.to_bytes({TENSOR_KEY: signature.detach().float()}, fields)


def signature_recipe(data: bytes) -> dict[str, Any]:
    """What must agree for two stored signatures to be compared: recipe, config, blocks."""
    meta = serialization.metadata_from_bytes(data)
    return {key: serialization.json_field(meta, key) for key in ("recipe", "config", "blocks")}


def signature_from_bytes(data: bytes) -> Tensor:
    """The signature in a `signature_to_bytes` artifact; refused if another recipe made it."""
    recipe = signature_recipe(data).get("recipe")
    if recipe != RECIPE:
        raise TapsError(f"signature computed with recipe {recipe!r}, not {RECIPE!r}: "
                        "it cannot be compared with signatures computed now")
    tensors = serialization.from_bytes(data)
    if set(tensors) != {TENSOR_KEY} or tensors[TENSOR_KEY].dim() != 1:
        raise TapsError(f"not a signature artifact (tensors: {', '.join(sorted(tensors))})")
    return tensors[TENSOR_KEY].float()


def check_comparable(recipes: Sequence[dict[str, Any]], names: Sequence[str]) -> None:
    """Refuse (one line) signatures made with different recipes, configs or blocks."""
    if not recipes:
        return
    first = recipes[0]
    for recipe, name in zip(recipes[1:], names[1:]):
        for key in ("recipe", "config", "blocks"):
            if recipe.get(key) != first.get(key):
                raise TapsError(
                    f"the signatures of {names[0]!r} and {name!r} were computed with different "
                    f"{key}s ({_short(first.get(key))} vs {_short(recipe.get(key))}): "
                    "they cannot be compared")


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


# ------------------------------------------------------------------------- matrix, clustering


def cosine_matrix(signatures: Sequence[Tensor]) -> np.ndarray:
    """Pairwise cosine similarities (float64, symmetric, ones on the diagonal)."""
    if not signatures:
        return np.zeros((0, 0))
    sizes = {int(s.numel()) for s in signatures}
    if len(sizes) != 1 or any(s.dim() != 1 for s in signatures):
        raise TapsError(f"signatures of different sizes ({', '.join(map(str, sorted(sizes)))}) "
                        "cannot be compared: they come from different bases or blocks")
    stacked = np.stack([s.detach().cpu().double().numpy() for s in signatures])
    norms = np.linalg.norm(stacked, axis=1)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        raise TapsError("a signature is zero or not finite")
    unit = stacked / norms[:, None]
    matrix = np.clip(unit @ unit.T, -1.0, 1.0)
    matrix = (matrix + matrix.T) / 2
    np.fill_diagonal(matrix, 1.0)
    return matrix


def cluster(matrix: np.ndarray, k: int | None = None,
            threshold: float = DEFAULT_THRESHOLD) -> list[int]:
    """Group labels per task: average linkage on 1 − cosine, into k groups or by `threshold`.

    Without k, groups merge while their average distance stays below `threshold` (see
    DEFAULT_THRESHOLD). Labels are numbered by first appearance (the first task is in group 0).
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or not np.all(np.isfinite(m)):
        raise TapsError(f"a similarity matrix must be square and finite, got shape {m.shape}")
    n = m.shape[0]
    if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer))
                          or not 1 <= k <= max(n, 1)):
        raise TapsError(f"the number of groups must be between 1 and {n} (the tasks), got {k}")
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 0):
        raise TapsError(f"the distance threshold must be a positive number, got {threshold!r}")
    if n <= 1:
        return [0] * n
    if k == n:
        return list(range(n))
    from sklearn.cluster import AgglomerativeClustering

    distance = np.clip(1.0 - (m + m.T) / 2, 0.0, 2.0)
    np.fill_diagonal(distance, 0.0)
    model = AgglomerativeClustering(
        n_clusters=k, distance_threshold=None if k is not None else threshold,
        metric="precomputed", linkage="average")
    raw = model.fit_predict(distance)
    order: dict[int, int] = {}
    return [order.setdefault(int(label), len(order)) for label in raw]

"""Per-layer rules of the fast path: sum_n (per-sample gradient)^2 from a layer's input and
output gradient, one file per use of a parameter.

- :mod:`.linear`, :mod:`.conv`, :mod:`.embedding`, :mod:`.norm`, :mod:`.attention`: module
  rules (:class:`.base.Rule`), found through the registry :data:`RULES` by :func:`rule_for`;
- :mod:`.broadcast`: raw parameters broadcast over the batch (class tokens, position
  embeddings), caught at their expand/add autograd node rather than at a module.

docs/FAST_PATH.md has each layer's math, one section per rule file.
"""

from __future__ import annotations

import functools

from torch import nn

from .attention import MultiheadAttentionRule
from .base import Rule
from .conv import ConvRule
from .embedding import EmbeddingRule
from .linear import LinearRule
from .norm import NormRule, batch_norm, group_norm, layer_norm, rms_norm

#: Module class -> its rule. A subclass takes its nearest base's rule (see :func:`rule_for`).
RULES: dict[type, Rule] = {
    nn.Linear: LinearRule(),
    nn.Conv1d: ConvRule(),
    nn.Conv2d: ConvRule(),
    nn.Embedding: EmbeddingRule(),
    nn.LayerNorm: NormRule(layer_norm, position_wise=True),
    nn.GroupNorm: NormRule(group_norm),
    nn.BatchNorm1d: NormRule(batch_norm),
    nn.BatchNorm2d: NormRule(batch_norm),
    nn.BatchNorm3d: NormRule(batch_norm),
    nn.MultiheadAttention: MultiheadAttentionRule(),
}
if hasattr(nn, "RMSNorm"):
    RULES[nn.RMSNorm] = NormRule(rms_norm, position_wise=True)

# Methods a subclass may override and still compute its base's forward: construction, and
# FSDP2's ``_apply`` (device moves of the sharded parameters).
_HARMLESS_OVERRIDES = {"__init__", "__new__", "_apply", "extra_repr", "reset_parameters"}


def rule_for(module: nn.Module) -> Rule | None:
    """The rule of ``module``'s type, if it supports this configuration; else None. A subclass
    (NonDynamicallyQuantizableLinear, FSDP2's FSDPLinear/FSDPConv2d) takes its base's rule
    only if it keeps the base's ``forward``: one that overrides it may compute anything."""
    rule = _rule_of_type(type(module))
    return rule if rule is not None and rule.supports(module) else None


@functools.lru_cache(maxsize=None)
def _rule_of_type(cls: type) -> Rule | None:
    """The rule of the nearest base in RULES, unless ``cls`` overrides one of its methods beyond
    _HARMLESS_OVERRIDES (looked up once per class: the planner asks for every module, every call)."""
    mro = cls.__mro__
    for depth, base in enumerate(mro):
        if base in RULES:
            overridden = {
                name for sub in mro[:depth] if sub not in base.__mro__
                for name, value in vars(sub).items() if callable(value) and hasattr(base, name)
            }
            return None if overridden - _HARMLESS_OVERRIDES else RULES[base]
    return None


__all__ = ["RULES", "Rule", "rule_for"]

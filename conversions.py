"""A checkpoint's names against the model's: transformers' own conversion mapping, read from transformers.

transformers 5 keeps the experts of a mixture-of-experts layer fused, as 3-D parameters (`mlp.experts.gate_up_proj`
(experts, 2 * inter, hidden) and `mlp.experts.down_proj` (experts, hidden, inter)), while save_pretrained writes them
one per expert, as the checkpoints on the Hub are (`experts.3.w1.weight`, `experts.3.gate_proj.weight`, ...), some
under an older block name (Mixtral's `block_sparse_moe`). Which names fuse into which, and how (stacked, then gate and
up concatenated), is transformers' per-architecture knowledge (conversion_mapping.py: WeightRenaming, WeightConverter):
it is taken from there, not written again here.

  saved_layout  model tensor -> the tensors save_pretrained writes for it, with their shapes (for most, one: itself),
                by transformers' save-time reversal run on the meta skeleton: no memory, no data
  sources       which of the two layouts a checkpoint holds, tensor by tensor (the fused one, as a state_dict holds
                it, or the saved one); what is missing, naming the expert when only some of a layer's are there
  fuse          the streamed tensors, a layer's experts gathered and fused by transformers' converter when the last
                of them arrives: never more than one layer's experts held at once
  split         the reverse, for writers: one fused experts tensor as save_pretrained writes it, one per expert
"""
from collections.abc import Iterable, Iterator
from copy import deepcopy

import torch
import torch.nn as nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (PrefixChange, WeightConverter, WeightRenaming, dot_natural_key,
                                             rename_source_key, revert_weight_conversion)


def _transforms(model: nn.Module) -> tuple[list, list]:
    """The renamings and converters transformers applies to this model's checkpoint keys, as revert_weight_conversion
    takes them for a model not made by from_pretrained: no legacy renames (old LayerNorm names), no prefix changes."""
    transforms = [t for t in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(t, PrefixChange)]
    return ([t for t in transforms if isinstance(t, WeightRenaming)],
            [t for t in transforms if isinstance(t, WeightConverter)])


def saved_layout(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> dict[str, dict[str, tuple[int, ...]]]:
    """Model tensor name -> {checkpoint name: shape} of what save_pretrained writes for it."""
    saved = revert_weight_conversion(model, {name: torch.empty(shape, device="meta") for name, shape in shapes.items()})
    renamings, converters = _transforms(model)
    layout = {}
    for name, tensor in saved.items():
        target, _ = rename_source_key(name, renamings, converters)
        layout.setdefault(target if target in shapes else name, {})[name] = tuple(tensor.shape)
    for name in shapes.keys() - layout.keys():  # not expected; the model's own name is then the only layout
        layout[name] = {name: shapes[name]}
    return layout


def sources(layout: dict[str, dict[str, tuple[int, ...]]], present: Iterable[str],
            skip: set[str]) -> tuple[dict[str, list[str]], list[str], list[tuple[str, str]]]:
    """(model name -> the checkpoint names it is read from, in transformers' order; the model tensors missing
    altogether; (missing checkpoint name, model name) where only part of a tensor's sources are there, a missing
    expert). `skip`: tensors that need not be in the checkpoint (a tied lm_head)."""
    present = set(present)
    chosen, missing, partial = {}, [], []
    for name, saved in layout.items():
        if name in present:  # the model's own layout: fused experts, as a state_dict (or an older writer) holds them
            chosen[name] = [name]
        elif saved.keys() <= present:
            # dot_natural_key: experts 0, 1, ..., 10 in number order, which is how MergeModulelist must stack them
            chosen[name] = sorted(saved, key=dot_natural_key)
        elif saved.keys() & present:
            partial += [(source, name) for source in sorted(saved.keys() - present, key=dot_natural_key)]
        elif name not in skip:
            missing.append(name)
    return chosen, sorted(missing), partial


def fuse(tensors: Iterable[tuple[str, torch.Tensor]], groups: dict[str, list[str]],
         model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(model name, tensor) for the streamed (checkpoint name, tensor) pairs. `groups`: the model tensors read from
    other names (sources()); one that is a rename passes at once, the sources of a fused one wait until the last has
    arrived (a layer's experts are neighbours in the files) and go through a copy of transformers' converter."""
    renamings, converters = _transforms(model)
    by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    owner = {source: name for name, names in groups.items() for source in names}
    waiting: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}  # target -> source -> (its pattern, tensor)
    for name, tensor in tensors:
        target = owner.get(name)
        pattern = target and rename_source_key(name, renamings, converters)[1]
        if pattern is None:  # the model's own name, or a renamed one (Mixtral's block_sparse_moe.gate -> mlp.gate)
            yield target or name, tensor
            continue
        parts = waiting.setdefault(target, {})
        parts[name] = (pattern, tensor)
        if len(parts) < len(groups[target]):
            continue
        del waiting[target]
        converter = deepcopy(by_pattern[pattern])  # each target its own, as transformers does
        for source in groups[target]:
            converter.add_tensor(target, source, *parts.pop(source))
        for fused_name, fused in converter.convert(target, model=model, config=model.config).items():
            yield fused_name, fused[0] if isinstance(fused, list) else fused


def split(model: nn.Module, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """A fused experts tensor of `model` (name -> (experts, out, in)) as the per-expert tensors save_pretrained
    writes for it, by transformers' own save-time reversal (what merge.py and benchmark.py write)."""
    return revert_weight_conversion(model, {name: tensor})

"""Where a rank's loaded 4-bit model waits in host memory, and loading within what the node has there.

Every rank loads the whole 4-bit model before FSDP shards it. Where that copy waits in host memory (--cpu_offload,
several ranks, the CPU: held_in_host_memory), its size, estimated from the safetensors headers, is set against the
node's available memory before anything loads (copies_at_once). A node that cannot hold a copy per rank loads in
turns, as many ranks at once as fit beside the shares the others keep once wrapped (loaders_at_once); a turn ends
with the ranks agreeing whether one failed (stop_if_any_failed). Where not even one copy fits, the run is refused
(host_memory_refusal). train.load_for_training takes the turns.
"""
import math
import os
import re
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

import cli
import model_loading
import settings


def held_in_host_memory(cfg: settings.Config, device: torch.device) -> str | None:
    """Why this rank's loaded 4-bit model waits in host memory, as a phrase for the host-memory refusal; None where
    it goes straight to the GPU, and with --show, which loads no model. Sharded over several GPUs, or offloaded, the
    whole 4-bit model may not fit one GPU (70B: ~38 GB): the loader quantizes on the GPU and keeps the result in host
    memory, and FSDP moves each unit to the GPU as it shards it (or, offloaded on one GPU, offload.WeightStream keeps
    the decoder layers there)."""
    if cfg.show:
        return None
    if cfg.cpu_offload:
        return "--cpu_offload keeps the model in host memory"
    if dist.get_world_size() > 1 and cfg.sharding != "no_shard":
        return "every rank loads the whole model into host memory before FSDP shards it"
    return "on the CPU the model lives in host memory" if device.type == "cpu" else None


class Turns(NamedTuple):
    """How the ranks of each node load the model (loaders_at_once): `at_once` at a time, in `count` turns."""
    at_once: int
    count: int


def on_every_rank(value: int, op: dist.ReduceOp, device: torch.device) -> int:
    """`value` reduced over all ranks with `op` (MIN, MAX): the same answer on every rank."""
    reduced = torch.tensor(value, device=device if dist.get_backend() == "nccl" else "cpu")  # gloo reduces on the CPU
    dist.all_reduce(reduced, op=op)
    return int(reduced.item())


def loaders_at_once(cfg: settings.Config, model_dir: Path, device: torch.device, log=print) -> Turns:
    """How many of this node's ranks load the model at once (load_for_training): all of them, unless it waits in
    host memory (held_in_host_memory) and their copies do not all fit there. Sharded with full_shard or
    shard_grad_op, the ranks then load in turn, as many at once as fit: each wraps (shards, and frees the rest of its
    copy, or all of it where the shards go to the GPU) before the next loads. A collective: every rank takes the
    smallest count any rank found, since the turns are collectives too. A model that cannot fit even so is refused,
    on every rank, before anything is loaded. (hybrid_shard's FSDP makes process groups as it wraps, which needs all
    ranks at once: its ranks never take turns.) The turns are counted from the node with the most ranks, so that
    every rank passes the same number of them."""
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    why = held_in_host_memory(cfg, device)
    if why is None:
        return Turns(ranks, 1)
    in_turn = dist.get_world_size() > 1 and cfg.sharding in ("full_shard", "shard_grad_op")
    # what a rank keeps in host memory once it has wrapped: all of it, its shard, or nothing (on the GPU)
    kept = 1 / dist.get_world_size() if cfg.cpu_offload or device.type == "cpu" else 0.0
    fit, one, available = copies_at_once(model_dir, cfg.quant, ranks, kept if in_turn else 1.0)
    at_once = on_every_rank(fit, dist.ReduceOp.MIN, device)
    if at_once == 0:
        raise host_memory_refusal(model_dir, why, one, available, ranks, in_turn)
    if at_once < ranks:
        log(f"the {ranks} ranks of each node load the model {at_once} at a time: {available / 2**30:,.1f} GiB of "
               f"host memory is available, and each rank's copy takes {one / 2**30:,.1f} GiB until it is sharded")
    return Turns(at_once, math.ceil(on_every_rank(ranks, dist.ReduceOp.MAX, device) / at_once))


def stop_if_any_failed(failed: Exception | None, rank: int, device: torch.device) -> None:
    """A collective: if any rank passes the error it met, every rank raises: that rank its own error, the others the
    first failing rank's, as a refusal where it was one (said once, as every refusal: cli.refuse), else as an
    error that names that rank."""
    world = dist.get_world_size()
    first = on_every_rank(rank if failed is not None else world, dist.ReduceOp.MIN, device)
    if first == world:
        return
    said = [str(failed), isinstance(failed, cli.Refusal)]
    dist.broadcast_object_list(said, src=first)
    if failed is not None and rank == first:
        raise failed
    message, refused = said
    raise cli.Refusal(message) if refused else RuntimeError(f"rank {first} failed to load the model: {message}")


def copies_at_once(model_dir: Path, quant: str, ranks: int = 1, kept: float = 1.0,
                   available: int | None = None) -> tuple[int, int, int]:
    """How many of a node's `ranks` can hold the loaded model in host memory at once: (that count, the bytes of one
    copy as estimated from the headers, the bytes available). 0: not even one copy fits.

    Each rank loads the whole model there, then wraps it, after which it keeps the share `kept` of it there: 1
    unsharded, 1/ranks-in-all sharded with the shards in host memory (--cpu_offload, the CPU), 0 sharded onto the
    GPU. Below 1 the ranks can load in turn, k at a time, while the others hold their shares: the largest k with
    k copies and the others' shares within `available` (the kernel's MemAvailable by default; where the system has
    no /proc/meminfo, all fit). The estimate is a floor: loading and optimizer state add to it.
    """
    one = model_loading.host_bytes(model_loading.plan_load(model_dir, quant))
    if available is None:
        meminfo = Path("/proc/meminfo")
        found = re.search(r"MemAvailable:\s+(\d+) kB", meminfo.read_text()) if meminfo.exists() else None
        available = int(found.group(1)) * 1024 if found else ranks * one
    if ranks * one <= available:
        return ranks, one, available
    if kept >= 1:
        return 0, one, available
    at_once = (available - ranks * one * kept) // (one * (1 - kept))
    return int(max(0, min(ranks, at_once))), one, available


def host_memory_refusal(model_dir: Path, why: str, one: int, available: int, ranks: int = 1,
                        in_turn: bool = False) -> model_loading.ModelFolderError:
    """The refusal of a model whose copies cannot fit in host memory where it is held there (`why`: --cpu_offload,
    several ranks, the CPU), with the figures; `in_turn`: not even one rank at a time, beside the others' shards."""
    each = ""
    if ranks > 1:
        each = (f"; its {ranks} ranks load it one at a time, beside each other's shards" if in_turn else
                f", by each of the {ranks} ranks on this node: {ranks * one / 2**30:,.1f} GiB in all")
    fewer = ", run fewer ranks on this node (--nnodes spreads them over several)" if ranks > 1 else ""
    return model_loading.ModelFolderError(
        f"{why}: {model_dir} needs about {one / 2**30:,.1f} GiB there as loaded (estimated from its safetensors "
        f"headers){each}, and {available / 2**30:,.1f} GiB is available. Free host memory{fewer}, or use a machine "
        "with more" + (", or train without --cpu_offload" if "--cpu_offload" in why else ""))

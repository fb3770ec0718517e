"""Parallelism applied from outside the model (as torchtitan does): FSDP2, activation checkpointing, compile, and
sharding-independent random init. (Loading a checkpoint straight into the sharded parameters: lynx.weights.sharded.)

Sharding units: the embedding, each block, the output head (final norm + lm_head + loss), then the root. FSDP2
gathers a unit's full weights only while that unit runs, so the fused loss, which reads `lm_head.weight` inside
`OutputHead.forward`, sees the whole matrix.
"""

from __future__ import annotations

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from lynx.config import DTYPES, fast_dtype

AC_MODES = ("none", "full", "every_k")


def dtype_from_name(name: str, key: str, device_type: str = "cpu") -> torch.dtype:
    """A config's dtype name; "auto" (compute dtypes): bfloat16 where `device_type` runs it natively, else float32."""
    if name == "auto":
        return fast_dtype(device_type)
    if name not in DTYPES:
        raise ValueError(f"{key}: unknown dtype {name!r} (choose from {sorted(DTYPES)})")
    return DTYPES[name]


def build_mesh(device_type: str, world_size: int, replicate: int) -> DeviceMesh:
    """1-D mesh (full shard over all ranks) or, with replicate > 1, a 2-D (replicate, shard) mesh for HSDP:
    parameters are sharded within a group of world_size / replicate ranks (one node, typically) and replicated
    across groups, so all-gathers stay on the fast intra-node links."""
    if replicate < 1 or world_size % replicate:
        raise ValueError(f"parallel.replicate={replicate} must be >= 1 and divide the world size {world_size}")
    if replicate == 1:
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(device_type, (replicate, world_size // replicate), mesh_dim_names=("replicate", "shard"))


def parallelize(model: torch.nn.Module, mesh: DeviceMesh, cfg, frozen: list[torch.nn.Module] = ()) -> torch.nn.Module:
    """Apply activation checkpointing, optional per-block torch.compile, then FSDP2 to `model` (in place).

    cfg: a ParallelConfig (param_dtype, reduce_dtype, activation_checkpointing, ac_every, compile,
    reshard_after_forward). Call on the meta-device model, before materialising and loading weights.
    frozen: modules that do not train (the embedding and lower blocks when only the top ones are fine-tuned). They
    are kept whole on every rank in param_dtype, outside FSDP: sharding them would all-gather weights that never
    change at every step (on CPU over gloo, that communication idled the ranks a third of the time), and with no
    gradient they need neither a master copy nor activation checkpointing.
    """
    frozen_params = {p for module in frozen for p in module.parameters()}
    frozen_blocks = {id(m) for m in frozen}
    if cfg.activation_checkpointing not in AC_MODES:
        raise ValueError(f"parallel.activation_checkpointing: {cfg.activation_checkpointing!r} not in {AC_MODES}")
    every = 1 if cfg.activation_checkpointing == "full" else cfg.ac_every
    if cfg.activation_checkpointing == "every_k" and every < 1:
        raise ValueError(f"parallel.ac_every must be >= 1, got {every}")
    for i, block in enumerate(model.layers):
        if id(block) in frozen_blocks:
            continue
        if cfg.activation_checkpointing != "none" and i % every == 0:
            # Recompute the block's activations in backward: memory per block drops to its input.
            block = checkpoint_wrapper(block, preserve_rng_state=False)
        if cfg.compile:
            block.compile()
        model.layers[i] = block

    param_dtype = dtype_from_name(cfg.param_dtype, "parallel.param_dtype", mesh.device_type)
    reduce_dtype = dtype_from_name(cfg.reduce_dtype, "parallel.reduce_dtype")
    one_rank = mesh.size() == 1
    if one_rank:
        # One rank: the "reduction" is the identity, so reducing in the parameter dtype gives the fp32 gradients bit
        # for bit (an upcast is exact) without an fp32 copy of every gradient (benchmarks/bench_train_step.py: a
        # tenth of the step and ~80 MiB on its 51M-parameter model).
        reduce_dtype = param_dtype
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    shard = dict(mesh=mesh, mp_policy=mp)
    for module in frozen:
        module.to(dtype=param_dtype)
    tied = model.config.tie_word_embeddings
    if not tied and model.embed_tokens not in frozen:
        # A tied embedding is one parameter used at both ends: it must live in one unit, here the root.
        fully_shard(model.embed_tokens, **shard, reshard_after_forward=cfg.reshard_after_forward)
    for block in model.layers:
        if id(block) not in frozen_blocks:
            fully_shard(block, **shard, reshard_after_forward=cfg.reshard_after_forward)
    if not tied:
        # The head runs last in forward and first in backward: keeping it gathered saves one all-gather.
        fully_shard(model.head, **shard, reshard_after_forward=False)
    fully_shard(model, **shard, ignored_params=frozen_params or None)
    # Gradients are summed, not averaged, across ranks: the loss is already divided by the global token count.
    # Plain SUM collectives (not NCCL's PREMUL_SUM, which gloo lacks); a factor of 1 means no scaling at all.
    # (On one rank sum and average agree, and FSDP2's own default skips the division pass an explicit factor costs.)
    for module in model.modules():
        if isinstance(module, FSDPModule) and not one_rank:
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model


def local_slices(t: torch.Tensor) -> tuple[slice, ...]:
    """The index of this rank's shard of a DTensor within the full tensor (everything for a plain tensor)."""
    if not isinstance(t, DTensor):
        return tuple(slice(0, n) for n in t.shape)
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the tensor itself when it is a plain one)."""
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def init_random_sharded(model: torch.nn.Module, *, seed: int, std: float = 0.02) -> None:
    """Random init (norm gains 1, other weights N(0, std)) that does not depend on how the model is sharded.

    Each full tensor is drawn from a generator seeded by (seed, tensor index) and each rank keeps its slice: the
    same weights on 1 or N ranks. Every rank materialises one full tensor at a time, fine for the small models
    that are trained from scratch here."""
    for i, (name, t) in enumerate(model.state_dict().items()):
        if name.endswith("norm.weight"):
            local_tensor(t).fill_(1.0)
            continue
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
        full = torch.empty(t.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
        local_tensor(t).copy_(full[local_slices(t)])


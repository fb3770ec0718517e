"""Plan a GPU run before paying for the cluster: trace the real training step at full size, with no GPU and no memory.

    python -m lynx.plan --config configs/lynx-70b.yaml --nnodes 4 --nproc-per-node 8 [--gpu h100-80gb] [overrides]

One rank of the run is simulated, as torchtitan's memory estimator does: a fake process group of the run's world size
(torch.testing._internal.distributed.fake_pg, backend "fake": collectives do nothing) and FakeTensorMode (tensors
carry shapes and dtypes, never data). On them lynx.train.build.shard_model builds the model exactly as training does
(meta device, the real lynx.parallel.parallelize: FSDP2 or HSDP, activation checkpointing, mixed precision) and
lynx.train.train_step runs one step (with the optimizer state in place, as every step after the first) on packed
micro-batches of data.max_seq_len tokens. torch's FSDPMemTracker records the bytes alive after every operation.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import shlex
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from lynx.config import ConfigError, LlamaConfig

# Usable memory (what nvidia-smi reports) and bf16 dense peak (lynx.train.metrics.GPU_PEAK_TFLOPS) of each GPU.
GPUS = {
    "h100-80gb": (81559 * 2**20, "H100"),
    "a100-80gb": (81920 * 2**20, "A100"),
    "a100-40gb": (40960 * 2**20, "A100"),
    "h200-141gb": (143771 * 2**20, "H200"),
    "l40s-48gb": (46068 * 2**20, "L40S"),
}
# Kept free of the traced tensors: the CUDA context and NCCL buffers (~1-2 GB) and the caching allocator's
# fragmentation, which the tracker (exact tensor bytes) does not see.
HEADROOM = 0.10
# Model FLOPs utilisation of FSDP2 Llama training as published: torchtitan (arXiv 2410.06511) and LLM Foundry's
# benchmark tables report roughly 35-46% for Llama 8B-70B on H100/A100 in bf16.
DEFAULT_MFU = 0.40

# config.json of the Lynx base checkpoints, for configs whose model.init_from is not on this machine.
_LLAMA3 = dict(vocab_size=128256, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
               rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128009)
PUBLISHED_CONFIGS = {
    "Meta-Llama-3-8B-Instruct": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                     num_attention_heads=32),
    "Meta-Llama-3-70B-Instruct": dict(_LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                      num_attention_heads=64),
}


@dataclasses.dataclass
class Plan:
    world: int
    shard_group: int  # ranks one parameter is sharded over (world / parallel.replicate)
    micro_batch: int
    grad_accum: int
    seq_len: int
    activation_checkpointing: str
    gpu: str
    gpu_bytes: int
    param_bytes: int  # this rank's parameters (sharded fp32 master copy, frozen modules whole)
    grad_bytes: int  # this rank's gradients just before the optimizer step
    optim_bytes: int  # this rank's optimizer state
    peak_bytes: int  # most bytes alive at once during a step
    peak_breakdown: dict  # what was alive at the peak, by FSDPMemTracker's categories
    largest_bytes: int  # the largest single allocation
    step_flops: float  # model FLOPs of one optimizer step, all ranks (lynx.train.metrics.step_flops)
    tokens_per_step: int
    step_seconds: float
    steps: int | None  # optimizer steps of the whole run (None: data size unknown)

    @property
    def budget_bytes(self) -> int:
        return int(self.gpu_bytes * (1 - HEADROOM))

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.budget_bytes


class FakeScalars(TorchDispatchMode):
    """What a step reads back into Python, under FakeTensorMode, where no tensor holds a value.

    The batch's integer tensors (labels, cu_seqlens, the kept-token index of the fused loss) are real: ops whose
    tensor inputs are all real run for real, so token counts and segment bounds are exact. A value computed from the
    fake weights (the loss, the gradient norm) cannot be known: it reads as 1 (finite, so the optimizer step runs,
    as in a real step). Also records the largest single allocation."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._subclasses.fake_tensor import is_fake, unset_fake_temporarily

        kwargs = kwargs or {}
        if any(t is DTensor for t in types):
            return NotImplemented  # let DTensor run its local ops, which come back through here
        tensors = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        fake = [t for t in tensors if is_fake(t)]
        if func is torch.ops.aten._local_scalar_dense.default and fake:
            if fake[0].dtype.is_floating_point or fake[0].dtype == torch.bool:
                return True if fake[0].dtype == torch.bool else 1.0
            raise RuntimeError(f"lynx.plan: the step reads an integer from a fake tensor ({func}); only values of "
                               "the batch can be known without data")
        if tensors and not fake:
            with unset_fake_temporarily():
                out = func(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out



@contextlib.contextmanager
def untracked_sharding_propagation():
    """DTensor finds each op's output shape by running the op on fake tensors of the GLOBAL shape. In a real run it
    does so in a fake mode of its own, which FSDPMemTracker ignores; here the whole step is fake, DTensor reuses
    that mode, and the tracker would count those global tensors as allocations (5.9 GB at the 8B's gradient norm).
    So the propagation runs with the dispatch modes off, as it would on a GPU."""
    from torch.distributed.tensor._sharding_prop import ShardingPropagator
    from torch.utils._python_dispatch import _disable_current_modes

    original = ShardingPropagator._propagate_tensor_meta_non_cached

    def propagate(self, op_schema):
        with _disable_current_modes():
            return original(self, op_schema)

    ShardingPropagator._propagate_tensor_meta_non_cached = propagate
    try:
        yield
    finally:
        ShardingPropagator._propagate_tensor_meta_non_cached = original

def planned_model_config(cfg) -> LlamaConfig:
    """The architecture to plan: the config's own (model.config, or model.init_from's config.json when that is on
    this machine), else the published config.json of a known base checkpoint named by model.init_from."""
    from lynx.train.build import model_config

    if cfg.model.init_from is not None and not Path(cfg.model.init_from).exists():
        name = Path(cfg.model.init_from).name
        if name not in PUBLISHED_CONFIGS:
            raise FileNotFoundError(f"model.init_from: {cfg.model.init_from} is not here and {name!r} is not one of "
                                    f"the known checkpoints {sorted(PUBLISHED_CONFIGS)}; plan with "
                                    "model.init_from=null model.config='{...config.json fields...}'")
        return LlamaConfig.from_hf_dict(PUBLISHED_CONFIGS[name], source=f"published config.json of {name}")
    return model_config(cfg)


def full_micro_batch(seq_len: int, micro_batch: int, vocab: int) -> dict:
    """A micro-batch of rows that are one document of seq_len tokens each, every token a target: the most memory
    (the fused loss runs over the target tokens only) and the most attention work a row can take."""
    from lynx.sft_data import IGNORE_INDEX, PackedSequence, collate

    ids = [i % vocab for i in range(seq_len)]
    row = PackedSequence(input_ids=ids, labels=[IGNORE_INDEX, *ids[1:]], lengths=[seq_len], indices=[0])
    return collate([row] * micro_batch, seq_len)


def local_bytes(tensors) -> int:
    """Bytes of this rank's part of each tensor (a DTensor's local shard)."""
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)


def estimate(cfg, nnodes: int, nproc_per_node: int, gpu: str = "h100-80gb", mfu: float = DEFAULT_MFU,
             train_sequences: int | None = None) -> Plan:
    """Trace two training steps of `cfg` on one rank of nnodes x nproc_per_node GPUs (see the module docstring)."""
    import lynx.kernels.linear_cross_entropy as fused_loss
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from lynx import parallel
    from lynx.train.build import build_optimizer, shard_model
    from lynx.train.config import grad_accum_steps
    from lynx.train.loop import train_step
    from lynx.train.metrics import GPU_PEAK_TFLOPS, step_flops

    if gpu not in GPUS:
        raise ConfigError(f"--gpu {gpu!r}: choose one of {', '.join(GPUS)}")
    if cfg.parallel.compile:
        raise ConfigError("parallel.compile=true cannot be traced under fake tensors; plan with parallel.compile=false "
                          "(a compiled block keeps at most as many activations as an eager one)")
    world = nnodes * nproc_per_node
    grad_accum = grad_accum_steps(cfg, world)
    model_cfg = planned_model_config(cfg)
    batches = [full_micro_batch(cfg.data.max_seq_len, cfg.data.micro_batch_size, model_cfg.vocab_size)] * grad_accum
    device = torch.device("cpu")  # fake CPU tensors: the same shapes and dtypes as on the GPU
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    # The CPU twin of the fused loss compiles its tile math for large problems; nothing compiles under fake tensors,
    # and the eager twin allocates the same tiles (plus fp32 temporaries of one tile).
    compile_min_logits, fused_loss.COMPILE_MIN_LOGITS = fused_loss.COMPILE_MIN_LOGITS, math.inf
    try:
        mesh = parallel.build_mesh(device.type, world, cfg.parallel.replicate)
        with FakeTensorMode(allow_non_fake_inputs=True), FakeScalars() as scalars, untracked_sharding_propagation():
            model = shard_model(cfg, model_cfg, mesh, device)
            trainable = [p for p in model.parameters() if p.requires_grad]
            optimizer = build_optimizer(cfg, trainable)
            grad_bytes = []
            optimizer.register_step_pre_hook(lambda *_: grad_bytes.append(
                local_bytes(p.grad for p in trainable if p.grad is not None)))
            # The optimizer state as after a first step (every later step starts with it), without tracing one.
            for p in trainable:
                p.grad = torch.zeros_like(p)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # Two micro-batches are enough: from the second on, each backward runs beside the gradients so far.
            traced = batches[:2]
            tracker = FSDPMemTracker(model, optimizer)
            tracker.track_inputs(tuple(traced))
            with tracker:
                train_step(model, optimizer, traced, device, cfg.optim.max_grad_norm, trainable)
            peak = tracker.get_tracker_snapshot("peak")[device]
            param_bytes = local_bytes(model.parameters())
            optim_bytes = local_bytes(t for s in optimizer.state.values() for t in s.values()
                                      if isinstance(t, torch.Tensor))
    finally:
        fused_loss.COMPILE_MIN_LOGITS = compile_min_logits
        dist.destroy_process_group()
    n_params = sum(p.numel() for p in model.parameters())
    flops = world * step_flops(model_cfg, n_params, batches, sum(p.numel() for p in trainable))
    tflops = GPU_PEAK_TFLOPS[GPUS[gpu][1]]
    steps = None
    if train_sequences is not None:
        per_epoch = (train_sequences // cfg.global_batch_size if cfg.data.drop_last
                     else math.ceil(train_sequences / cfg.global_batch_size))
        steps = cfg.max_steps or cfg.epochs * per_epoch
    return Plan(
        world=world, shard_group=world // cfg.parallel.replicate, micro_batch=cfg.data.micro_batch_size,
        grad_accum=grad_accum, seq_len=cfg.data.max_seq_len,
        activation_checkpointing=cfg.parallel.activation_checkpointing, gpu=gpu, gpu_bytes=GPUS[gpu][0],
        param_bytes=param_bytes, grad_bytes=max(grad_bytes), optim_bytes=optim_bytes, peak_bytes=peak["Total"],
        peak_breakdown={str(k.value if hasattr(k, "value") else k): v for k, v in peak.items() if v},
        largest_bytes=scalars.largest, step_flops=flops, tokens_per_step=cfg.global_batch_size * cfg.data.max_seq_len,
        step_seconds=flops / (world * tflops * 1e12 * mfu), steps=steps,
    )


def train_sequences(cfg) -> tuple[int | None, str]:
    """Sequences per epoch of data.train, as the trainer makes them (one per row unpacked; tokenized and packed
    otherwise), and where the number came from."""
    from lynx import sft_data

    if cfg.data.train is None or not Path(cfg.data.train).is_file():
        return None, f"data.train ({cfg.data.train}) is not on this machine: pass --train-sequences for the run time"
    rows = sft_data.load_rows(cfg.data.train)
    if not cfg.data.pack:
        return len(rows), f"{len(rows)} rows of {cfg.data.train}, one sequence each"
    from lynx.train.build import load_tokenizer, tokenize_data

    examples, _ = tokenize_data(cfg, load_tokenizer(cfg), rank=0)
    prefix = sft_data.shared_prefix(examples) if cfg.data.shared_prefix else None
    n = len(sft_data.pack(examples, cfg.data.max_seq_len, prefix))
    return n, f"{len(rows)} rows of {cfg.data.train} packed into {n} sequences"


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def report(plan: Plan, cfg, mfu: float, data_note: str) -> str:
    from lynx import parallel

    shard = (f"FSDP full shard over {plan.world} ranks" if plan.shard_group == plan.world else
             f"HSDP: sharded over {plan.shard_group} ranks, replicated {plan.world // plan.shard_group} times")
    tokens_per_s = plan.tokens_per_step / plan.step_seconds
    param_dtype = str(parallel.dtype_from_name(cfg.parallel.param_dtype, "parallel.param_dtype", "cuda"))
    param_dtype = param_dtype.removeprefix("torch.")
    lines = [
        f"{plan.world} x {plan.gpu} | {shard} | micro-batch {plan.micro_batch} x {plan.grad_accum} accumulation "
        f"step(s) x {plan.world} ranks = {cfg.global_batch_size} sequences of {plan.seq_len} tokens | activation "
        f"checkpointing {plan.activation_checkpointing} | params {param_dtype}, reduce "
        f"{cfg.parallel.reduce_dtype} | {cfg.optim.name}",
        "",
        "| per GPU | |",
        "|---|---|",
        f"| parameters | {gib(plan.param_bytes)} |",
        f"| gradients | {gib(plan.grad_bytes)} |",
        f"| optimizer state | {gib(plan.optim_bytes)} |",
        f"| peak during a step | {gib(plan.peak_bytes)} |",
        f"| largest single allocation | {gib(plan.largest_bytes)} |",
        f"| GPU memory, less {HEADROOM:.0%} headroom | {gib(plan.gpu_bytes)} - {HEADROOM:.0%} = {gib(plan.budget_bytes)} |",
        f"| fits | {'yes' if plan.fits else 'NO'} ({plan.peak_bytes / plan.budget_bytes:.0%} of the budget) |",
        f"| FLOPs per step (all GPUs) | {plan.step_flops:.3g} |",
        f"| step time at {mfu:.0%} MFU | {plan.step_seconds:.2f} s |",
        f"| tokens/s (all GPUs) | {tokens_per_s:,.0f} ({tokens_per_s / plan.world:,.0f} per GPU) |",
        f"| run | {f'{plan.steps} steps: {duration(plan.steps * plan.step_seconds)}' if plan.steps else 'per step only'} |",
        "",
        "at the peak: " + ", ".join(f"{k} {gib(v)}" for k, v in plan.peak_breakdown.items() if k != "Total"),
        f"data: {data_note}",
        f"time: model FLOPs as the trainer counts them for MFU (lynx.train.metrics.step_flops), every sequence full "
        f"(padding costs the same compute), at an assumed {mfu:.0%} MFU (torchtitan and LLM Foundry publish "
        f"35-46% for FSDP Llama training)",
        "traced on fake CPU tensors: the fused loss ran its torch twin (the Triton kernel needs a GPU; both share one "
        "loop and tile sizes), attention SDPA's flash kernel (flash-attn keeps the same per-token state); the peak "
        f"counts tensors only, hence the {HEADROOM:.0%} headroom for the CUDA context, NCCL and fragmentation",
    ]
    return "\n".join(lines)


def fixes(cfg, nnodes: int, nproc_per_node: int):
    """The changes that can make a plan fit, cheapest first and each on top of the ones before (so the first that
    fits is the smallest): (what, overrides, nnodes)."""
    what, overrides = [], []
    for applies, name, override in (
        (cfg.parallel.activation_checkpointing != "full", "activation checkpointing on",
         "parallel.activation_checkpointing=full"),
        (cfg.data.micro_batch_size > 1, "micro-batch 1 (more accumulation steps)", "data.micro_batch_size=1"),
        (cfg.parallel.replicate > 1, "full sharding instead of HSDP", "parallel.replicate=1"),
    ):
        if applies:
            what.append(name)
            overrides.append(override)
            yield " + ".join(what), list(overrides), nnodes
    micro = 1 if overrides and "data.micro_batch_size=1" in overrides else cfg.data.micro_batch_size
    for more in (2 * nnodes, 4 * nnodes):
        if cfg.global_batch_size % (micro * more * nproc_per_node) == 0:  # the global batch must still split
            yield " + ".join([*what, f"{more} nodes"]), list(overrides), more


def main(argv: list[str] | None = None) -> int:
    from lynx.train.config import config_help, load_config

    parser = argparse.ArgumentParser(
        prog="python -m lynx.plan", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Will this training config fit the GPUs, and how long will it take?\n\n"
        "Traces one real training step (lynx.train.train_step on the model lynx.parallel shards) at full size on\n"
        "one simulated rank: fake tensors and a fake process group, so no GPU and no memory are needed. Prints per\n"
        "GPU: parameters, gradients, optimizer state, the peak, the largest allocation, whether it fits, and the\n"
        "step and run time at an assumed MFU. When it does not fit, re-plans with the smallest change that fits\n"
        "(activation checkpointing, micro-batch 1, full sharding, more nodes) and exits 1.",
        epilog="example: python -m lynx.plan --config configs/lynx-70b.yaml --nnodes 4 --nproc-per-node 8\n\n"
        "config keys (override any as dotted.key=value):\n" + config_help(),
    )
    parser.add_argument("--config", required=True, help="training config (YAML), as given to train.py")
    parser.add_argument("--nnodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument("--nproc-per-node", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument("--gpu", default="h100-80gb", choices=sorted(GPUS), help="GPU model (default h100-80gb)")
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU, help=f"assumed MFU (default {DEFAULT_MFU})")
    parser.add_argument("--train-sequences", type=int, help="sequences per epoch (default: counted from data.train)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value config overrides, as for train.py")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.train_sequences is not None:
            sequences, data_note = args.train_sequences, f"{args.train_sequences} sequences per epoch (given)"
        else:
            sequences, data_note = train_sequences(cfg)
        plan = estimate(cfg, args.nnodes, args.nproc_per_node, args.gpu, args.mfu, sequences)
        print(report(plan, cfg, args.mfu, data_note), flush=True)
        if plan.fits:
            return 0
        print(f"\nDOES NOT FIT: peak {gib(plan.peak_bytes)} per GPU, but {args.gpu} has {gib(plan.gpu_bytes)} "
              f"({gib(plan.budget_bytes)} after {HEADROOM:.0%} headroom)", flush=True)
        for what, overrides, nnodes in fixes(cfg, args.nnodes, args.nproc_per_node):
            changed = load_config(args.config, [*args.overrides, *overrides])
            fixed = estimate(changed, nnodes, args.nproc_per_node, args.gpu, args.mfu, sequences)
            verdict = "fits" if fixed.fits else "still does not fit"
            print(f"  with {what}: peak {gib(fixed.peak_bytes)}, {verdict}", flush=True)
            if fixed.fits:
                changed_keys = {o.split("=", 1)[0] for o in overrides}
                kept = [o for o in args.overrides if o.split("=", 1)[0].strip() not in changed_keys]
                command = shlex.join(["python", "-m", "lynx.plan", "--config", args.config, "--nnodes", str(nnodes),
                                      "--nproc-per-node", str(args.nproc_per_node), "--gpu", args.gpu, *kept,
                                      *overrides])
                print(f"smallest change that fits: {what}, step time {fixed.step_seconds:.2f} s at "
                      f"{args.mfu:.0%} MFU\n  {command}")
                break
        else:
            print("nothing tried makes it fit (activation checkpointing, micro-batch 1, full sharding, 2x and 4x "
                  "the nodes): use GPUs with more memory")
        return 1
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"lynx.plan: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

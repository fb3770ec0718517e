"""The training config: dataclasses with typed defaults, read from YAML plus dotted.key=value overrides, checked
before anything runs (every key listed by `python train.py --help`)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lynx import parallel
from lynx.config import ConfigError


@dataclass
class ModelConfig:
    init_from: str | None = None  # a Hugging Face Llama checkpoint directory (or a GGUF file) to fine-tune
    config: dict | None = None  # or LlamaConfig fields (HF config.json names) for a randomly initialised model
    tokenizer: str | None = None  # tokenizer directory (tokenizer.json or tokenizer.model); default: init_from
    # Fine-tune only the top N blocks and the output head (final norm; lm_head unless tied to the embedding); the
    # embedding and the blocks below stay frozen, so backward stops at block L - N. None: train everything.
    train_layers: int | None = None
    init_std: float = 0.02  # random init only


@dataclass
class DataConfig:
    train: str | None = None  # JSONL rows: {"messages": [...]} or {"prompt", "response"}
    max_seq_len: int = 8000  # packed sequence length; longer rows follow `overflow`
    overflow: str = "truncate_document"  # or "drop"
    train_on_inputs: bool = False  # loss on every token (prompt too), not only the assistant turns
    answer_loss: bool = False  # loss also on the ANSWER of faithful (PASS) rows: learn to read the document
    pack: bool = True  # several examples per sequence; False: one example per sequence (padded to max_seq_len)
    # The ids every row starts with (the judge instruction, the template's system turn) once per packed sequence,
    # attended to by each example in it (lynx.attention): fewer tokens per example, the same loss and gradients.
    shared_prefix: bool = False
    pack_group_key: str | None = None  # rows with the same value of this key share a packed sequence (and step)
    micro_batch_size: int = 1  # sequences per rank per forward/backward
    drop_last: bool = True  # drop the last incomplete global batch of each epoch (else wrap around)


@dataclass
class OptimConfig:
    name: str = "lionw"  # "lionw" (decoupled, LLM Foundry's) or "adamw" (torch's)
    lr: float = 5e-7  # peak learning rate
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    eps: float = 1e-8  # adamw only
    warmup_steps: int = 100
    alpha_f: float = 0.1  # final lr = alpha_f * peak (cosine decay after warmup)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping (the norm is still logged)
    max_skipped_steps: int = 10  # stop the run once this many steps had a non-finite loss or gradient norm

    @property
    def max_grad_norm(self) -> float:
        """What clip_grad_norm_ takes: grad_clip, or infinity (no clipping) when grad_clip is 0."""
        return self.grad_clip if self.grad_clip > 0 else math.inf


@dataclass
class ParallelConfig:
    # Compute dtype of gathered parameters (the sharded master copy stays fp32). auto: bfloat16 on GPUs and on CPUs
    # with native bf16 (AVX512-BF16, AMX), float32 elsewhere (emulated bf16 is ~90x slower: lynx.config.bf16_is_native).
    param_dtype: str = "auto"
    reduce_dtype: str = "float32"  # dtype of gradient reduce-scatter
    replicate: int = 1  # HSDP: number of replica groups (e.g. nodes); 1 = shard over all ranks
    activation_checkpointing: str = "full"  # "none", "full" (every block) or "every_k"
    ac_every: int = 2  # with "every_k": checkpoint blocks 0, k, 2k, ...
    compile: bool = False  # torch.compile each block
    reshard_after_forward: bool = True  # free gathered block weights after forward (ZeRO-3); False = ZeRO-2


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # save a sharded training checkpoint every N steps (0: only at the end)
    keep_last: int = 2  # complete checkpoints kept
    export: bool = True  # export a Hugging Face checkpoint to <run_dir>/final at the end
    export_dtype: str = "bfloat16"
    # GGUF files written next to final/ from it (<run_dir>/final-<type>.gguf): "q8_0", or a list of lynx.convert
    # to-gguf types (f32, f16, bf16, q8_0, q4_0, q4_1)
    export_gguf: list[str] = field(default_factory=list)
    max_shard_size: str = "5GB"


@dataclass
class EvalConfig:
    data: str | None = None  # chat rows, JSONL (validation loss), or HaluBench rows in any format lynx.rows reads
    every_steps: int = 0  # evaluate every N optimizer steps and at the end (0: only at the end, when data is set)
    max_rows: int | None = None  # the first N rows of eval.data


@dataclass
class JudgeConfig:
    # What the exported judge reads of a document: the evidence chunks (lynx.context) up to this many tokens, 0 the
    # whole document. Validation on judge rows applies it, and <run_dir>/final/lynx.json records it for judge.py.
    context_tokens: int = 0


@dataclass
class LogConfig:
    wandb_project: str | None = None  # log to Weights & Biases (must be installed) when set
    wandb_run_name: str | None = None
    tensorboard: bool = False  # also write TensorBoard event files to <run_dir>/tensorboard (needs tensorboard)
    gpu_peak_tflops: float | None = None  # bf16 dense peak per GPU for the MFU estimate (default: known GPUs)


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    seed: int = 17
    epochs: int = 1
    max_steps: int | None = None  # total optimizer steps (defines the schedule); default: epochs of the data
    stop_after_step: int | None = None  # exit (with a checkpoint) after this step without changing the schedule
    global_batch_size: int = 32  # packed sequences per optimizer step, over all ranks and accumulation steps
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    log: LogConfig = field(default_factory=LogConfig)


def _coerce(value, tp, key: str):
    """`value` (from YAML or a command-line string) as the dataclass field type `tp`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if isinstance(value, str) and tp is not str:
        value = yaml.safe_load(value) if value.strip() else value
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            raise ValueError(f"expected true or false, got {value!r}")
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(f"expected an integer, got {value!r}")
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError(f"expected a number, got {value!r}")
            return float(value)  # also "5e-7", which YAML 1.1 reads as a string
        if tp is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError(f"expected a string, got {value!r}")
            return str(value)
        if origin is tuple:
            if not isinstance(value, (list, tuple)) or len(value) != len(args):
                raise ValueError(f"expected a list of {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        if origin is list:
            items = value if isinstance(value, (list, tuple)) else [value]  # one item may be given alone
            return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(items)]
        if tp is dict or origin is dict:
            if not isinstance(value, dict):
                raise ValueError(f"expected a mapping, got {value!r}")
            return dict(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key}: {e}") from None
    raise ConfigError(f"{key}: unsupported field type {tp}")


def _build(cls, d: dict, prefix: str = ""):
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; valid keys here: {[prefix + k for k in fields]}"
        )
    kwargs = {}
    for name, value in d.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    return cls(**kwargs)


def _set_dotted(d: dict, dotted: str, value: str) -> None:
    """Put a command-line override into the raw config dict. Keys inside a mapping field (model.config.*) are
    free; everywhere else an unknown key is an error that lists the valid ones."""
    keys = dotted.split(".")
    node, cls = d, TrainConfig
    for i, k in enumerate(keys):
        last = i == len(keys) - 1
        if cls is None:  # inside a mapping field: YAML-typed value
            if last:
                node[k] = yaml.safe_load(value)
            else:
                node = node.setdefault(k, {})
            continue
        hints = typing.get_type_hints(cls)
        if k not in hints:
            where = ".".join(keys[:i]) or "the top level"
            valid = [f.name for f in dataclasses.fields(cls)]
            raise ConfigError(f"unknown config key {dotted!r}: no {k!r} in {where}; valid keys there: {valid}")
        tp = hints[k]
        is_mapping = dict in (tp, typing.get_origin(tp), *typing.get_args(tp))
        if last:
            node[k] = yaml.safe_load(value) if is_mapping else value  # a mapping given whole, as YAML/JSON
            return
        if dataclasses.is_dataclass(tp):
            cls = tp
        elif is_mapping:
            cls = None
        else:
            raise ConfigError(f"{'.'.join(keys[: i + 1])} is not a section (it has no key {keys[i + 1]!r})")
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """A YAML config file (or none: all defaults) with `dotted.key=value` overrides, typed by the dataclasses."""
    raw = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML ({e})") from e
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like dotted.key=value")
        key, value = item.split("=", 1)
        _set_dotted(raw, key.strip(), value)
    cfg = _build(TrainConfig, raw)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    if (cfg.model.init_from is None) == (cfg.model.config is None):
        raise ConfigError("set exactly one of model.init_from (a HF checkpoint dir) and model.config (random init)")
    if cfg.model.train_layers is not None and cfg.model.train_layers < 0:
        raise ConfigError("model.train_layers must be >= 0 (or null: train every layer)")
    if cfg.data.shared_prefix and (cfg.data.train_on_inputs or not cfg.data.pack):
        raise ConfigError("data.shared_prefix needs data.pack=true and data.train_on_inputs=false (the prefix is "
                          "computed once per packed row, so a loss on it would count once instead of per example)")
    from lynx.sft_data import OVERFLOW_POLICIES

    if cfg.data.overflow not in OVERFLOW_POLICIES:
        raise ConfigError(f"data.overflow: {cfg.data.overflow!r} (choose one of {', '.join(OVERFLOW_POLICIES)})")
    if cfg.optim.name not in ("lionw", "adamw"):
        raise ConfigError(f"optim.name: {cfg.optim.name!r} (choose lionw or adamw)")
    for key in ("global_batch_size", "epochs"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ConfigError("max_steps must be >= 1 (or null: run `epochs` over the data)")
    if cfg.data.micro_batch_size < 1 or cfg.data.max_seq_len < 2:
        raise ConfigError("data.micro_batch_size must be >= 1 and data.max_seq_len >= 2")
    if cfg.eval.every_steps < 0 or (cfg.eval.max_rows is not None and cfg.eval.max_rows < 1):
        raise ConfigError("eval.every_steps must be >= 0 and eval.max_rows >= 1 (or null)")
    if cfg.judge.context_tokens < 0:
        raise ConfigError("judge.context_tokens must be >= 0 (0: the whole document)")
    if cfg.eval.every_steps and cfg.eval.data is None:
        raise ConfigError("eval.every_steps is set but eval.data is not")
    if cfg.checkpoint.keep_last < 1:
        raise ConfigError("checkpoint.keep_last must be >= 1")
    if cfg.optim.max_skipped_steps < 1:
        raise ConfigError("optim.max_skipped_steps must be >= 1")
    if cfg.parallel.activation_checkpointing not in parallel.AC_MODES:
        raise ConfigError(f"parallel.activation_checkpointing: {cfg.parallel.activation_checkpointing!r} "
                          f"(choose from {parallel.AC_MODES})")
    from lynx.weights.gguf_write import GGUF_TYPES

    unknown = [t for t in cfg.checkpoint.export_gguf if t not in GGUF_TYPES]
    if unknown:
        raise ConfigError(f"checkpoint.export_gguf: {unknown} (choose from {list(GGUF_TYPES)}; K-quants come from "
                          "llama.cpp's llama-quantize, see the README)")
    if cfg.checkpoint.export_gguf and not cfg.checkpoint.export:
        raise ConfigError("checkpoint.export_gguf needs checkpoint.export=true (the GGUF files are written from final/)")
    for key in ("parallel.param_dtype", "parallel.reduce_dtype", "checkpoint.export_dtype"):
        section, name = key.split(".")
        allowed = ["auto", *parallel.DTYPES] if key == "parallel.param_dtype" else list(parallel.DTYPES)
        if getattr(getattr(cfg, section), name) not in allowed:
            raise ConfigError(f"{key}: {getattr(getattr(cfg, section), name)!r} (choose from {allowed})")


def grad_accum_steps(cfg: TrainConfig, world: int) -> int:
    """Micro-batches per rank per optimizer step. Checked here, not in validate: it needs the world size."""
    per_step = cfg.data.micro_batch_size * world
    if cfg.global_batch_size % per_step:
        raise ConfigError(
            f"global_batch_size={cfg.global_batch_size} is not a multiple of data.micro_batch_size x world size "
            f"= {cfg.data.micro_batch_size} x {world}"
        )
    return cfg.global_batch_size // per_step


def config_help() -> str:
    """Every key with its type and default, for --help."""
    lines = []

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], prefix + f.name + ".")
            else:
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                tp = str(hints[f.name]).replace("typing.", "").replace("<class '", "").replace("'>", "")
                lines.append(f"  {prefix + f.name:34s} {tp:24s} default {default!r}")

    walk(TrainConfig, "")
    return "\n".join(lines)


def config_yaml(cfg: TrainConfig) -> str:
    """The whole config as YAML (what a run saves to <run_dir>/config.yaml; load_config reads it back)."""

    def plain(x):  # dataclasses.asdict output with tuples as lists, for yaml.safe_dump
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return yaml.safe_dump(plain(dataclasses.asdict(cfg)), sort_keys=False)

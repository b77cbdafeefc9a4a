"""The training loop of ``qtrain train``: set up a run, train, evaluate, checkpoint, plot, sample.

Determinism: the model is initialized from ``torch.manual_seed(seed)``, the training batches come from their
own generator seeded with ``seed``, and the validation set is fixed, so runs that differ only in the recipe
see the same initial weights and the same data in the same order. On the CPU a resumed run reproduces the
uninterrupted run bit for bit. On a GPU it does so as far as the kernels are deterministic: cuBLAS GEMMs and
the INT8 Triton kernels are (fixed reduction order), while the backward of ``scaled_dot_product_attention``
(flash/efficient kernels) may use atomics and differ in the last bits.
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

import qtrain
from qtrain import data as qdata
from qtrain import models, recipes
from qtrain.errors import UserError
from qtrain.nn import functional
from qtrain.train import checkpoint, distributed
from qtrain.train.config import IDENTITY, TrainConfig
from qtrain.train.plots import plot_runs, read_log

OPTIMIZERS = ("stableadamw", "adamw")
PRECISIONS = ("auto", "fp32", "bf16")
COMPILE_MODES = ("default", "reduce-overhead")     # torch.compile modes of --compile-mode


class TrainingStopped(UserError):
    """The loss or the weights became non-finite: the run stopped; its last good checkpoint is kept."""


class _NothingToTrain(Exception):
    """Raised by :func:`setup` when the resumed checkpoint is already at ``--steps``."""

    def __init__(self, message: str, ckpt: Path, step: int, world: distributed.World):
        super().__init__(message)
        self.ckpt, self.step, self.world = ckpt, step, world


# ------------------------------------------------------------------------------------------------ helpers
def lr_at(step: int, cfg: TrainConfig, peak: float, warmup: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up over ``warmup`` steps to ``peak``,
    then cosine decay to ``peak / 10`` at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - 1 - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on norms, biases (1-D) or embeddings (a tied head is an embedding)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay)
    if name == "stableadamw":
        return qtrain.optim.StableAdamW(groups, lr=lr, betas=(0.9, 0.99), eps=1e-6)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)
    raise UserError(f"unknown optimizer {name!r}; valid optimizers: {', '.join(OPTIMIZERS)}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; accepted: auto, cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: not supported; accepted: auto, cpu, cuda, cuda:N")
    return device


def resolve_recipe(name: str) -> recipes.Recipe:
    """A preset name, or the path of a recipe JSON file (``Recipe.to_dict()``'s form, as checkpoints record it)."""
    if name.endswith(".json"):
        try:
            return recipes.Recipe.from_dict(json.loads(Path(name).expanduser().read_text()))
        except OSError as e:
            raise UserError(f"--recipe {name!r}: cannot read the recipe file ({e.strerror or e})") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"--recipe {name!r} is not a valid recipe file ({type(e).__name__}: {e}); write one "
                            "with json.dump(qtrain.recipes.Recipe(...).to_dict(), f)") from None
    try:
        return recipes.get(name)
    except ValueError as e:
        raise UserError(f"{e} (or the path of a recipe .json file)") from None


def check_settings(cfg: TrainConfig) -> None:
    """:class:`UserError` for a setting no run can use (a count below its minimum, a non-finite rate, ...)."""
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_every", "eval_batches", "save_every"):
        if getattr(cfg, name) < 1:
            raise UserError(f"{flag(name)} must be at least 1, got {getattr(cfg, name)}")
    for name in ("warmup", "sample_tokens", "keep_checkpoints"):
        value = getattr(cfg, name)
        if value is not None and value < 0:
            raise UserError(f"{flag(name)} must be at least 0, got {value}")
    if cfg.lr is not None and not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise UserError(f"--lr must be a positive finite number, got {cfg.lr}")
    for name in ("weight_decay", "grad_clip"):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value >= 0):
            raise UserError(f"{flag(name)} must be a finite number of at least 0, got {value}")
    if not 0 <= cfg.seed < 2**63:
        raise UserError(f"--seed must be an integer from 0 to 2**63 - 1, got {cfg.seed}")


RUN_MARKERS = ("log.jsonl", "config.json", "summary.json")


def check_out(out: Path, resume_dir: Path | None = None) -> None:
    """``--out`` must name a folder that does not exist yet (and can be created) or is empty, or the folder of
    the run being resumed (``resume_dir``); anything else is a :class:`UserError` (two runs never mix)."""
    try:
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file, not a folder: choose a new folder (it is created) or an "
                            f"empty one")
        if out.is_dir() and not (resume_dir is not None and out.resolve() == resume_dir.resolve()) \
                and any(out.iterdir()):
            if checkpoint.list_checkpoints(out):
                raise UserError(f"--out {out} already holds a run: pass --resume {out} to continue it, or choose "
                                f"another --out")
            if any((out / name).exists() for name in RUN_MARKERS):
                raise UserError(f"--out {out} already holds a run that has no checkpoint to resume: delete the "
                                f"folder or choose another --out")
            raise UserError(f"--out {out} is a folder that is not empty: choose a new or an empty folder")
        ancestor = out.absolute()
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise UserError(f"--out {out}: {ancestor} is a file, not a folder; choose another --out")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise UserError(f"--out {out}: cannot create folders in {ancestor} (permission denied); choose "
                            f"another --out")
    except OSError as e:
        raise UserError(f"--out {out}: cannot use it as the run folder ({e.strerror or e}); choose another "
                        f"--out") from None


def make_out(out: Path) -> None:
    """Create the run folder ``out`` (and its parents); :class:`UserError` if that is impossible."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create the run folder ({e.strerror or e}); choose another "
                        f"--out") from None


def unique_path(base: Path) -> Path:
    """``base``, or ``base-2``, ``base-3``, ... : the first that does not exist (for default run folders)."""
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def quantize_all_but_head(module: nn.Module, name: str) -> bool:
    """``convert`` filter for the training command: every linear layer except the output head (whatever its
    size: the command exists to measure the recipe, so small layers are converted too)."""
    return name.rsplit(".", 1)[-1] != "lm_head"


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def rng_state(device: torch.device) -> dict:
    """This process' random state: torch's default generators and the stochastic-rounding ones."""
    state = {"torch": torch.get_rng_state(), "sr": functional.sr_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore :func:`rng_state` (a checkpoint written before it held ``sr`` keeps the current SR generators)."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    if "sr" in state:
        functional.set_sr_state(state["sr"])


def seed_rounding(seed: int, world: distributed.World, device: torch.device) -> None:
    """Seed the stochastic-rounding generators of the CPU and ``device`` from ``seed`` and the rank, at the start
    of every run: a run then rounds alike whatever ran before it in the process (``qtrain compare`` trains its
    runs one after another), and each process of a run draws a stream of its own (with torch's shared seed alone
    every process would round its data with the same uniforms, and the averaged gradient would keep their
    correlated errors). Only the CPU and this process' device: a generator on another GPU makes a context."""
    functional.reseed((seed * 1_000_003 + world.rank + 1) % 2**62, devices=["cpu", device])


def check_compile_mode(cfg: TrainConfig, device: torch.device, world: distributed.World) -> None:
    """:class:`UserError` when ``--compile-mode`` is unknown or cannot run on this device and world."""
    if cfg.compile_mode not in COMPILE_MODES:
        raise UserError(f"unknown compile mode {cfg.compile_mode!r}; accepted: {', '.join(COMPILE_MODES)}")
    if cfg.compile_mode != "reduce-overhead":
        return
    if device.type != "cuda":
        raise UserError(f"--compile-mode reduce-overhead: CUDA graphs need a CUDA device; got {device.type} "
                        f"(use --compile-mode default there)")
    if world.size > 1:
        raise UserError(f"--compile-mode reduce-overhead under torchrun ({world.size} processes): not supported, "
                        f"DDP/FSDP2 with CUDA graphs is untested; use --compile-mode default (or --compile), or "
                        f"train in one process")


def prepare_grads(model: nn.Module) -> None:
    """Give every trainable parameter of ``model`` a zero ``.grad`` where it has none. Under CUDA graphs
    (``--compile-mode reduce-overhead``) call it before the run's first micro-step, and zero the gradients
    with ``zero_grad(set_to_none=False)`` after each optimizer step.

    Why: the compiled backward's outputs live in the CUDA graph's private memory pool. A parameter whose
    ``.grad`` is None takes the first backward's output tensor itself as its ``.grad`` (AccumulateGrad steals
    it), and the next replay overwrites that memory, so gradient accumulation silently gives wrong gradients
    (pytorch/pytorch#96693, #169545). A ``.grad`` that exists is added to in place, in memory the graph does
    not own. (A parameter that never gets a gradient is then stepped with a zero one.)"""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


@dataclass
class Run:
    """Everything a run holds while training (built by :func:`setup`)."""

    cfg: TrainConfig
    out: Path
    device: torch.device
    precision: str
    model: nn.Module            # the model as built (saved, sampled from)
    step_model: nn.Module       # the model called in the loop (in DDP under torchrun, compiled when --compile)
    model_config: models.ModelConfig
    recipe: recipes.Recipe
    tokenizer: object
    tokens: qdata.TokenData
    batches: qdata.Batches
    optimizer: torch.optim.Optimizer
    peak_lr: float
    warmup: int
    start_step: int = 0
    record: dict = field(default_factory=dict)
    world: distributed.World = distributed.World()
    ddp: nn.Module | None = None   # the DDP wrapper under torchrun (for no_sync)

    @property
    def synced_buffers(self) -> list[torch.Tensor]:
        """The quantized layers' state buffers that rank 0 broadcasts under FSDP2 before the first forward of
        each step — where DDP broadcasts every buffer (before each forward that follows a synchronizing one);
        none otherwise."""
        if not (self.cfg.fsdp and self.world.size > 1):
            return []
        return [b for _, m in qtrain.nn.quant_layers(self.model) for b in m.buffers(recurse=False)]

    @property
    def cuda_graphs(self) -> bool:
        """Whether ``step_model`` runs as CUDA graphs (``--compile-mode reduce-overhead``)."""
        return self.cfg.compile_mode == "reduce-overhead"          # (TrainConfig sets compile with it)

    def reuse_weights(self):
        """``qtrain.reuse_quantized_weights`` — except under FSDP2, where the reused INT8 weights would be
        unsharded copies of every layer held at once."""
        return contextlib.nullcontext() if self.cfg.fsdp else qtrain.reuse_quantized_weights(self.model)


# -------------------------------------------------------------------------------------------------- setup
def resume_config(cfg: TrainConfig, explicit: set[str]) -> tuple[TrainConfig, Path | None, dict | None]:
    """With ``--resume``, the checkpoint's settings, overridden only by run-control flags; a different value for
    a setting that defines the run (``IDENTITY``) given explicitly is a :class:`UserError`."""
    if not cfg.resume:
        return cfg, None, None
    ckpt = checkpoint.find(cfg.resume)
    saved = checkpoint.read_config(ckpt)
    try:
        old = TrainConfig(**saved["train"])
    except (KeyError, TypeError):
        raise UserError(f"checkpoint {ckpt} is corrupt or not a qtrain checkpoint: config.json has no valid "
                        f"'train' settings") from None
    for name in IDENTITY:
        if name in explicit and getattr(cfg, name) != getattr(old, name):
            raise UserError(f"checkpoint {ckpt} was trained with --{name.replace('_', '-')} {getattr(old, name)}, "
                            f"not {getattr(cfg, name)}: omit the flag to resume (it is read from the checkpoint)")
    keep = {f: getattr(cfg, f) for f in ("steps", "eval_every", "eval_batches", "save_every", "keep_checkpoints",
                                         "sample_tokens", "device", "compile", "compile_mode", "fsdp",
                                         "progress")
            if f in explicit or f == "progress"}
    out = cfg.out if "out" in explicit else str(ckpt.parent)
    return old.replace(resume=str(ckpt), out=out, **keep), ckpt, saved


def setup(cfg: TrainConfig, explicit: set[str] = frozenset()) -> Run:
    """Validate the settings, then build the data, model, recipe and optimizer (and load ``--resume``)."""
    cfg, ckpt, saved = resume_config(cfg, explicit)
    check_settings(cfg)
    if cfg.precision not in PRECISIONS:
        raise UserError(f"unknown precision {cfg.precision!r}; accepted: {', '.join(PRECISIONS)}")
    if cfg.optimizer not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {cfg.optimizer!r}; valid optimizers: {', '.join(OPTIMIZERS)}")
    world, device = distributed.init(resolve_device(cfg.device))
    check_compile_mode(cfg, device, world)
    if saved is not None and saved.get("world_size", 1) != world.size:
        raise UserError(f"checkpoint {ckpt} was trained on {saved.get('world_size', 1)} processes, not "
                        f"{world.size}: resume with as many (the global batch and data order depend on it)")
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    recipe = recipes.Recipe.from_dict(saved["recipe"]) if saved is not None else resolve_recipe(cfg.recipe)
    if cfg.out:                  # on every process, before the broadcast (no process has created anything yet)
        check_out(Path(cfg.out), ckpt.parent if ckpt is not None else None)
    out = Path(distributed.broadcast(cfg.out or str(unique_path(Path("runs") / (
        f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.model}-{recipe.name}"))), world))
    tokenizer = qdata.get_tokenizer(cfg.tokenizer)
    if saved is not None:
        try:
            model_config = models.ModelConfig.from_dict(saved["model_config"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"checkpoint {ckpt} is corrupt: config.json has no valid 'model_config'") from None
    else:
        model_config = models.preset_config(cfg.model, vocab_size=tokenizer.vocab_size)
    if cfg.seq_len > model_config.max_seq_len:
        raise UserError(f"--seq-len {cfg.seq_len} is longer than {cfg.model} supports "
                        f"(at most {model_config.max_seq_len} tokens)")
    tokens = qdata.load_tokens(cfg.data, tokenizer)
    batches = qdata.Batches(tokens.train, cfg.batch_size, cfg.seq_len, cfg.seed, world.rank, world.size)
    qdata.eval_batches(tokens.val, 1, 1, cfg.seq_len)   # raises now if the validation split is too short

    torch.manual_seed(cfg.seed)
    seed_rounding(cfg.seed, world, device)
    try:
        model = models.build_from_config(model_config).to(device)
    except (TypeError, ValueError) as e:
        where = f"checkpoint {ckpt}" if ckpt is not None else f"--model {cfg.model}"
        raise UserError(f"{where}: cannot build the model ({e})") from None
    if recipe.quantized:
        try:
            qtrain.convert(model, recipe, filter_fn=quantize_all_but_head)
        except (TypeError, ValueError, NotImplementedError) as e:
            raise UserError(f"--recipe {recipe.name}: {e}") from None
    peak_lr = cfg.lr if cfg.lr is not None else model_config.lr
    warmup = cfg.warmup if cfg.warmup is not None else max(1, cfg.steps // 10)
    optimizer = make_optimizer(cfg.optimizer, model, peak_lr, cfg.weight_decay)

    start_step = 0
    if ckpt is not None:
        state = checkpoint.load(ckpt, model)
        try:
            optimizer.load_state_dict(state["optimizer"])
            batches.load_state_dict(state["data"])
            set_rng_state(state.get("rng_ranks", [state["rng"]] * world.size)[world.rank], device)
            start_step = int(state["step"])
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise UserError(f"checkpoint {ckpt} is corrupt or from another setup: state.pt does not fit "
                            f"({type(e).__name__}: {e})") from None
        if start_step >= cfg.steps:
            raise _NothingToTrain(f"{ckpt} is already at step {start_step} (≥ --steps {cfg.steps}): nothing to "
                                  f"train; pass a larger --steps to train further", ckpt, start_step, world)

    if world.size > 1:
        calibrate_replicas(model, batches, device, precision)
    cfg = cfg.replace(out=str(out))
    if cfg.fsdp:
        ddp, optimizer = shard(cfg, world, device, model, optimizer, peak_lr)
    else:
        ddp = distributed.wrap(model, world, device)
    step_model = torch.compile(ddp, mode=cfg.compile_mode) if cfg.compile else ddp
    make_out(out)                 # last: an error above leaves no run folder behind
    record = {"train": cfg.to_dict(), "model_config": model_config.to_dict(), "recipe": recipe.to_dict(),
              "data": tokens.meta, "parameters": model.num_params(), "device": str(device),
              "precision": precision, "peak_lr": peak_lr, "warmup": warmup, "world_size": world.size,
              "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                           "qtrain": qtrain.__version__, "platform": platform.platform()}}
    return Run(cfg, out, device, precision, model, step_model, model_config, recipe, tokenizer, tokens, batches,
               optimizer, peak_lr, warmup, start_step, record, world, ddp if ddp is not model else None)


def calibrate_replicas(model: nn.Module, batches: qdata.Batches, device: torch.device, precision: str) -> None:
    """Under several processes, before DDP or FSDP2 wraps ``model``: the layers that calibrate on their first
    input (INT4) calibrate on every process alike, on process 0's share of the first batch
    (:func:`qtrain.calibrate`; a forward over the whole global batch would need its memory on every process).
    A single process calibrates inside its first training forward, on its whole first batch."""
    if any(m.needs_calibration for _, m in qtrain.nn.quant_layers(model)):
        x, _ = batches.peek(rank=0)
        with autocast(device, precision):
            qtrain.calibrate(model, x.to(device))


def shard(cfg: TrainConfig, world: distributed.World, device: torch.device, model: nn.Module,
          optimizer: torch.optim.Optimizer, peak_lr: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """FSDP2 ``model`` in place; return it and a new optimizer over its shards holding ``optimizer``'s state
    (the optimizer built, and perhaps loaded from a checkpoint, before sharding)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    full = StateDictOptions(full_state_dict=True)
    state = get_optimizer_state_dict(model, optimizer, options=full) if optimizer.state else None
    model = distributed.wrap(model, world, device, fsdp=True)
    sharded = make_optimizer(cfg.optimizer, model, peak_lr, cfg.weight_decay)
    if state is not None:
        set_optimizer_state_dict(model, sharded, state, options=full)
    return model, sharded


def full_copy(run: Run) -> tuple[nn.Module, torch.optim.Optimizer] | None:
    """Under FSDP2: a plain CPU model and optimizer holding the full state (on rank 0; None elsewhere), which
    checkpoints are written from, so that they do not depend on how the run was parallelized."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(run.model, run.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not run.world.main:
        return None
    with torch.random.fork_rng(devices=[]):          # its throw-away initialization must not move the RNG
        twin = models.build_from_config(run.model_config)
    if run.recipe.quantized:                          # the same keys as the run's model (per-layer state too)
        qtrain.convert(twin, run.recipe, filter_fn=quantize_all_but_head)
    twin_opt = make_optimizer(run.cfg.optimizer, twin, run.peak_lr, run.cfg.weight_decay)
    set_state_dict(twin, twin_opt, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=StateDictOptions(full_state_dict=True))
    return twin, twin_opt


# ------------------------------------------------------------------------------------------ the main loop
@torch.no_grad()
def evaluate(run: Run) -> float:
    """Mean loss over the fixed validation batches (each process evaluates its slice; the result is global)."""
    run.step_model.eval()
    total, count = 0.0, 0
    model = run.step_model if run.world.size == 1 else run.model     # evaluation needs no DDP bookkeeping
    with run.reuse_weights():
        for x, y in qdata.eval_batches(run.tokens.val, run.cfg.eval_batches, run.cfg.batch_size, run.cfg.seq_len,
                                       run.world.rank, run.world.size):
            if run.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()     # the last call's graph outputs are dead
            with autocast(run.device, run.precision):
                _, loss = model(x.to(run.device), y.to(run.device))
            total, count = total + loss.item(), count + 1
    run.step_model.train()
    total, count = distributed.all_sum([total, float(count)], run.world, run.device)
    return total / count


def weights_finite(run: Run) -> bool:
    """Whether every weight of the model is finite, on every process (each checks its own shards)."""
    checks = [torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()     # DTensor shards under FSDP2
              for p in run.model.parameters() if p.numel()]
    finite = bool(torch.stack(checks).all()) if checks else True
    return distributed.all_sum([float(not finite)], run.world, run.device)[0] == 0


def save_checkpoint(run: Run, step: int) -> Path | None:
    """Rank 0 writes the checkpoint (call it on every process: under FSDP2 gathering the state is collective)."""
    model, optimizer = run.model, run.optimizer
    if run.cfg.fsdp:
        model, optimizer = full_copy(run) or (None, None)
    rngs = distributed.gather(rng_state(run.device), run.world)      # each process resumes its own RNG
    if not run.world.main:
        return None
    state = {"step": step, "optimizer": optimizer.state_dict(), "data": run.batches.state_dict(),
             "rng": rngs[0], "rng_ranks": rngs,
             "schedule": {"peak_lr": run.peak_lr, "warmup": run.warmup, "steps": run.cfg.steps}}
    return checkpoint.save(run.out, step, model, state, run.record, run.cfg.keep_checkpoints)


def start_log(run: Run) -> Path:
    """Write the run's ``config.json``; start ``log.jsonl`` afresh, or when resuming keep its lines up to the
    checkpoint's step (a run stopped after its last checkpoint logged steps that will be trained again)."""
    checkpoint.clean(run.out)    # what a kill during a checkpoint write or deletion left
    log_path = run.out / "log.jsonl"
    keep = []
    if run.start_step and log_path.exists():
        for number, line in enumerate(log_path.read_text(errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                warn(f"{log_path} line {number} is incomplete or corrupt (the run was killed while writing it?): "
                     f"dropped")
                continue
            if step <= run.start_step:
                keep.append(line)
    (run.out / "config.json").write_text(json.dumps(run.record, indent=1))
    log_path.write_text("".join(line + "\n" for line in keep))
    return log_path


def warn(text: str) -> None:
    """One warning line on stderr (kept apart from the progress bar)."""
    tqdm.write(f"qtrain train: warning: {text}", file=sys.stderr)


def describe(run: Run) -> str:
    """One line saying what is trained, how, on what, and where it goes."""
    n_quant = len(qtrain.nn.quantized_linear_names(run.model))
    layers = f"{n_quant} linear layers quantized, lm_head kept" if n_quant else "no layer quantized"
    data, cfg = run.tokens.meta, run.cfg
    return (f"{cfg.model} ({run.record['parameters'] / 1e6:.1f}M parameters), recipe {run.recipe.name} ({layers}), "
            f"{run.device} {run.precision}; data {cfg.data} ({data['train_tokens'] / 1e6:.1f}M train / "
            f"{data['val_tokens'] / 1e6:.2f}M val {cfg.tokenizer} tokens); run folder {run.out}"
            + (f"; {run.world.size} processes, {'FSDP2' if cfg.fsdp else 'DDP'}" if run.world.size > 1 else "")
            + (f"; resuming after step {run.start_step}" if run.start_step else ""))


def train(cfg: TrainConfig, explicit: set[str] = frozenset()) -> dict:
    """Train as ``cfg`` says; write the run folder; return the summary (also written to ``summary.json``).

    ``explicit``: the settings the user gave (matters only with ``--resume``, see :func:`resume_config`).
    Resuming a checkpoint already at ``cfg.steps`` (or past it) trains and writes nothing and returns
    ``{"nothing_to_train": <one line saying so>, "out": <run folder>, "steps": <the checkpoint's step>}``.
    A non-finite loss or non-finite weights at a checkpoint stop the run with :class:`TrainingStopped`, naming
    the step and the last good checkpoint (a checkpoint never holds non-finite weights). Bad settings, an
    unusable ``--out`` and errors building the model raise :class:`UserError` before the run folder is made.
    """
    try:
        run = setup(cfg, explicit)
    except _NothingToTrain as done:
        return {"nothing_to_train": str(done), "out": str(done.ckpt.parent), "steps": done.step,
                **({"rank": done.world.rank} if not done.world.main else {})}
    cfg, model, opt, device, world = run.cfg, run.step_model, run.optimizer, run.device, run.world
    last_good = Path(cfg.resume) if cfg.resume else None     # the last checkpoint with finite weights
    log_path = start_log(run) if world.main else os.devnull     # rank 0 writes the run folder
    if device.type == "cuda":   # free what an earlier run in this process left, then measure this one alone
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    say = tqdm.write if world.main else (lambda text: None)
    say(describe(run))

    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * world.size
    if run.cuda_graphs:          # gradients that exist before the first backward, zeroed (not freed) after steps
        prepare_grads(run.model)
    rates, val_loss = [], None
    synced = run.synced_buffers
    bar = tqdm(range(run.start_step, cfg.steps), initial=run.start_step, total=cfg.steps,
               disable=not (cfg.progress and world.main), desc=f"{cfg.model} {run.recipe.name}", unit="step",
               dynamic_ncols=True)
    with open(log_path, "a") as log:
        for step in bar:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg, run.peak_lr, run.warmup)
            for group in opt.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            with run.reuse_weights():     # one INT8 weight per step, not per micro-step
                for micro in range(cfg.grad_accum):
                    x, y = run.batches.next()
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    last = micro == cfg.grad_accum - 1
                    if run.cuda_graphs:       # a new graph step: the last micro-step's graph outputs are dead
                        torch.compiler.cudagraph_mark_step_begin()
                    if micro == 0:            # where DDP broadcasts them: the forward after a synchronizing one
                        distributed.broadcast_buffers(synced, world)
                    with run.ddp.no_sync() if run.ddp is not None and not last else contextlib.nullcontext():
                        with autocast(device, run.precision):        # DDP all-reduces the gradients once,
                            _, loss = model(x, y)                     # in the last micro-step's backward
                        loss_sum += loss.detach()     # before backward: under CUDA graphs `loss` is graph memory
                        (loss / cfg.grad_accum).backward()
            if cfg.optimizer == "adamw" and cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=not run.cuda_graphs)     # see prepare_grads
            loss_value = distributed.all_sum([loss_sum.item()], world, device)[0] / (cfg.grad_accum * world.size)
            rate = tokens_per_step / (time.perf_counter() - t0)
            rates.append(rate)

            done = step + 1
            if not math.isfinite(loss_value):
                bar.close()
                raise stopped(f"loss is {loss_value} at step {done}", last_good)
            entry = {"step": done, "loss": loss_value, "lr": lr, "tokens_per_s": round(rate, 1)}
            if done % cfg.eval_every == 0 or done == cfg.steps:
                fallback = fallback_shares(run.model)                      # of this training step, before eval
                if fallback:
                    entry["fallback_pct"] = fallback
                int4 = int4_weight_summary(run.model)
                if int4:
                    entry["int4_w"] = int4
                val_loss = entry["val_loss"] = evaluate(run)
                say(f"step {done}: loss {entry['loss']:.4f}, val loss {val_loss:.4f}, lr {lr:.2e}, "
                    f"{rate:,.0f} tokens/s" + (", fallback % " + " ".join(f"{g} {v:.1f}" for g, v in
                                                                          fallback.items()) if fallback else "")
                    + (f", INT4 W step/RMS {int4['step_rms_min']:.3f}–{int4['step_rms_max']:.3f}, clipped mean "
                       f"{int4['clipped_pct_mean']:.1f} % max {int4['clipped_pct_max']:.1f} %" if int4 else ""))
            log.write(json.dumps(entry) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{entry['loss']:.3f}", tok_s=f"{rate:,.0f}",
                            **({"val": f"{val_loss:.3f}"} if val_loss is not None else {}))
            if done % cfg.save_every == 0 or done == cfg.steps:
                if not weights_finite(run):
                    bar.close()
                    raise stopped(f"weights are not finite after step {done} (not saved)", last_good)
                save_checkpoint(run, done)
                last_good = run.out / checkpoint.step_dir_name(done)
    bar.close()
    return finish(run, rates, val_loss)


def fallback_shares(model) -> dict[str, float]:
    """Mean share (%) of tiles that fell back in the last step, per GEMM over the fallback layers ({} if none)."""
    per_layer = qtrain.fallback_stats(model)
    out = {}
    for gemm in ("fprop", "dgrad", "wgrad"):
        vals = [v[gemm] for v in per_layer.values() if gemm in v and math.isfinite(v[gemm])]
        if vals:
            out[gemm] = round(100 * sum(vals) / len(vals), 2)
    return out


def int4_weight_summary(model) -> dict[str, float]:
    """Over the INT4 layers, their weight steps over the transformed weights' RMS (min, max) and the share (%) of
    weight clipped beyond ±7 steps (mean, max) — how far the steps have drifted from the weights ({} if none)."""
    stats = [s for _, m in qtrain.nn.quant_layers(model) for s in [m.int4_weight_stats()] if s is not None]
    if not stats:
        return {}
    ratios, clipped = [s["w_step_rms"] for s in stats], [s["w_clipped_pct"] for s in stats]
    return {"step_rms_min": round(min(ratios), 4), "step_rms_max": round(max(ratios), 4),
            "clipped_pct_mean": round(sum(clipped) / len(clipped), 2), "clipped_pct_max": round(max(clipped), 2)}


def stopped(what: str, last_good: Path | None) -> TrainingStopped:
    """The error that ends a run whose loss or weights became non-finite."""
    kept = f"last good checkpoint: {last_good}" if last_good is not None else "no checkpoint was written"
    return TrainingStopped(f"{what}; stopped; {kept} (a lower --lr or another recipe may train stably)")


def finish(run: Run, rates: list[float], val_loss: float | None) -> dict:
    """Write the loss plot, a text sample and ``summary.json``; return the summary. Under torchrun rank 0
    writes and the others return only where the run went (under FSDP2 they still join the sample's and the
    report's forwards, whose all-gathers need every process)."""
    everyone = run.cfg.fsdp
    if not (run.world.main or everyone):
        return {"recipe": run.recipe.name, "out": str(run.out), "rank": run.world.rank}
    text = sample(run, run.cfg.sample_tokens) if run.cfg.sample_tokens > 0 else None
    report = quantization_report(run) if run.recipe.quantized else None
    if not run.world.main:
        return {"recipe": run.recipe.name, "out": str(run.out), "rank": run.world.rank}
    records = read_log(run.out / "log.jsonl")
    plot_runs({run.recipe.name: records}, run.out / "loss.png",
              f"{run.cfg.model} · {run.recipe.name} · {run.cfg.data}/{run.cfg.tokenizer}")
    if text is not None:
        (run.out / "sample.txt").write_text(text)
    if report is not None:
        (run.out / "quant_report.txt").write_text(report + "\n")
        tqdm.write(report)
    steady = sorted(rates[min(3, len(rates) - 1):]) if rates else []   # skip warm-up steps
    evals = [r["val_loss"] for r in records if "val_loss" in r]
    summary = {
        "model": run.cfg.model, "recipe": run.recipe.name, "steps": run.cfg.steps,
        "final_loss": records[-1]["loss"] if records else None,
        "final_val_loss": val_loss if val_loss is not None else (evals[-1] if evals else None),
        "tokens_per_s": steady[len(steady) // 2] if steady else None,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(run.device) if run.device.type == "cuda" else None,
        "parameters": run.record["parameters"], "device": str(run.device), "precision": run.precision,
        "out": str(run.out),
    }
    (run.out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


@torch.no_grad()
def quantization_report(run: Run) -> str:
    """Per-layer quantization error (``qtrain.report``) of the trained model on one validation batch."""
    x, y = next(iter(qdata.eval_batches(run.tokens.val, 1, run.cfg.batch_size, run.cfg.seq_len)))
    run.model.eval()
    with qtrain.track_errors(run.model), autocast(run.device, run.precision):
        run.model(x.to(run.device), y.to(run.device))
    run.model.train()
    return "quantization error on one validation batch:\n" + qtrain.report(run.model)


@torch.no_grad()
def sample(run: Run, n_tokens: int) -> str:
    """``n_tokens`` sampled (temperature 0.8, top-k 40, fixed seed) after a prompt: the first 64 tokens of the
    validation document nearest the middle of the split."""
    val = run.tokens.val
    docs = (val == run.tokenizer.eot).nonzero()[0]
    start = int(docs[len(docs) // 2]) + 1 if docs.size else 0
    prompt = torch.from_numpy(val[start:start + 64].astype("int64"))[None].to(run.device)
    run.model.eval()
    with autocast(run.device, run.precision), run.reuse_weights():
        out = run.model.generate(prompt, n_tokens, generator=torch.Generator().manual_seed(run.cfg.seed))
    run.model.train()
    text_prompt = run.tokenizer.decode(prompt[0].tolist())
    text_new = run.tokenizer.decode(out[0, prompt.shape[1]:].tolist())
    return f"--- prompt (validation text) ---\n{text_prompt}\n--- sampled ---\n{text_new}\n"

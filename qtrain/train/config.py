"""The settings of a training run: one dataclass, filled from the command line, recorded with every checkpoint."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

# Settings that define what is trained. Resuming keeps the checkpoint's values; giving a different one is an
# error. The others (steps, evaluation, saving, device, compile, compile_mode, progress) may change when
# resuming.
IDENTITY = ("model", "recipe", "data", "tokenizer", "batch_size", "grad_accum", "seq_len", "optimizer", "lr",
            "warmup", "weight_decay", "grad_clip", "precision", "seed")


@dataclass
class TrainConfig:
    """A training run (the fields are the ``qtrain train`` flags). ``None`` for ``lr``, ``warmup`` and ``out``
    means: the model preset's learning rate, 10 % of ``steps``, and ``runs/<date-time>-<model>-<recipe>``.

    The defaults train ``llama-tiny`` (3.1M parameters) on the standard library's sources with byte tokens and
    the SwitchBack recipe: 400 steps × 8 × 128 tokens, about 1.5–3 minutes on a 2-core CPU.
    """

    model: str = "llama-tiny"
    recipe: str = "switchback"
    data: str = "stdlib"
    tokenizer: str = "bytes"
    steps: int = 400
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 128
    optimizer: str = "stableadamw"
    lr: float | None = None          # None: the model preset's suggested learning rate
    warmup: int | None = None        # None: 10 % of steps
    weight_decay: float = 0.1
    grad_clip: float = 1.0           # AdamW only; StableAdamW clips its updates itself
    precision: str = "auto"
    compile: bool = False
    compile_mode: str = "default"    # torch.compile's mode: default or reduce-overhead (CUDA graphs); not
                                     # default implies compile
    fsdp: bool = False               # under torchrun: FSDP2 instead of DDP
    device: str = "auto"
    seed: int = 0
    eval_every: int = 50
    eval_batches: int = 10
    save_every: int = 200
    keep_checkpoints: int = 3
    sample_tokens: int = 300
    out: str | None = None           # None: runs/<date-time>-<model>-<recipe>
    resume: str | None = None
    progress: bool = True

    def __post_init__(self):
        if self.compile_mode != "default":      # reduce-overhead implies compile (the CLI: any --compile-mode)
            self.compile = True

    @classmethod
    def from_namespace(cls, ns) -> "TrainConfig":
        """Fields from an argparse namespace, skipping those it does not have or left ``None``."""
        given = {f.name: getattr(ns, f.name) for f in fields(cls) if getattr(ns, f.name, None) is not None}
        return cls(**given)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

"""Model configuration shared by the reference models, and the named presets."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

FAMILIES = ("gpt2", "llama")


@dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes a reference model's architecture and parameter shapes.

    ``family`` is ``"gpt2"`` (LayerNorm, GELU MLP, learned positions, biases, tied embeddings) or ``"llama"``
    (RMSNorm, SwiGLU MLP, rotary positions, no biases, untied output head, optional grouped-query attention
    with ``n_kv_head < n_head``). ``max_seq_len`` is the longest sequence the model accepts. ``ffn_hidden`` is
    the MLP's inner width (GPT-2 uses ``4 · d_model``). ``lr`` is the preset's suggested peak learning rate;
    it does not affect the architecture.
    """

    family: str
    d_model: int
    n_layer: int
    n_head: int
    ffn_hidden: int
    vocab_size: int = 256
    max_seq_len: int = 1024
    n_kv_head: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    lr: float = 1e-3

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family {self.family!r} is not one of {FAMILIES}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_head {self.n_head}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head {self.n_head} is not divisible by n_kv_head {self.kv_heads}")
        if self.family == "gpt2" and self.kv_heads != self.n_head:
            raise ValueError("GPT-2 has no grouped-query attention: leave n_kv_head unset")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "ModelConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ``TypeError``."""
        names = {f.name for f in fields(ModelConfig)}
        unknown = set(d) - names
        if unknown:
            raise TypeError(f"unknown model config keys: {sorted(unknown)}")
        return ModelConfig(**d)


# Sizes follow GPT-2 small and the LLaMA ladder used in the GaLore/ReLoRA papers (60M/130M/350M), with MLP
# widths rounded to multiples of 128 for the GEMM kernels; llama-1b follows Llama-3.2-1B (GQA, 8 KV heads).
# Parameter counts in the names are at their usual vocabularies; with the byte tokenizer they are smaller.
PRESETS: dict[str, ModelConfig] = {
    "gpt2-tiny": ModelConfig("gpt2", d_model=256, n_layer=4, n_head=4, ffn_hidden=1024, max_seq_len=512, lr=2e-3),
    "gpt2-small": ModelConfig("gpt2", d_model=768, n_layer=12, n_head=12, ffn_hidden=3072, vocab_size=50257,
                              max_seq_len=1024, lr=6e-4),
    "llama-tiny": ModelConfig("llama", d_model=256, n_layer=4, n_head=4, ffn_hidden=640, max_seq_len=512,
                              lr=2e-3),
    "llama-60m": ModelConfig("llama", d_model=512, n_layer=8, n_head=8, ffn_hidden=1408, vocab_size=32000,
                             max_seq_len=2048, lr=1e-3),
    "llama-125m": ModelConfig("llama", d_model=768, n_layer=12, n_head=12, ffn_hidden=2048, vocab_size=32000,
                              max_seq_len=2048, lr=6e-4),
    "llama-350m": ModelConfig("llama", d_model=1024, n_layer=24, n_head=16, ffn_hidden=2816, vocab_size=32000,
                              max_seq_len=2048, lr=4e-4),
    "llama-1b": ModelConfig("llama", d_model=2048, n_layer=16, n_head=32, n_kv_head=8, ffn_hidden=8192,
                            vocab_size=32000, max_seq_len=2048, lr=3e-4),
}

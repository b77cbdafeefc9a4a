"""What the reference language models share: the loss, weight initialization and sampling."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from qtrain.models.config import ModelConfig


class CausalLM(nn.Module):
    """A decoder-only language model. Subclasses build ``self.lm_head`` and implement :meth:`hidden_states`.

    ``forward(idx [B, T] int64, targets [B, T] int64 | None) -> (logits [B, T, V], loss | None)``; the loss is
    the mean next-token cross-entropy, computed in fp32 whatever the autocast dtype.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def blocks(self) -> nn.ModuleList:
        """The transformer blocks (the units FSDP2 shards one by one)."""
        raise NotImplementedError

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        if idx.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence of {idx.shape[1]} tokens is longer than max_seq_len "
                             f"{self.config.max_seq_len}")
        logits = self.lm_head(self.hidden_states(idx))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return logits, loss

    def init_weights(self, residual_projections: tuple[str, ...]) -> None:
        """GPT-2 initialization: N(0, 0.02) for linear and embedding weights, zero biases, norms at 1, and the
        projections that write into the residual stream (names ending in ``residual_projections``) scaled by
        ``1/sqrt(2 · n_layer)``."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith(tuple(f"{r}.weight" for r in residual_projections)):
                nn.init.normal_(p, std=std)

    def num_params(self) -> int:
        """Number of distinct parameters (a tied weight counts once)."""
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.8, top_k: int | None = 40,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx [B, T]`` (context cropped to ``max_seq_len``)."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.max_seq_len:])
            logits = logits[:, -1, :].float() / max(temperature, 1e-5)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(idx.device)
            idx = torch.cat([idx, nxt], dim=1)
        return idx

"""A byte-level decoder-only transformer with PEER layers in place of some FFNs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streams import ByteTokenizer

from .branches import Branch, branch_state, mixture_log_probs
from .config import ModelConfig
from .errors import ConfigError
from .peer import PEERLayer

__all__ = ["PEERLM", "ParamGroups", "resolve_device", "sample_text"]


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a torch device; None picks CUDA when there is one, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class CausalSelfAttention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.n_heads = c.n_heads
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model, bias=False)
        self.proj = nn.Linear(c.d_model, c.d_model, bias=False)
        self.dropout = c.dropout

    def forward(self, x: Tensor) -> Tensor:
        B, L, d = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)  # (B, H, L, dh) each
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, L, d))  # (B, L, d)


class DenseFFN(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, c: ModelConfig, peer: bool):
        super().__init__()
        self.norm1 = nn.RMSNorm(c.d_model)
        self.attn = CausalSelfAttention(c)
        self.norm2 = nn.RMSNorm(c.d_model)
        self.ffn: nn.Module = PEERLayer(c.peer) if peer else DenseFFN(c.d_model, c.ffn_mult * c.d_model)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class ParamGroups(dict):
    """Parameter groups by role: ``expert`` (buffers, row-wise optimizer), ``key``, ``query``, ``dense``."""


class PEERLM(nn.Module):
    """Decoder-only LM: token embedding, blocks (attention + PEER or dense FFN), tied output."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.pos = nn.Embedding(c.block_size, c.d_model)
        self.blocks = nn.ModuleList(Block(c, i in (c.peer_layers or [])) for i in range(c.n_layers))
        self.norm = nn.RMSNorm(c.d_model)
        self.branches: list[Branch] = []  # earlier cycles' frozen dense weights (policy branch, lifelong.branches)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.01)

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .double(): the frozen branches move along
        super()._apply(fn, recurse)
        for b in self.branches:
            b.tensors = {k: fn(v) for k, v in b.tensors.items()}
        return self

    # --------------------------------------------------------------------------- parts
    def peer_layers(self) -> dict[str, PEERLayer]:
        """PEER layers by module name, e.g. ``{"blocks.2.ffn": layer}``."""
        return {name: m for name, m in self.named_modules() if isinstance(m, PEERLayer)}

    def param_groups(self) -> ParamGroups:
        """Trainable parameters by role. Expert tables are buffers updated by RowAdam."""
        groups = ParamGroups(expert=[], key=[], query=[], dense=[])
        peer_params: set[int] = set()
        for layer in self.peer_layers().values():
            groups["expert"].append(layer)
            for p in (layer.row_keys, layer.col_keys):
                if p.requires_grad and p.numel():
                    groups["key"].append(p)
                peer_params.add(id(p))
            for p in list(layer.query.parameters()) + list(layer.query_norm.parameters()):
                if p.requires_grad:
                    groups["query"].append(p)
                peer_params.add(id(p))
        for p in self.parameters():
            if id(p) not in peer_params and p.requires_grad:
                groups["dense"].append(p)
        return groups

    def dense_state_dict(self) -> dict[str, Tensor]:
        """Everything except the expert tables and row keys (those live in shards); the PEER
        layers' query anchors and the frozen branches included."""
        skip = ("expert_u", "expert_v", "row_keys", "frozen_row_keys")
        return {**{k: v for k, v in self.state_dict().items() if not k.endswith(skip)}, **branch_state(self.branches)}

    # ------------------------------------------------------------------------- forward
    def forward(self, idx: Tensor, targets: Tensor | None = None, *, mixture: bool | None = None) -> tuple[Tensor, Tensor | None]:
        """idx: (B, L) token ids -> logits (B, L, V), mean cross-entropy if targets given.

        With frozen branches, evaluation (``mixture`` None and eval mode, or True) predicts
        with their posterior mixture (the logits are then log-probabilities); training fits
        the live weights alone."""
        B, L = idx.shape
        if L > self.config.block_size:
            raise ConfigError(f"sequence length {L} exceeds the model's block_size={self.config.block_size}")
        if mixture is None:
            mixture = bool(self.branches) and not self.training
        if mixture:
            logits = mixture_log_probs(self, idx)  # (B, L, V)
        else:
            x = self.embed(idx) + self.pos(torch.arange(L, device=idx.device))  # (B, L, d)
            for block in self.blocks:
                x = block(x)
            logits = self.norm(x) @ self.embed.weight.t()  # (B, L, V), tied weights
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=self.config.pad_id
            )
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = 40,
        generator: torch.Generator | None = None,
        stop_token: int | None = None,
    ) -> Tensor:
        """Sample ``max_new_tokens`` continuations of idx (B, L); temperature 0 is greedy."""
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                logits, _ = self(idx[:, -self.config.block_size :])
                logits = logits[:, -1, :]  # (B, V)
                if temperature <= 0:
                    nxt = logits.argmax(-1, keepdim=True)
                else:
                    logits = logits / temperature
                    if top_k is not None and top_k < logits.shape[-1]:
                        kth = logits.topk(top_k, dim=-1).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)  # (B, 1)
                idx = torch.cat([idx, nxt], dim=1)
                if stop_token is not None and bool((nxt == stop_token).all()):
                    break
        finally:
            self.train(was_training)
        return idx


def sample_text(model: PEERLM, prompt: str | Sequence[int], tokens: int, *, temperature: float = 0.8,
                top_k: int | None = 20, seed: int = 0) -> str:
    """Continue ``prompt`` (text or token ids) by ``tokens`` byte tokens; the whole text."""
    tok = ByteTokenizer()
    device = next(model.parameters()).device
    ids = (tok.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]) or [tok.bos_id]  # empty: start at BOS
    out = model.generate(torch.tensor([ids], device=device), tokens, temperature=temperature, top_k=top_k,
                         generator=torch.Generator(device).manual_seed(seed))
    return tok.decode(out[0].cpu().numpy())

"""An independent pure-torch forward of a Llama checkpoint over a (possibly compacted) KV cache with β.

Why: fidelity must be measured by something that does not share code with the engine or with
transformers. This module reads ``config.json`` + ``model.safetensors`` directly and runs the model in
fp32 with one trick the stock stacks lack: cached entries carry an additive logit bias β, and new tokens
take *logical* RoPE positions (``start_position + i``) while attending over however many physical cached
entries there are. With nothing removed it reproduces the full-cache logits (tested to 1e-4).

It must not import vllm or transformers (the tests compare against transformers separately).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["LayerKV", "ReferenceLlama"]


@dataclass
class LayerKV:
    """One layer's cache: keys/values ``(H_kv, L, d)`` post-RoPE and the additive logit bias ``(H_kv, L)``."""

    keys: torch.Tensor
    values: torch.Tensor
    bias: torch.Tensor

    def __len__(self) -> int:
        return int(self.keys.shape[1])

    def clone(self) -> "LayerKV":
        return LayerKV(self.keys.clone(), self.values.clone(), self.bias.clone())


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class ReferenceLlama:
    """Llama forward in plain torch (fp32), with β-biased cached entries and logical positions."""

    def __init__(self, config: dict, weights: dict[str, torch.Tensor]):
        self.config = config
        self.w = weights
        self.num_layers = int(config["num_hidden_layers"])
        self.num_heads = int(config["num_attention_heads"])
        self.num_kv_heads = int(config.get("num_key_value_heads", self.num_heads))
        self.hidden = int(config["hidden_size"])
        self.head_dim = int(config.get("head_dim") or self.hidden // self.num_heads)
        self.eps = float(config.get("rms_norm_eps", 1e-6))
        rope = config.get("rope_parameters") or {}
        self.rope_theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", (config.get("rope_scaling") or {}).get("rope_type", "default"))
        if rope_type not in (None, "default"):
            raise NotImplementedError(f"rope_type {rope_type!r} is not supported by the reference forward")
        self.scale = self.head_dim**-0.5
        self.lm_head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim))
        self.inv_freq = inv.float()

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype = torch.float32) -> "ReferenceLlama":
        from safetensors.torch import load_file

        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        files = sorted(folder.glob("*.safetensors"))  # one file or shards
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {folder}")
        weights = {k: v.to(dtype) for f in files for k, v in load_file(str(f)).items()}
        return cls(config, weights)

    # ------------------------------------------------------------------ pieces
    def rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x (n, H, d)`` by RoPE at ``positions (n,)`` (HF rotate-half convention)."""
        freqs = positions.to(torch.float64)[:, None] * self.inv_freq.to(torch.float64)[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos = emb.cos().to(x.dtype)[:, None, :]
        sin = emb.sin().to(x.dtype)[:, None, :]
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def _layer(self, i: int, h: torch.Tensor, positions: torch.Tensor, past: LayerKV | None):
        p = f"model.layers.{i}."
        w = self.w
        n = h.shape[0]
        x = _rms_norm(h, w[p + "input_layernorm.weight"], self.eps)
        q = (x @ w[p + "self_attn.q_proj.weight"].T).view(n, self.num_heads, self.head_dim)
        k = (x @ w[p + "self_attn.k_proj.weight"].T).view(n, self.num_kv_heads, self.head_dim)
        v = (x @ w[p + "self_attn.v_proj.weight"].T).view(n, self.num_kv_heads, self.head_dim)
        q = self.rope(q, positions)
        k = self.rope(k, positions)
        k_new, v_new = k.transpose(0, 1), v.transpose(0, 1)  # (H_kv, n, d)
        if past is None or len(past) == 0:
            keys, values = k_new, v_new
            bias = torch.zeros(self.num_kv_heads, n, dtype=h.dtype, device=h.device)
            n_past = 0
        else:
            keys = torch.cat([past.keys.to(h.dtype), k_new], dim=1)
            values = torch.cat([past.values.to(h.dtype), v_new], dim=1)
            bias = torch.cat([past.bias.to(h.dtype), torch.zeros(self.num_kv_heads, n, dtype=h.dtype, device=h.device)], 1)
            n_past = len(past)
        L = keys.shape[1]
        g = self.num_heads // self.num_kv_heads
        # Float mask (H_kv, n, L): β on every cached column, causal among the new tokens.
        causal = torch.ones(n, n, dtype=torch.bool, device=h.device).tril()
        visible = torch.cat([torch.ones(n, n_past, dtype=torch.bool, device=h.device), causal], dim=1)
        mask = bias[:, None, :].expand(self.num_kv_heads, n, L).masked_fill(~visible[None], float("-inf"))
        mask = mask.repeat_interleave(g, dim=0)  # (H_q, n, L), KV head j serves query heads j*g..j*g+g-1
        qh = q.transpose(0, 1)  # (H_q, n, d)
        kh = keys.repeat_interleave(g, dim=0)
        vh = values.repeat_interleave(g, dim=0)
        attn = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=self.scale)
        out = attn.transpose(0, 1).reshape(n, self.num_heads * self.head_dim) @ w[p + "self_attn.o_proj.weight"].T
        h = h + out
        x = _rms_norm(h, w[p + "post_attention_layernorm.weight"], self.eps)
        mlp = F.silu(x @ w[p + "mlp.gate_proj.weight"].T) * (x @ w[p + "mlp.up_proj.weight"].T)
        h = h + mlp @ w[p + "mlp.down_proj.weight"].T
        return h, LayerKV(keys, values, bias.float()), q

    def _run(self, token_ids, cache: list[LayerKV] | None, start_position: int, want_queries: bool):
        ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
        h = self.w["model.embed_tokens.weight"][ids]
        positions = torch.arange(start_position, start_position + ids.numel(), device=h.device)
        new_cache, queries = [], []
        for i in range(self.num_layers):
            past = cache[i] if cache is not None else None
            h, kv, q = self._layer(i, h, positions, past)
            new_cache.append(kv)
            if want_queries:
                queries.append(q)
        h = _rms_norm(h, self.w["model.norm.weight"], self.eps)
        return h @ self.lm_head.T, new_cache, queries

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def prefill(self, token_ids):
        """Full forward from position 0. Returns ``(logits (n,V), cache, queries)``.

        ``cache`` is a list per layer of :class:`LayerKV` with β = 0; ``queries`` a list per layer of
        post-RoPE queries ``(n, H_q, d)`` — the context's own reference queries for compaction.
        """
        return self._run(token_ids, None, 0, want_queries=True)

    @torch.no_grad()
    def forward(self, token_ids, cache: list[LayerKV], start_position: int, return_queries: bool = False):
        """Append ``token_ids`` after ``cache`` at logical positions ``start_position..``; returns logits.

        The new tokens attend to every cached entry (+ its β) and causally among themselves. ``cache`` is
        updated in place (new entries get β = 0), so decoding can continue from it.
        """
        logits, new_cache, queries = self._run(token_ids, cache, start_position, want_queries=return_queries)
        cache[:] = new_cache
        return (logits, queries) if return_queries else logits

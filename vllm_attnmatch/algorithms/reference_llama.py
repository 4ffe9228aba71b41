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

__all__ = ["LayerKV", "PrefixBatch", "ReferenceLlama"]


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


def _lin(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T``; with bf16 weights (:meth:`ReferenceLlama.for_decoding`) a bf16 matmul, fp32 activations."""
    return x @ w.T if w.dtype == x.dtype else (x.to(w.dtype) @ w.T).to(x.dtype)


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

    def for_decoding(self, dtype: torch.dtype = torch.float32) -> "ReferenceLlama":
        """The same model with its projection matrices stored column-major (optionally in ``dtype``).

        Why: decoding a few rows at a time is bound by reading the weights; ``x @ W.T`` reads a
        column-major ``W`` in its fast layout (measured ~1.3-1.6x per step on this CPU) and bf16 halves
        the bytes. Same values in fp32, so the same logits up to rounding. Meant for a model kept only for
        :class:`PrefixBatch` (the worker's synthetic queries); the original weights may be dropped.
        """
        weights = {}
        for name, w in self.w.items():
            if w.dim() == 2 and name.endswith("proj.weight"):
                weights[name] = w.to(dtype).t().contiguous().t()
            else:
                weights[name] = w
        weights["lm_head.weight"] = self.lm_head.to(dtype).t().contiguous().t()  # untied copy if tied
        return ReferenceLlama(self.config, weights)

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

    def _layer(self, i: int, h: torch.Tensor, positions: torch.Tensor, past: LayerKV | None, want_lse: bool = False):
        p = f"model.layers.{i}."
        w = self.w
        n = h.shape[0]
        x = _rms_norm(h, w[p + "input_layernorm.weight"], self.eps)
        q = _lin(x, w[p + "self_attn.q_proj.weight"]).view(n, self.num_heads, self.head_dim)
        k = _lin(x, w[p + "self_attn.k_proj.weight"]).view(n, self.num_kv_heads, self.head_dim)
        v = _lin(x, w[p + "self_attn.v_proj.weight"]).view(n, self.num_kv_heads, self.head_dim)
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
        causal = torch.ones(n, n, dtype=torch.bool, device=h.device).tril()
        visible = torch.cat([torch.ones(n, n_past, dtype=torch.bool, device=h.device), causal], dim=1)
        if bool(bias.any()):
            # Float mask (H_q, n, L): β on every cached column, causal among the new tokens; KV head j
            # serves query heads j*g..j*g+g-1.
            mask = bias[:, None, :].expand(self.num_kv_heads, n, L).masked_fill(~visible[None], float("-inf"))
            mask = mask.repeat_interleave(g, dim=0)[None]
        else:
            mask = visible[None, None]  # no β: one boolean mask shared by every head
        lse = None
        if want_lse and h.device.type != "cpu":
            logits = torch.matmul(q.transpose(0, 1).float(), keys.repeat_interleave(g, 0).float().transpose(1, 2))
            logits = logits * self.scale + (mask[0] if mask.dtype != torch.bool else
                                            torch.zeros(mask.shape[-2:], device=h.device).masked_fill(~mask[0, 0], float("-inf")))
            lse = torch.logsumexp(logits, -1)
            attn = torch.matmul(torch.softmax(logits, -1), values.repeat_interleave(g, 0).float()).to(h.dtype)
        elif want_lse:
            # The fused CPU kernel called directly also returns each query's log-sum-exp (what KVzip's score
            # needs); it wants every query head's keys and a float mask.
            if mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, dtype=h.dtype, device=h.device).masked_fill_(~mask, float("-inf"))
            attn, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q.transpose(0, 1)[None], keys.repeat_interleave(g, 0)[None], values.repeat_interleave(g, 0)[None],
                0.0, False, attn_mask=mask, scale=self.scale)
            attn, lse = attn[0], lse[0]
        else:
            # Batched 4-D inputs with grouped heads: torch's fused CPU kernel instead of the math path, which
            # materialised (H_q, n, L) scores (a 2k-token re-read over a 2k cache: 560 -> 115 ms a layer).
            attn = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[None], values[None], attn_mask=mask,
                                                  scale=self.scale, enable_gqa=True)[0]
        out = _lin(attn.transpose(0, 1).reshape(n, self.num_heads * self.head_dim), w[p + "self_attn.o_proj.weight"])
        h = h + out
        x = _rms_norm(h, w[p + "post_attention_layernorm.weight"], self.eps)
        mlp = F.silu(_lin(x, w[p + "mlp.gate_proj.weight"])) * _lin(x, w[p + "mlp.up_proj.weight"])
        h = h + _lin(mlp, w[p + "mlp.down_proj.weight"])
        if want_lse:
            return h, LayerKV(keys, values, bias.float()), q, lse
        return h, LayerKV(keys, values, bias.float()), q

    def layer_by_layer(self, token_ids, past, start_position: int, want_lse: bool = False):
        """The forward of ``token_ids`` after a cache, one layer per ``next()``: yields each layer's
        ``(LayerKV of cache + new tokens, post-RoPE queries (n, H_q, d))``, and with ``want_lse`` each query's
        log-sum-exp of attention logits ``(H_q, n)`` (on the CPU kernel; the same outputs).

        ``past(i)`` returns layer ``i``'s cached :class:`LayerKV` when the pass reaches it (so a caller can
        read it lazily, and spread the pass over engine steps); the cached entries are never modified.
        """
        ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
        h = self.w["model.embed_tokens.weight"][ids]
        positions = torch.arange(start_position, start_position + ids.numel(), device=h.device)
        for i in range(self.num_layers):
            with torch.no_grad():
                out = self._layer(i, h, positions, past(i), want_lse)
            h = out[0]
            yield out[1:]

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
        return _lin(h, self.lm_head), new_cache, queries

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


class PrefixBatch:
    """B token sequences run together after one shared cached prefix (batched self-study, one-pass on-policy).

    Why: generating a few short answers over a long document one token at a time, re-concatenating the
    cache at every step, costs seconds of per-step overhead. Here the prefix's cache is copied once into a
    preallocated buffer per layer, each row owns ``slots`` columns after it, and every layer is one fused
    ``scaled_dot_product_attention`` call over ``[prefix ; every row's slots]`` whose mask shows a row the
    prefix (with its β) and its own filled slots only. Rows are left-padded, so all rows write the same
    slot index at a step and per-row positions stay logical.

    ``step`` may take a ``hook(layer, queries, positions) -> LayerKV | None`` called when the forward reaches
    a layer, with that layer's queries of the valid tokens; a returned cache replaces the layer's prefix
    before its attention runs (the one-pass on-policy fit compacts layer ℓ there).
    """

    def __init__(self, model: ReferenceLlama, prefix: list[LayerKV], batch: int, slots: int,
                 hide: list[int] | None = None):
        """``hide[b]``: row b does not see the prefix's last ``hide[b]`` entries (a row that re-feeds the
        context's last tokens to continue the text must not see them twice)."""
        if len(prefix) != model.num_layers:
            raise ValueError(f"{len(prefix)} cached layers, the model has {model.num_layers}")
        self.model = model
        self.batch, self.slots = batch, slots
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.bias: list[torch.Tensor | None] = []  # None: β = 0 on the whole prefix (no mask copy per head)
        self.prefix_len: list[int] = []
        self.replaced: set[int] = set()
        for kv in prefix:
            self._set_prefix(len(self.keys), kv)
        self.used = 0  # slots filled per row so far (the same for every row: left padding)
        self.hidden = None  # (B, T) bool over the original prefix, or None
        self.hide_len = self.prefix_len[0] if self.prefix_len else 0
        if hide is not None and any(hide):
            cols = torch.arange(self.hide_len)[None, :]
            self.hidden = cols >= self.hide_len - torch.as_tensor(hide)[:, None]
        self.visible = torch.zeros(batch, batch * slots, dtype=torch.bool)  # own slots each row may see

    def _set_prefix(self, layer: int, kv: LayerKV) -> None:
        m = self.model
        T, own = len(kv), self.batch * self.slots
        # Zeros, not empty: masked slots still enter the fused kernel (0 · NaN garbage would be NaN).
        keys = torch.zeros(m.num_kv_heads, T + own, m.head_dim)
        values = torch.zeros_like(keys)
        keys[:, :T] = kv.keys
        values[:, :T] = kv.values
        if layer < len(self.keys):  # replacing a prefix: keep the rows' slots already written
            old_T = self.prefix_len[layer]
            keys[:, T:] = self.keys[layer][:, old_T:]
            values[:, T:] = self.values[layer][:, old_T:]
            self.keys[layer], self.values[layer], self.prefix_len[layer] = keys, values, T
            self.replaced.add(layer)  # a new prefix: ``hide`` (about the original one) no longer applies
            self.bias[layer] = kv.bias.float() if bool(kv.bias.ne(0).any()) else None
        else:
            self.keys.append(keys)
            self.values.append(values)
            self.prefix_len.append(T)
            self.bias.append(kv.bias.float() if bool(kv.bias.ne(0).any()) else None)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None = None,
             hook=None, logits: bool = True, want_queries: bool = True):
        """Append ``tokens (B, n)`` at logical ``positions (B, n)``; ``valid (B, n)`` marks real tokens.

        Returns ``(logits of each row's last token (B, V) or None, queries per layer (B, n, H_q, d))``.
        """
        m, B, S = self.model, self.batch, self.slots
        n = tokens.shape[1]
        if self.used + n > S:
            raise ValueError(f"{self.used} + {n} tokens exceed the {S} slots per row")
        valid = torch.ones(B, n, dtype=torch.bool) if valid is None else valid
        cols = (torch.arange(B)[:, None] * S + self.used + torch.arange(n)[None, :])  # (B, n) own columns
        # What each new token sees of the rows' slots: its row's earlier tokens, and itself (causal).
        causal = torch.ones(n, n, dtype=torch.bool).tril() & (valid[:, None, :] | torch.eye(n, dtype=torch.bool))
        seen = self.visible[:, None, :].expand(B, n, B * S).clone()
        seen.scatter_(2, cols[:, None, :].expand(B, n, n), causal)
        own = torch.zeros(B * n, B * S).masked_fill_(~seen.view(B * n, B * S), float("-inf"))
        self.visible.scatter_(1, cols, valid)
        self.used += n
        flat_cols = cols.reshape(-1)
        flat_pos = positions.reshape(-1)
        keep = valid.reshape(-1)
        H, g, d = m.num_kv_heads, m.num_heads // m.num_kv_heads, m.head_dim
        h = m.w["model.embed_tokens.weight"][tokens.reshape(-1)].float()
        R = B * n
        lin = _lin

        queries, masks = [], {}
        for i in range(m.num_layers):
            p = f"model.layers.{i}."
            w = m.w
            x = _rms_norm(h, w[p + "input_layernorm.weight"], m.eps)
            q = m.rope(lin(x, w[p + "self_attn.q_proj.weight"]).view(R, m.num_heads, d), flat_pos)
            k = m.rope(lin(x, w[p + "self_attn.k_proj.weight"]).view(R, H, d), flat_pos)
            v = lin(x, w[p + "self_attn.v_proj.weight"]).view(R, H, d)
            if want_queries:
                queries.append(q.view(B, n, m.num_heads, d))
            if hook is not None:
                replaced = hook(i, q[keep], flat_pos[keep])
                if replaced is not None:
                    self._set_prefix(i, replaced)
            T = self.prefix_len[i]
            self.keys[i][:, T + flat_cols] = k.transpose(0, 1)
            self.values[i][:, T + flat_cols] = v.transpose(0, 1)
            bias = self.bias[i]
            hidden = self.hidden if self.hidden is not None and i not in self.replaced else None
            if hidden is not None:
                hidden = torch.zeros(B, T).masked_fill_(hidden, float("-inf"))
                hidden = hidden[:, None, :].expand(B, n, T).reshape(R, T)
            if bias is None:
                key = (T, hidden is not None)
                if key not in masks:
                    first = own.new_zeros(R, T) if hidden is None else hidden
                    masks[key] = torch.cat([first, own], 1)[None, None]  # (1, 1, R, L): the same for all heads
                mask = masks[key].expand(H, 1, R, T + B * S)
            else:
                first = bias[:, None, :].expand(H, R, T)
                if hidden is not None:
                    first = first + hidden[None]
                mask = torch.cat([first, own[None].expand(H, R, B * S)], 2)[:, None]
            # GQA folded into the query rows: KV head j's g query heads are g·R rows of batch entry j.
            qh = q.view(R, H, g, d).permute(1, 2, 0, 3).reshape(H, 1, g * R, d)
            mask = mask.expand(H, g, R, T + B * S).reshape(H, 1, g * R, T + B * S)
            attn = F.scaled_dot_product_attention(qh, self.keys[i][:, None], self.values[i][:, None],
                                                  attn_mask=mask, scale=m.scale)
            attn = attn.view(H, g, R, d).permute(2, 0, 1, 3).reshape(R, m.num_heads * d)
            h = h + lin(attn, w[p + "self_attn.o_proj.weight"])
            if i == m.num_layers - 1 and not logits:
                break  # the last MLP only feeds the logits
            x = _rms_norm(h, w[p + "post_attention_layernorm.weight"], m.eps)
            gate = F.silu(lin(x, w[p + "mlp.gate_proj.weight"])) * lin(x, w[p + "mlp.up_proj.weight"])
            h = h + lin(gate, w[p + "mlp.down_proj.weight"])
        if not logits:
            return None, queries
        last = _rms_norm(h.view(B, n, -1)[:, -1], m.w["model.norm.weight"], m.eps)
        return lin(last, m.lm_head), queries

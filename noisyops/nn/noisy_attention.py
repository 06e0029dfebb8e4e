"""`NoisyMultiheadAttention`: ``nn.MultiheadAttention`` with noisy in- and out-projections.

``nn.MultiheadAttention`` does not call its projections as modules: it passes ``in_proj_weight``
and ``out_proj.weight`` to ``F.multi_head_attention_forward`` (or a fused fast path), so swapping
``out_proj`` for a `NoisyLinear` alone would change nothing. This module re-implements the
forward of ``F.multi_head_attention_forward`` (same masks, dropout, ``need_weights``,
``bias_k``/``bias_v``, ``add_zero_attn``, ``batch_first``, unbatched input) with

* the packed in-projection ``in_proj_weight [3E, E]`` as ONE noisy crossbar layer whose state
  (``calls``, ``seed``, ranges, ``layer_key``) lives on this module; for cross-attention the
  packed projection is applied to query, key and value with the same noise instance and the q / k /
  v thirds of the result are kept (3x the in-projection compute, same noise as self-attention);
* ``out_proj``, a `NoisyLinear` child with its own state and the next layer key.

Both projections see batch-first ``[B, L, E]`` inputs, so ``per_sample``/``per_instance`` ids
follow the batch. State-dict keys are those of ``nn.MultiheadAttention`` (plus the noise buffers).
Not supported (left clean by `noisyops.convert`, with a warning): separate ``q/k/v_proj_weight``
(``kdim``/``vdim`` different from ``embed_dim``).
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import LayerConfig
from .base import NoisyModuleMixin
from .noisy_linear import NoisyLinear


class NoisyMultiheadAttention(NoisyModuleMixin, nn.MultiheadAttention):
    """See the module docstring. Build with `from_module`."""

    @classmethod
    def supports(cls, mha: nn.MultiheadAttention) -> bool:
        return bool(mha._qkv_same_embed_dim) and mha.in_proj_weight is not None

    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention, config: LayerConfig, *, seed: int = 0,
                    layer_key: int = 0, out_config: Optional[LayerConfig] = None,
                    out_layer_key: Optional[int] = None) -> "NoisyMultiheadAttention":
        """Wrap ``mha`` (parameters shared). ``out_config`` None = same config for ``out_proj``;
        ``out_layer_key`` None = ``layer_key + 1``. ``out_config`` may be ``False``: ``out_proj``
        stays a plain linear (computed with ``F.linear``)."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha: expected an nn.MultiheadAttention, got {type(mha).__name__}")
        if not cls.supports(mha):
            raise ValueError("mha: separate q/k/v projection weights (kdim/vdim != embed_dim) are "
                             "not supported")
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        for k, v in mha.__dict__.items():
            if k in ("_parameters", "_buffers", "_modules"):
                m.__dict__[k].update(v)
            elif not k.startswith("_forward") and not k.startswith("_backward") and \
                    not k.startswith("_state_dict") and not k.startswith("_load_state_dict"):
                m.__dict__[k] = copy.copy(v) if isinstance(v, (dict, set, list)) else v
        m._init_noisy(config, seed, layer_key)
        dev = mha.in_proj_weight.device
        for name, buf in list(m._buffers.items()):
            if name in ("calls", "seed", "w_range", "in_range", "out_range") and buf.device != dev:
                m._buffers[name] = buf.to(dev)
        m.set_weight_range()
        if out_config is not False:
            oc = config if out_config is None else out_config
            ok = layer_key + 1 if out_layer_key is None else out_layer_key
            m.out_proj = NoisyLinear.from_module(mha.out_proj, oc, seed=seed, layer_key=ok)
        return m

    def _noisy_weight(self) -> Tensor:
        return self.in_proj_weight

    def to_clean(self) -> nn.MultiheadAttention:
        """A plain ``nn.MultiheadAttention`` sharing this module's parameters."""
        c = nn.MultiheadAttention.__new__(nn.MultiheadAttention)
        nn.Module.__init__(c)
        skip = set(c.__dict__) | {"_config", "_seed", "layer_key", "_noise_enabled", "_calibrating",
                                  "per_rank_noise", "_rank", "chip_ids", "_chips", "_observer",
                                  "_w_range", "_in_range", "_out_range", "_params", "_params_error"}
        for k, v in self.__dict__.items():
            if k not in skip:
                c.__dict__[k] = v
        c._parameters.update(self._parameters)
        c._modules.update(self._modules)
        for k, v in self._buffers.items():
            if k not in ("calls", "seed", "w_range", "in_range", "out_range"):
                c._buffers[k] = v
        if isinstance(self.out_proj, NoisyLinear):
            c.out_proj = self.out_proj.to_clean(nn.modules.linear.NonDynamicallyQuantizableLinear)
        c.train(self.training)
        return c

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, in_proj: " + self._noisy_repr()

    # ---- forward ---------------------------------------------------------------------------------
    def _in_proj(self, x: Tensor, p, inst) -> Tensor:
        if self._observer is None:
            from ..functional import linear_with_params
            return linear_with_params(x, self.in_proj_weight, self.in_proj_bias, p, inst)
        from ..functional import linear_with_params
        y = linear_with_params(x, self.in_proj_weight, None, p, inst)
        self._observer(self, x, y)
        return y if self.in_proj_bias is None else y + self.in_proj_bias

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None,
                average_attn_weights: bool = True, is_causal: bool = False):
        num_heads = self.num_heads
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
        bf = self.batch_first and is_batched
        if not is_batched:  # -> [L, 1, E]
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        # batch-first views [B, L, E] for the crossbar layers
        qb, kb, vb = ((t if bf else t.transpose(0, 1)) for t in (query, key, value))
        if bf:
            same_kv = key is value
            same_qk = query is key
        else:
            same_kv = key is value
            same_qk = query is key
        bsz, tgt_len, embed_dim = qb.shape
        src_len = kb.shape[1]
        if embed_dim != self.embed_dim:
            raise ValueError(f"query: expected embedding dim {self.embed_dim}, got {embed_dim}")
        if kb.shape != vb.shape:
            raise ValueError(f"key shape {tuple(key.shape)} does not match value shape {tuple(value.shape)}")
        head_dim = embed_dim // num_heads

        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask),
                                             other_name="attn_mask", target_type=query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None
        else:
            attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None,
                                          other_name="", target_type=query.dtype, check_other=False)
            if key_padding_mask is not None:
                is_causal = False

        # in-projection: one crossbar layer, one noise instance for q, k and v
        p = self._op_params()
        inst = self._next_instance(p, bsz, qb.device)
        E = embed_dim
        if same_qk and same_kv:
            proj = self._in_proj(qb, p, inst)  # [B, L, 3E]
            proj = proj.transpose(0, 1).unflatten(-1, (3, E)).unsqueeze(0).transpose(0, -2) \
                .squeeze(-2).contiguous()  # [3, L, B, E] as F.multi_head_attention_forward
            q, k, v = proj[0], proj[1], proj[2]
        else:
            q = self._in_proj(qb, p, inst)[..., :E].transpose(0, 1).contiguous()
            if same_kv:
                kv = self._in_proj(kb, p, inst)[..., E:].transpose(0, 1)
                kv = kv.unflatten(-1, (2, E)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
                k, v = kv[0], kv[1]
            else:
                k = self._in_proj(kb, p, inst)[..., E:2 * E].transpose(0, 1).contiguous()
                v = self._in_proj(vb, p, inst)[..., 2 * E:].transpose(0, 1).contiguous()

        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (tgt_len, src_len):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but "
                                       f"should be {(tgt_len, src_len)}.")
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.dim() == 3:
                if attn_mask.shape != (bsz * num_heads, tgt_len, src_len):
                    raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but "
                                       f"should be {(bsz * num_heads, tgt_len, src_len)}.")
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")

        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))

        q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
        k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        if self.add_zero_attn:
            zshape = (bsz * num_heads, 1, head_dim)
            k = torch.cat([k, torch.zeros(zshape, dtype=k.dtype, device=k.device)], dim=1)
            v = torch.cat([v, torch.zeros(zshape, dtype=v.dtype, device=v.device)], dim=1)
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        src_len = k.size(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.view(bsz, 1, 1, src_len) \
                .expand(-1, num_heads, -1, -1).reshape(bsz * num_heads, 1, src_len)
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        dropout_p = self.dropout if self.training else 0.0

        weights = None
        if need_weights:
            q_scaled = q * math.sqrt(1.0 / float(head_dim))
            if is_causal and attn_mask is None:
                raise RuntimeError("is_causal is not implemented for need_weights")
            if attn_mask is not None:
                w = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                w = torch.bmm(q_scaled, k.transpose(-2, -1))
            w = F.softmax(w, dim=-1)
            if dropout_p > 0.0:
                w = F.dropout(w, p=dropout_p)
            out = torch.bmm(w, v)  # [B·H, L, hd]
            out = out.transpose(0, 1).reshape(tgt_len, bsz, embed_dim)
            weights = w.view(bsz, num_heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            if attn_mask is not None:
                if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                    attn_mask = attn_mask.unsqueeze(0)
                else:
                    attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
            q = q.view(bsz, num_heads, tgt_len, head_dim)
            k = k.view(bsz, num_heads, src_len, head_dim)
            v = v.view(bsz, num_heads, src_len, head_dim)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
            out = out.permute(2, 0, 1, 3).contiguous().view(tgt_len, bsz, embed_dim)
        # out-projection on batch-first [B, L, E]
        out = self.out_proj(out.transpose(0, 1))
        if not bf:
            out = out.transpose(0, 1)
        if not is_batched:
            out = out.squeeze(1)
            if weights is not None:
                weights = weights.squeeze(0)
        return out, weights

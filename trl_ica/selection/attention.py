"""The attention that the query section of a Data Whisperer prompt pays to each demonstration, in one decoder layer."""

from __future__ import annotations

import contextlib

import torch

from .. import seams


class AttentionProbe:
    """Wraps the attention function of one decoder layer; on the next call of that layer it also computes the
    attention that the marked query rows pay to each demonstration span (softmax in float32, summed over heads)."""

    def __init__(self, attention_module):
        self.module = attention_module
        self.request = None
        self.result = None

    @contextlib.contextmanager
    def installed(self):
        def wrap(original):
            def attention(module, query, key, value, attention_mask, **kwargs):
                if module is self.module and self.request is not None:
                    self.result = self._demo_attention(query, key, kwargs.get("scaling"), kwargs.get("softcap"))
                    self.request = None
                return original(module, query, key, value, attention_mask, **kwargs)

            return attention

        with seams.attention_wrapped(self.module, wrap):
            yield self

    def arm(self, key_mask: torch.Tensor, query_rows: torch.Tensor, spans: list[list[tuple[int, int]]]):
        """key_mask (B, K): valid keys; query_rows (B, Q): the query-section rows of the coming input;
        spans[b]: (start, end) key indices of each demonstration."""
        self.request = (key_mask, query_rows, spans)
        self.result = None

    def _demo_attention(self, query, key, scaling, softcap) -> list[list[float]]:
        key_mask, query_rows, spans = self.request
        B, H, Q, D = query.shape
        K = key.shape[-2]
        if scaling is None:
            scaling = D**-0.5
        key = key.repeat_interleave(H // key.shape[1], dim=1)
        # Query row i sits at key index K - Q + i; it sees valid keys up to itself.
        causal = torch.arange(K, device=key.device)[None, :] <= (K - Q + torch.arange(Q, device=key.device))[:, None]
        out = []
        for b in range(B):
            rows = query_rows[b].nonzero().squeeze(-1)
            logits = (query[b][:, rows].float() @ key[b].float().transpose(-1, -2)) * scaling  # (H, r, K)
            if softcap is not None:
                logits = torch.tanh(logits / softcap) * softcap
            allowed = causal[rows] & key_mask[b].bool()[None, :]
            probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
            per_key = probs.sum(dim=(0, 1))  # (K,)
            out.append([float(per_key[s:e].sum()) / (e - s) for s, e in spans[b]])
        return out

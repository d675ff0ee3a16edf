"""A one-block GPT-2 (``transformers``) small enough for the brute-force oracle, shared by the
tests of Conv1D, tied embedding/head weights and kept per-sample gradients."""

import pytest
import torch
import torch.nn as nn


def tiny_gpt2(tie: bool = False) -> nn.Module:
    """``ids (B, T <= 6) -> logits (B, T, 11)``, dropout off, explicit position ids (so that no
    position embedding sees a batch of one); ``tie``: the head shares ``wte``'s weight. Skips
    the calling test without ``transformers``."""
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_layer=1,
        n_embd=8,
        n_head=2,
        vocab_size=11,
        n_positions=6,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=tie,
    )

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = GPT2LMHeadModel(cfg)
            assert (self.lm.lm_head.weight is self.lm.transformer.wte.weight) == tie

        def forward(self, ids):
            pos = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
            return self.lm(input_ids=ids, position_ids=pos, use_cache=False).logits

    return LM()

"""transformers' Conv1D and RMSNorm-style norms: grad samplers, ghost norms and clipped sums vs
the brute-force oracle; whole GPT-2 / Llama models through the hooks; lazy registration."""

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from hypothesis import assume, given, settings
from hypothesis import strategies as st

pytest.importorskip("transformers")

from transformers.pytorch_utils import Conv1D  # noqa: E402

from opacus.grad_sample import transformers_layers as tl  # noqa: E402
from opacus.grad_sample.registry import (  # noqa: E402
    CLIPPED_SUM_SAMPLERS,
    GRAD_SAMPLERS,
    NORM_SAMPLERS,
)
from tests.grad_samples.tiny_lm import tiny_gpt2  # noqa: E402
from tests.oracle import brute_force_grad_samples  # noqa: E402

RMS_NORMS = [
    ("transformers.models.llama.modeling_llama", "LlamaRMSNorm"),
    ("transformers.models.mistral.modeling_mistral", "MistralRMSNorm"),
    ("transformers.models.qwen2.modeling_qwen2", "Qwen2RMSNorm"),
]


def _rms_norm_class(i):
    import importlib

    module, name = RMS_NORMS[i]
    return getattr(importlib.import_module(module), name)


def oracle(layer, x, r):
    """Per-sample grads of loss_i = <layer(x_i), R_i>, keyed by parameter name."""
    return brute_force_grad_samples(layer, x, loss_fn=lambda out, t: (out * t).sum(), targets=r)


def by_name(layer, result):
    names = {p: n for n, p in layer.named_parameters()}
    return {names[p]: v for p, v in result.items()}


def check_all_three(layer, x, r, tol, clipped_sum=None):
    """grad sampler == oracle; norm sampler == oracle norms; clipped sum == sum_i w_i g_i."""
    cls = type(layer)
    expected = oracle(layer, x, r)
    got = by_name(layer, GRAD_SAMPLERS[cls](layer, [x], r))
    assert set(got) == set(expected)
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, **tol, msg=lambda m: f"{name}: {m}")
    norms = by_name(layer, NORM_SAMPLERS[cls](layer, [x], r))
    assert set(norms) == set(expected)
    for name, g in expected.items():
        want = g.reshape(g.shape[0], -1).norm(dim=1)
        torch.testing.assert_close(norms[name].to(want.dtype), want, **tol)
    w = torch.rand(x.shape[0], dtype=x.dtype)
    sums = by_name(layer, (clipped_sum or CLIPPED_SUM_SAMPLERS[cls])(layer, [x], r, w))
    assert set(sums) == set(expected)
    for name, g in expected.items():
        torch.testing.assert_close(sums[name], torch.einsum("b,b...->...", w, g), **tol)


EXACT = dict(atol=1e-10, rtol=1e-9)


def test_registered_for_every_sampler_kind():
    for table in (GRAD_SAMPLERS, NORM_SAMPLERS, CLIPPED_SUM_SAMPLERS):
        assert table[Conv1D] is not None
        for i in range(len(RMS_NORMS)):
            assert _rms_norm_class(i) in table


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 4),
    middle=st.lists(st.integers(1, 4), max_size=2),
    nx=st.integers(1, 6),
    nf=st.integers(1, 6),
    frozen=st.sampled_from([None, "weight", "bias"]),
)
def test_conv1d(batch, middle, nx, nf, frozen):
    torch.manual_seed(0)
    layer = Conv1D(nf, nx).double()
    with torch.no_grad():
        layer.bias.normal_()
    if frozen:
        getattr(layer, frozen).requires_grad_(False)
    x = torch.randn(batch, *middle, nx, dtype=torch.float64)
    r = torch.randn(batch, *middle, nf, dtype=torch.float64)
    check_all_three(layer, x, r, EXACT)


@pytest.mark.parametrize("seq, nx, nf", [(3, 8, 8), (3, 4, 5), (12, 2, 3), (1, 4, 4)])
def test_conv1d_norm_paths(seq, nx, nf):
    """Gram-matrix path, materialised path (T (nx + nf) > nx * nf) and the one-position
    product."""
    torch.manual_seed(0)
    layer = Conv1D(nf, nx).double()
    x = torch.randn(3, seq, nx, dtype=torch.float64)
    r = torch.randn(3, seq, nf, dtype=torch.float64)
    check_all_three(layer, x, r, EXACT)


def test_conv1d_float32_pooled_buffer():
    """Large enough for the reusable per-sample buffer; float32 tolerances."""
    torch.manual_seed(0)
    layer = Conv1D(96, 64)
    x, r = torch.randn(48, 5, 64), torch.randn(48, 5, 96)
    with torch.no_grad():
        first = GRAD_SAMPLERS[Conv1D](layer, [x], r)[layer.weight].clone()
        again = GRAD_SAMPLERS[Conv1D](layer, [x], r)[layer.weight]
    torch.testing.assert_close(again, first)
    check_all_three(layer, x, r, dict(atol=1e-4, rtol=1e-4))


@settings(max_examples=20, deadline=None)
@given(
    which=st.integers(0, len(RMS_NORMS) - 1),
    batch=st.integers(1, 4),
    middle=st.lists(st.integers(1, 3), max_size=2),
    hidden=st.integers(1, 6),
    eps=st.sampled_from([1e-6, 0.5]),
)
def test_rms_norm_style(which, batch, middle, hidden, eps):
    torch.manual_seed(0)
    layer = _rms_norm_class(which)(hidden, eps=eps)
    with torch.no_grad():
        layer.weight.normal_()
    x = torch.randn(batch, *middle, hidden)
    r = torch.randn(batch, *middle, hidden)
    # The layer computes in float32 whatever the input dtype: float32 tolerances.
    check_all_three(layer, x, r, dict(atol=1e-5, rtol=1e-4))


@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(1, 4),
    middle=st.lists(st.integers(1, 3), max_size=2),
    normalized=st.lists(st.integers(1, 4), min_size=1, max_size=2),
    bias=st.booleans(),
    frozen=st.sampled_from([None, "weight", "bias"]),
)
def test_layer_norm_norms_and_clipped_sums(batch, middle, normalized, bias, frozen):
    """nn.LayerNorm's norm sampler and clipped sum (registered here, on its grad sampler)."""
    torch.manual_seed(0)
    layer = nn.LayerNorm(normalized, bias=bias).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    if frozen and getattr(layer, frozen) is not None:
        getattr(layer, frozen).requires_grad_(False)
    assume(any(p.requires_grad for p in layer.parameters()))
    x = torch.randn(batch, *middle, *normalized, dtype=torch.float64)
    r = torch.randn(batch, *middle, *normalized, dtype=torch.float64)
    assert NORM_SAMPLERS[nn.LayerNorm] is tl.compute_layer_norm_norm_sample
    assert CLIPPED_SUM_SAMPLERS[nn.LayerNorm] is tl.compute_layer_norm_clipped_sum
    check_all_three(layer, x, r, EXACT, clipped_sum=tl.compute_layer_norm_clipped_sum)


def test_rms_norm_style_frozen_and_bad_layer():
    layer = _rms_norm_class(0)(4)
    layer.weight.requires_grad_(False)
    x = torch.randn(2, 4)
    assert tl.compute_rms_norm_style_grad_sample(layer, [x], x) == {}
    assert tl.compute_rms_norm_style_norm_sample(layer, [x], x) == {}
    assert tl.compute_rms_norm_style_clipped_sum(layer, [x], x, torch.ones(2)) == {}

    class NoEps(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))

    with pytest.raises(TypeError, match="NoEps.*variance_epsilon"):
        tl.compute_rms_norm_style_grad_sample(NoEps(), [x], x)


# ------------------------------------------------------------------------- whole models
def _tiny_gpt2(tie=False):
    return tiny_gpt2(tie)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=11,
        max_position_embeddings=8,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = LlamaForCausalLM(cfg)

        def forward(self, ids):
            pos = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
            return self.lm(input_ids=ids, position_ids=pos, use_cache=False).logits

    return LM()


def _lm_loss(logits, target):
    return nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="sum")


@pytest.mark.parametrize("build, layer_type", [(_tiny_gpt2, "Conv1D"), (_tiny_llama, "RMSNorm")])
def test_whole_model_hooks_and_ghost_match_the_oracle(build, layer_type):
    from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
    from tests.oracle import grad_samples_of

    torch.manual_seed(0)
    model = build().double()
    ids = torch.randint(0, 11, (3, 5))
    target = torch.randint(0, 11, (3, 5))
    expected = brute_force_grad_samples(model, ids, loss_fn=_lm_loss, targets=target)

    gsm = GradSampleModule(copy.deepcopy(model), loss_reduction="sum")
    hooked = {type(m).__name__ for m, s in gsm._samplers.items() if s is not None}
    assert any(layer_type in n for n in hooked), hooked
    assert all(s is not None for s in gsm._samplers.values())  # no torch.func fallback
    _lm_loss(gsm(ids), target).backward()
    got = grad_samples_of(gsm)
    assert set(got) == set(expected)
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, atol=1e-8, rtol=1e-6, msg=lambda m: name + m)

    ghost = GradSampleModuleFastGradientClipping(model, loss_reduction="sum", max_grad_norm=1.0)
    _lm_loss(ghost(ids), target).backward()
    want = torch.stack([g.reshape(3, -1).norm(dim=1) for g in expected.values()]).norm(dim=0)
    torch.testing.assert_close(ghost.get_norm_sample(), want, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("ratio", [0.0, float("inf")])
def test_tied_gpt2_ghost_clipping_matches_the_oracle(ratio):
    """GPT-2 with lm_head tied to wte: ghost norms (cross term) and the clipped sum, through
    the second backward pass (ratio 0) and book-keeping (inf: LayerNorm, Conv1D, tied pair)."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import double_backward
    from tests.grad_samples.ghost_stubs import BoundOnly

    torch.manual_seed(1)
    model = _tiny_gpt2(tie=True).double()
    assert model.lm.lm_head.weight is model.lm.transformer.wte.weight
    ids = torch.randint(0, 11, (3, 5))
    target = torch.randint(0, 11, (3, 5))
    expected = brute_force_grad_samples(model, ids, loss_fn=_lm_loss, targets=target)
    norms = torch.stack([g.reshape(3, -1).norm(dim=1) for g in expected.values()]).norm(dim=0)
    coef = (0.1 / (norms + 1e-6)).clamp(max=1.0)
    assert (coef < 1).all()
    gsm = GradSampleModuleFastGradientClipping(model, loss_reduction="sum")
    gsm.max_book_keeping_ratio = ratio
    assert gsm.log_module_gradient_sample_mode(model.lm.lm_head) == "ghost"
    autograd_grads = []
    for p in model.parameters():
        p.register_hook(autograd_grads.append)
    logits = gsm(ids)
    per_sample = nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none").sum(
        dim=1
    )
    double_backward(gsm, BoundOnly(0.1), per_sample)
    assert (not autograd_grads) == (ratio == float("inf"))  # book-kept: no second pass
    torch.testing.assert_close(gsm.per_sample_gradient_norms, norms, atol=1e-8, rtol=1e-6)
    params = dict(model.named_parameters())
    for name, g in expected.items():
        want = torch.einsum("b,b...->...", coef, g)
        torch.testing.assert_close(params[name].grad, want, atol=1e-8, rtol=1e-6)


def test_registration_is_lazy_and_happens_on_import():
    code = (
        "import sys\n"
        "import opacus.grad_sample\n"
        "from opacus.grad_sample.registry import GRAD_SAMPLERS, NORM_SAMPLERS\n"
        "assert 'transformers' not in sys.modules\n"
        "from transformers.pytorch_utils import Conv1D\n"
        "from transformers.models.llama.modeling_llama import LlamaRMSNorm\n"
        "assert Conv1D in GRAD_SAMPLERS and LlamaRMSNorm in NORM_SAMPLERS\n"
        "import inspect; assert 'addmm' in inspect.getsource(Conv1D)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_registration_when_transformers_was_imported_first():
    code = (
        "from transformers.pytorch_utils import Conv1D\n"
        "from opacus.grad_sample.registry import GRAD_SAMPLERS\n"
        "assert Conv1D in GRAD_SAMPLERS\n"
        "from opacus.grad_sample.transformers_layers import register_transformers_layers\n"
        "assert 'transformers.pytorch_utils' in register_transformers_layers()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


class _Tied(nn.Module):
    """Embedding -> tanh(Linear) -> head Linear whose weight is the embedding's."""

    def __init__(self, vocab, dim, padding_idx):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.mid = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        e = self.emb(ids)
        h = torch.tanh(self.mid(e))
        self.saved = (ids, e, h)
        e.retain_grad()
        h.retain_grad()
        return self.head(h)


@settings(max_examples=15, deadline=None)
@given(
    batch=st.integers(1, 3),
    seq=st.integers(1, 5),
    vocab=st.integers(2, 7),
    dim=st.integers(1, 4),
    pad=st.booleans(),
)
def test_tied_embedding_head_norm_from_ghost_norms_and_cross_term(batch, seq, vocab, dim, pad):
    """||g_emb + g_head|| of the shared weight == sqrt(||E||^2 + ||H||^2 + 2 cross)."""
    from opacus.grad_sample.embedding import compute_embedding_norm_sample
    from opacus.grad_sample.linear import compute_linear_norm_sample

    torch.manual_seed(0)
    model = _Tied(vocab, dim, 0 if pad else None).double()
    ids = torch.randint(0, vocab, (batch, seq))
    r = torch.randn(batch, seq, vocab, dtype=torch.float64)
    expected = oracle(model, ids, r)["emb.weight"].reshape(batch, -1).norm(dim=1)
    # One batched pass (the loss is a sum of per-sample losses): the layers' output gradients.
    (model(ids) * r).sum().backward()
    ids_, e, h = model.saved
    norm_e = compute_embedding_norm_sample(model.emb, [ids_], e.grad)[model.emb.weight]
    norm_h = compute_linear_norm_sample(model.head, [h.detach()], r)[model.head.weight]
    cross = tl.tied_embedding_linear_cross_term(model.emb, ids_, e.grad, h.detach(), r)
    got = (norm_e**2 + norm_h**2 + 2 * cross).clamp_min(0).sqrt()
    torch.testing.assert_close(got, expected)


def test_tied_cross_term_refuses_scale_grad_by_freq():
    emb = nn.Embedding(5, 3, scale_grad_by_freq=True)
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(NotImplementedError, match="scale_grad_by_freq"):
        tl.tied_embedding_linear_cross_term(
            emb, ids, torch.randn(2, 4, 3), torch.randn(2, 4, 3), torch.randn(2, 4, 5)
        )

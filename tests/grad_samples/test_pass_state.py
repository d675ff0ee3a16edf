"""The per-pass objects the hooks compose (opacus.grad_sample.pass_state), on their own."""

import torch
import torch.nn as nn

from opacus.grad_sample.pass_state import (
    DeferredContractions,
    NormBook,
    PassRecord,
    ReductionScale,
)


def test_reduction_scale_is_the_batch_size_under_mean_only():
    assert ReductionScale("mean").factor(7) == 7
    assert ReductionScale("sum").factor(7) is None


def test_reduction_scale_goes_on_the_smaller_tensor():
    conv = nn.Conv2d(1, 2, 3)  # 20 parameters; backprops of a 16x16 image are far larger
    big = torch.zeros(4, 2, 16, 16)
    assert ReductionScale.scale_output_instead(big, conv.parameters(), only_call=True)
    # several calls of the layer: their gradients are summed first, so the backprops are scaled
    assert not ReductionScale.scale_output_instead(big, conv.parameters(), only_call=False)
    wide = nn.Linear(100, 100)
    assert not ReductionScale.scale_output_instead(
        torch.zeros(4, 100), wide.parameters(), only_call=True
    )


def test_deferred_contractions_are_taken_once():
    buf, m = DeferredContractions(), nn.Linear(1, 1)
    buf.defer(m, ["a1"], "b1", 3)
    buf.defer(m, ["a2"], "b2", 5)
    assert [(mod, calls) for mod, calls in buf.take()] == [
        (m, [(["a1"], "b1", 3), (["a2"], "b2", 5)])
    ]
    assert list(buf.take()) == []
    buf.defer(m, ["a"], "b", 1)
    buf.clear()
    assert list(buf.take()) == []


def test_norm_book_keeps_only_a_parameters_only_contribution():
    book, p, q = NormBook(), nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    book.record(p, ("norms-p",), first=True)
    book.record(q, ("norms-q",), first=True)
    book.record(q, ("again",), first=False)  # a shared parameter's second contribution
    assert book.take() == {id(p): ("norms-p",)}
    assert book.take() == {}
    book.record(p, None, first=True)  # no exact norms for this contribution
    assert book.take() == {}


def test_pass_record_marks_first_calls_and_resets():
    rec, m, p = PassRecord(), nn.Linear(1, 1), nn.Parameter(torch.zeros(1))
    assert rec.first_call(m) and not rec.first_call(m)
    rec.add(p)
    rec.add(p)
    rec.finish_queued = True
    assert rec.take() == [p]
    assert rec.params == {} and rec.first_call(m) and not rec.finish_queued

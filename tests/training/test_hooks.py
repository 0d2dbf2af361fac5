"""Which activations the regulariser penalises (training/_hooks.py): nested calls of the model,
layers that output something other than a tensor, and taking the hooks off.

Found by `nox -s mutants -- training/_hooks.py` (issue 28): each test fails for a one-line change
of _hooks.py that the regulariser's tests let through."""

import pytest
import torch
from torch import nn

from powerlaw_fast.training._hooks import LayerHooks


class Recursive(nn.Module):
    """The model calls itself once: the inner call runs ``a``, then the outer call runs ``a``
    again on the inner call's output."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)

    def forward(self, x, inner=False):
        if inner:
            return self.a(x)
        return self.a(self(x, inner=True))


def test_a_layer_run_again_after_a_nested_call_of_the_model_is_refused():
    model = Recursive()
    hooks = LayerHooks(model, {"a": model.a})
    # the nested call is part of the outer one: a's second run is a reuse within one call
    with pytest.raises(RuntimeError, match=r"^layer 'a' ran twice in one forward pass: its "
                                           r"basis describes one use"):
        model(torch.randn(4, 3))
    # after the error the model is called afresh: a single run of a is kept
    hooks.take()
    out = model.a(torch.randn(4, 3))
    assert hooks.take()["a"] is out


class Pair(nn.Module):
    def forward(self, x):
        return x, -x


def test_a_layer_that_outputs_a_tuple_is_kept_as_it_is():
    # the regulariser then refuses it by name at the penalty; the hook itself keeps the output
    model = nn.Sequential(nn.Linear(2, 2), Pair())
    hooks = LayerHooks(model, {"1": model[1]})
    model(torch.randn(3, 2))
    kept = hooks.take()["1"]
    assert isinstance(kept, tuple) and len(kept) == 2


def test_remove_takes_every_hook_off_and_may_be_called_again():
    model = nn.Sequential(nn.Linear(2, 2), nn.Tanh())
    hooks = LayerHooks(model, {"0": model[0]})
    hooks.remove()
    hooks.remove()  # idempotent, e.g. remove() and then the context manager's exit
    model(torch.randn(3, 2))
    assert hooks.take() == {}
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert not model[0]._forward_hooks

"""What SpectralRegularizer does with each misuse and each unusual but legal use (issue 23):
an in-place op after a regularised layer, activation checkpointing, calling a part of the
model, a checkpoint of the running basis, second-order gradients, non-orthonormal or
trainable bases, widths known before a forward, and deferred errors naming layer and step."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from powerlaw_fast import SpectralRegularizer, spec_penalty
from powerlaw_fast.ops import status
from powerlaw_fast.ops.status import DeferredValidationError


def _data(B=60, D=20, batches=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, D, generator=g) for _ in range(batches)]


def test_an_in_place_op_after_the_layer_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 12), nn.ReLU(inplace=True), nn.Linear(12, 3))
    reg = SpectralRegularizer(model, ["0"], tau=3, progress=False)
    data = _data()
    reg.refresh(data)
    model(data[0])
    with pytest.raises(RuntimeError, match="layer '0': its output was modified in place"):
        reg.penalty()


def test_the_penalty_sees_the_layer_output_not_a_later_out_of_place_op():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 12), nn.ReLU(), nn.Linear(12, 3))
    reg = SpectralRegularizer(model, ["0"], tau=3, progress=False, backend="torch")
    data = _data()
    reg.refresh(data)
    model(data[0])
    got = reg.penalty()
    h = model[0](data[0]).detach()
    expected = spec_penalty(h, reg.basis("0"), tau=3, backend="torch")
    torch.testing.assert_close(got, expected)


def test_activation_checkpointing_is_not_mistaken_for_reuse():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(20, 16), nn.Tanh())
    head = nn.Linear(16, 3)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.head = block, head

        def forward(self, x):
            return self.head(checkpoint(self.block, x, use_reentrant=False))

    model = Net()
    reg = SpectralRegularizer(model, ["block.0"], tau=3, progress=False, backend="torch")
    data = _data()
    reg.refresh(data)
    grads = []
    for use_checkpoint in (True, False):
        model.zero_grad()
        if use_checkpoint:
            out = model(data[0])
        else:
            out = head(block(data[0]))  # the same computation, no recompute in the backward
        loss = out.square().mean() + reg.penalty()
        loss.backward()  # the recompute runs the layer's hook inside the backward pass
        grads.append(block[0].weight.grad.clone())
        if use_checkpoint:
            model(data[1])  # the next step is not refused either
            reg.penalty()
    torch.testing.assert_close(grads[0], grads[1])


def test_calling_part_of_the_model_is_a_forward_of_its_own():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 12), nn.Tanh(), nn.Linear(12, 3))
    reg = SpectralRegularizer(model, ["0"], tau=3, progress=False)
    data = _data()
    reg.refresh(data)
    for x in data:  # model[:2] is a new Sequential: the model's own hooks do not run
        model[:2](x)
        reg.penalty()
    model[:2](data[0])
    model[:2](data[1])  # twice without a penalty: the latest wins, as documented
    model(data[0])
    reg.penalty()


def test_reuse_within_one_call_of_the_model_is_still_refused():
    layer = nn.Linear(6, 6)
    model = nn.Sequential(layer, nn.Tanh(), layer)
    reg = SpectralRegularizer(model, [layer], tau=2, progress=False)
    with pytest.raises(RuntimeError, match="ran twice in one forward pass"):
        model(torch.randn(20, 6))
    with pytest.raises(RuntimeError, match="ran twice in one forward pass"):
        model(torch.randn(20, 6))  # the failed call's bookkeeping did not stick
    reg.remove()


def _running_run(steps, *, resume_at=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 12), nn.Tanh(), nn.Linear(12, 3))
    kwargs = dict(tau=3, progress=False, backend="torch", basis_update="running",
                  basis_every=2, basis_momentum=0.3)  # fmt: skip
    reg = SpectralRegularizer(model, ["1"], **kwargs)
    data = _data(batches=steps, seed=3)
    values = []
    for i, x in enumerate(data):
        if i == resume_at:
            state = reg.state_dict()
            model_state = {k: v.clone() for k, v in model.state_dict().items()}
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(20, 12), nn.Tanh(), nn.Linear(12, 3))
            model.load_state_dict(model_state)
            reg = SpectralRegularizer(model, ["1"], **kwargs)
            reg.load_state_dict(state)
        model(x)
        values.append(float(reg.penalty()))
    return values


def test_a_running_basis_resumes_from_a_checkpoint_exactly():
    uninterrupted = _running_run(6)
    for resume_at in (1, 3, 4):
        assert _running_run(6, resume_at=resume_at) == uninterrupted


def test_an_epoch_checkpoint_loaded_into_running_mode_warns_that_the_average_restarts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 12), nn.Tanh())
    data = _data()
    epoch = SpectralRegularizer(model, ["1"], tau=3, progress=False)
    epoch.refresh(data)
    state = epoch.state_dict()
    epoch.remove()
    running = SpectralRegularizer(model, ["1"], tau=3, progress=False, basis_update="running")
    with pytest.warns(UserWarning, match="the running average restarts"):
        running.load_state_dict(state)


def test_second_order_gradients_raise_instead_of_being_wrong():
    x = torch.randn(80, 10, requires_grad=True)
    V = torch.linalg.eigh(torch.cov(x.detach().T))[1].flip(1)
    w = torch.randn(10, requires_grad=True)
    loss = (x @ w).square().mean() + spec_penalty(x, V, tau=3)
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    # with respect to w the penalty's gradient is a constant: that second derivative is right
    torch.autograd.grad(gx.square().sum(), w, retain_graph=True)
    with pytest.raises(RuntimeError, match="spec_penalty: its gradient is not differentiable"):
        torch.autograd.grad(gx.square().sum(), x)
    (gx,) = torch.autograd.grad(spec_penalty(x, V, tau=3), x, create_graph=True)
    with pytest.raises(RuntimeError, match="spec_penalty: its gradient is not differentiable"):
        gx.square().sum().backward()


def test_a_basis_that_requires_grad_or_is_not_orthonormal_is_refused():
    x = torch.randn(80, 10)
    V = torch.linalg.eigh(torch.cov(x.T))[1].flip(1)
    with pytest.raises(ValueError, match=r"V: expected a constant basis.*V\.detach\(\)"):
        spec_penalty(x, V.clone().requires_grad_(True), tau=3)
    skewed = V.clone()
    skewed[:, 0] *= 1.01
    spec_penalty(x, skewed, tau=3)  # assumed orthonormal by default: no GEMM, no sync
    with pytest.raises(ValueError, match=r"V: expected orthonormal columns.*max \|V\^T V - I\|"):
        spec_penalty(x, skewed, tau=3, validate="immediate")
    spec_penalty(x, V, tau=3, validate="immediate")


def test_load_state_dict_checks_bases_and_widths_of_the_paper_models_blocks():
    from powerlaw_fast.paper.models import MLP

    torch.manual_seed(0)
    model = MLP(widths=(30, 20, 20))
    reg = SpectralRegularizer(model, ["hidden2"], tau=3, progress=False)
    reg.refresh(torch.rand(64, 784))
    state = reg.state_dict()
    other = MLP(widths=(30, 24, 20))
    reg_other = SpectralRegularizer(other, ["hidden2"], tau=3, progress=False)
    with pytest.raises(ValueError, match="expected a basis for 24 features"):
        reg_other.load_state_dict(state)
    bad = {**state, "layers": {"hidden2": dict(state["layers"]["hidden2"])}}
    bad["layers"]["hidden2"]["basis"] = state["layers"]["hidden2"]["basis"] * 1.1
    with pytest.raises(ValueError, match="basis: expected orthonormal columns"):
        reg.load_state_dict(bad)


def test_a_deferred_error_names_the_layer_and_step_it_came_from():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 12), nn.Tanh(), nn.Linear(12, 8), nn.Tanh())
    reg = SpectralRegularizer(model, ["1", "3"], tau=3, progress=False, backend="torch")
    data = _data()
    reg.refresh(data)
    with status.simulate_deferral():
        model(data[0])
        reg.penalty()  # step 1: fine
        bad = data[1].clone()
        bad[0, 0] = float("nan")
        model(bad)
        # the NaN reaches layer '1' first; its deferred check is found by the next call, the
        # penalty of layer '3', which must not take the blame
        with pytest.raises(DeferredValidationError) as info:
            reg.penalty()
    message = str(info.value)
    assert "(spec_penalty, layer '1', step 2)" in message
    assert "layer '3'" not in message
    status.discard_pending()

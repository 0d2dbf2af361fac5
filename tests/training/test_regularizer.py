"""SpectralRegularizer: refresh against a float64 eigendecomposition, penalty against spec_penalty,
per-layer settings, misuse errors, checkpoints, autocast, torch.compile, hook hygiene."""

from __future__ import annotations

import io
import warnings
import weakref

import pytest
import torch
from torch import nn

from powerlaw_fast.ops.spectral_penalty import projected_spectrum, spec_penalty
from powerlaw_fast.training.regulariser import SpectralRegularizer


def _bn_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(12, 24), nn.BatchNorm1d(24), nn.Tanh(),   # "2": 24 wide
        nn.Linear(24, 16), nn.Tanh(),                       # "4": 16 wide
        nn.Linear(16, 3),
    )
    bn = model[1]
    # Running statistics far from any batch's own, so eval and train mode differ clearly.
    with torch.no_grad():
        bn.running_mean.copy_(torch.linspace(-0.5, 0.5, 24))
        bn.running_var.copy_(torch.linspace(2.0, 6.0, 24))
    return model


def _batches(sizes, features=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(b, features, generator=g) * 2.0 + 0.3, torch.randint(0, 3, (b,), generator=g))
        for b in sizes
    ]


def _activations(model, modules, x):
    """Outputs of ``modules`` for input ``x``, flattened per sample, as float64."""
    outs = {}
    handles = [
        m.register_forward_hook(lambda mod, a, o, k=k: outs.__setitem__(k, o.flatten(1)))
        for k, m in modules.items()
    ]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return {k: v.detach().double() for k, v in outs.items()}


def _reference_eigh(acts: torch.Tensor):
    lam, vec = torch.linalg.eigh(torch.cov(acts.T))
    return lam.flip(0), vec.flip(1)


def _assert_same_eigensystem(lam, V, lam_ref, V_ref):
    assert lam.dtype == torch.float64 and V.dtype == torch.float32
    assert bool((lam[:-1] >= lam[1:]).all()), "eigenvalues must be descending"
    torch.testing.assert_close(lam, lam_ref, rtol=1e-5, atol=1e-7 * float(lam_ref[0]))
    # Eigenvectors up to sign: |<v_n, v_ref_n>| = 1 where the eigenvalue is well separated.
    gaps = torch.minimum(
        torch.cat([lam_ref[:-1] - lam_ref[1:], lam_ref.new_full((1,), float("inf"))]),
        torch.cat([lam_ref.new_full((1,), float("inf")), lam_ref[:-1] - lam_ref[1:]]),
    ) / lam_ref[0]
    separated = gaps > 1e-3
    assert int(separated.sum()) >= lam.numel() // 2  # the check below must cover most columns
    overlap = (V.double() * V_ref).sum(0).abs()
    ones = torch.ones_like(overlap[separated])
    torch.testing.assert_close(overlap[separated], ones, atol=1e-4, rtol=0)
    # The whole basis reconstructs the reference covariance.
    cov = V.double() @ torch.diag(lam) @ V.double().T
    cov_ref = V_ref @ torch.diag(lam_ref) @ V_ref.T
    torch.testing.assert_close(cov, cov_ref, rtol=0, atol=1e-5 * float(lam_ref[0]))


# --------------------------------------------------------------------------------------------
# refresh


@pytest.mark.parametrize("source", ["loader", "tensor"])
def test_refresh_matches_float64_eigendecomposition_of_all_activations(source):
    model = _bn_mlp()
    data = _batches([32, 32, 32, 7])  # partial last batch
    layers = {"2": model[2], "4": model[4]}
    model.train()
    model[1].eval()  # a mixed mode that must come back exactly as it was
    reg = SpectralRegularizer(model, ["2", model[4]], tau=3, progress=False)
    if source == "loader":
        reg.refresh(data)
    else:
        reg.refresh(torch.cat([x for x, _ in data]), batch_size=30)
    assert model.training and not model[1].training and model[0].training

    inputs = torch.cat([x for x, _ in data])
    model.eval()
    with torch.no_grad():
        ref = _activations(model, layers, inputs)
        model.train()  # batch statistics: what the refresh must NOT use
        wrong = _activations(model, layers, inputs)
    for name in ("2", "4"):
        lam_ref, V_ref = _reference_eigh(ref[name])
        _assert_same_eigensystem(reg.eigenvalues(name), reg.basis(name), lam_ref, V_ref)
        lam_wrong, _ = _reference_eigh(wrong[name])
        assert not torch.allclose(reg.eigenvalues(name), lam_wrong, rtol=1e-2)
    assert reg.basis(model[2]) is reg.basis("2")


def test_refresh_flattens_conv_outputs_and_stops_after_the_last_layer():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.Tanh(),      # [B, 3, 4, 4] -> N = 48
        nn.Flatten(), nn.Linear(48, 5), nn.Tanh(), nn.Linear(5, 2),
    )
    readout_calls = []
    model[5].register_forward_hook(lambda *a: readout_calls.append(1))
    x = torch.randn(150, 1, 6, 6)
    reg = SpectralRegularizer(model, ["1", "4"], tau=3, progress=False)
    reg.refresh(x, batch_size=64)
    assert readout_calls == []  # the refresh forward ends once every regularised layer ran
    with torch.no_grad():
        model.eval()
        ref = _activations(model, {"1": model[1], "4": model[4]}, x)
    for name in ("1", "4"):
        lam_ref, V_ref = _reference_eigh(ref[name])
        _assert_same_eigensystem(reg.eigenvalues(name), reg.basis(name), lam_ref, V_ref)

    model.train()
    xb = x[:100]
    with torch.no_grad():
        acts = _activations(model, {"1": model[1], "4": model[4]}, xb)
    model(xb)
    expected = sum(spec_penalty(acts[n].float(), reg.basis(n), tau=3) for n in ("1", "4"))
    torch.testing.assert_close(reg.penalty(), expected, rtol=1e-6, atol=0)


def test_refresh_restores_mode_and_keeps_the_old_basis_on_error():
    model = _bn_mlp()
    reg = SpectralRegularizer(model, ["2"], tau=3, progress=False)
    reg.refresh(_batches([40, 40]))
    before = reg.basis("2").clone()

    def failing():
        yield from _batches([40])
        raise OSError("disk gone")

    model.train()
    with pytest.raises(OSError, match="disk gone"):
        reg.refresh(failing())
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(reg.basis("2"), before)
    # The training capture works again after the failed refresh: the penalty of this batch's
    # activations in the kept basis, the same op on the same input
    batch = _batches([40])[0][0]
    with torch.no_grad():
        act = _activations(model, {"2": model[2]}, batch)["2"]
    model(batch)
    assert torch.equal(reg.penalty(), spec_penalty(act.float(), before, tau=3))


def test_refresh_progress_bar_can_be_on():
    model = _bn_mlp()
    reg = SpectralRegularizer(model, ["2"], tau=3, progress=True)
    reg.refresh(_batches([40, 40]))
    assert reg.refreshed


# --------------------------------------------------------------------------------------------
# penalty


def _training_step_inputs(model, seed=5, B=64):
    x = _batches([B], seed=seed)[0][0]
    model.train()
    return x


def test_penalty_is_the_sum_of_spec_penalty_with_per_layer_settings():
    model = _bn_mlp()
    alpha = {"2": 1.3, model[4]: 0.8}
    tau = {model[2]: 4, "4": 2}
    beta = {"2": 2.0, "4": 0.5}
    reg = SpectralRegularizer(model, ["2", "4"], alpha=alpha, tau=tau, beta=beta, progress=False)
    assert reg.settings("4") == {"alpha": 0.8, "tau": 2, "beta": 0.5}
    reg.refresh(_batches([50, 50, 13]))

    x = _training_step_inputs(model)
    model(x)
    got = reg.penalty()
    got.backward()
    grads = [p.grad for p in model.parameters()]
    assert model[5].weight.grad is None and model[0].weight.grad is not None
    model.zero_grad(set_to_none=True)

    acts = {}
    hooks = [model[i].register_forward_hook(lambda m, a, o, i=i: acts.__setitem__(str(i), o))
             for i in (2, 4)]
    model(x)
    for h in hooks:
        h.remove()
    expected = (
        spec_penalty(acts["2"], reg.basis("2"), alpha=1.3, tau=4, beta=2.0)
        + spec_penalty(acts["4"], reg.basis("4"), alpha=0.8, tau=2, beta=0.5)
    )
    assert torch.equal(got.detach(), expected.detach())
    expected.backward()
    for g, p in zip(grads, model.parameters(), strict=True):
        assert (g is None and p.grad is None) or torch.equal(g, p.grad)
    # Different settings give a different value: the test above can fail.
    plain = spec_penalty(acts["2"], reg.basis("2")) + spec_penalty(acts["4"], reg.basis("4"), tau=2)
    assert not torch.allclose(plain, expected)


def test_authors_convention_is_passed_through():
    model = _bn_mlp()
    reg = SpectralRegularizer(model, ["4"], tau=3, convention="authors", progress=False)
    reg.refresh(_batches([60, 60]))
    x = _training_step_inputs(model)
    acts = {}
    model[4].register_forward_hook(lambda m, a, o: acts.__setitem__("4", o))
    model(x)
    got = reg.penalty()
    expected = spec_penalty(acts["4"], reg.basis("4"), tau=3, convention="authors")
    assert torch.equal(got, expected)
    assert not torch.equal(got, spec_penalty(acts["4"], reg.basis("4"), tau=3))


def test_spectra_are_the_sorted_per_batch_spectra_of_the_latest_penalty():
    model = _bn_mlp()
    reg = SpectralRegularizer(model, ["2", "4"], tau=3, progress=False)
    reg.refresh(_batches([50, 50]))
    assert reg.spectra() == {}
    x = _training_step_inputs(model)
    acts = {}
    model[2].register_forward_hook(lambda m, a, o: acts.__setitem__("2", o))
    model(x)
    reg.penalty()
    spectra = reg.spectra()
    assert set(spectra) == {"2", "4"}
    expected = projected_spectrum(acts["2"].detach(), reg.basis("2")).sort(descending=True).values
    assert torch.equal(spectra["2"], expected)
    assert not spectra["2"].requires_grad
    reg.refresh(_batches([50, 50]))
    assert reg.spectra() == {}


def test_penalty_releases_the_activations():
    model = _bn_mlp()
    reg = SpectralRegularizer(model, ["2", "4"], tau=3, progress=False)
    reg.refresh(_batches([50, 50]))
    refs = []
    model[4].register_forward_hook(lambda m, a, o: refs.append(weakref.ref(o)))
    loss = model(_training_step_inputs(model)).sum() + reg.penalty()
    loss.backward()
    del loss
    assert reg._hooks.captured == {}
    assert refs[0]() is None


def test_only_training_forward_passes_with_gradients_are_captured():
    model = _bn_mlp()
    reg = SpectralRegularizer(model, ["2"], tau=3, progress=False)
    reg.refresh(_batches([50, 50]))
    x = _training_step_inputs(model)
    with torch.no_grad():
        model(x)
    with pytest.raises(RuntimeError, match="no activations for layers"):
        reg.penalty()
    model.eval()
    model(x)  # e.g. an attack on the eval-mode model
    with pytest.raises(RuntimeError, match="no activations for layers"):
        reg.penalty()


def test_small_batch_warns_once_per_layer():
    model = _bn_mlp()
    reg = SpectralRegularizer(model, ["2", "4"], tau=3, progress=False)
    reg.refresh(_batches([50, 50]))
    model.train()
    x = _batches([20])[0][0]  # 20 < 24 ("2") but >= 16 ("4")
    model(x)
    with pytest.warns(UserWarning, match="layer '2': batch of B = 20") as record:
        reg.penalty()
    assert len(record) == 1
    model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reg.penalty()


# --------------------------------------------------------------------------------------------
# misuse


def test_penalty_errors_before_refresh_and_without_a_new_forward_pass():
    model = _bn_mlp()
    reg = SpectralRegularizer(model, ["2"], tau=3, progress=False)
    model.train()
    model(_batches([30])[0][0])
    with pytest.raises(RuntimeError, match="call reg.refresh"):
        reg.penalty()
    with pytest.raises(RuntimeError, match="call reg.refresh"):
        reg.basis("2")
    with pytest.raises(RuntimeError, match="call reg.refresh"):
        reg.state_dict()
    reg.refresh(_batches([40]))
    model(_batches([30])[0][0])
    reg.penalty()
    with pytest.raises(RuntimeError, match=r"no activations for layers \['2'\]"):
        reg.penalty()


def test_penalty_error_names_a_layer_that_did_not_fire():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Linear(6, 5), nn.Tanh())
            self.b = nn.Sequential(nn.Linear(6, 5), nn.Tanh())
            self.use_b = True

        def forward(self, x):
            return self.a(x) + (self.b(x) if self.use_b else 0)

    torch.manual_seed(0)
    model = Branchy()
    reg = SpectralRegularizer(model, ["a", "b"], tau=2, progress=False)
    reg.refresh(torch.randn(40, 6))
    model.use_b = False
    with pytest.raises(ValueError, match=r"layers \['b'\] did not run"):
        reg.refresh(torch.randn(40, 6))
    model.train()
    model(torch.randn(30, 6))
    with pytest.raises(RuntimeError, match=r"no activations for layers \['b'\]"):
        reg.penalty()


def test_reused_module_and_width_change_are_errors():
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.Tanh(), shared, nn.Tanh())
    reg = SpectralRegularizer(model, [shared, "3"], tau=2, progress=False)
    assert reg.layer_names == ["0", "3"]
    with pytest.raises(RuntimeError, match="ran twice in one forward pass"):
        reg.refresh(torch.randn(20, 4))

    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh())
    reg = SpectralRegularizer(conv, ["1"], tau=2, progress=False)
    reg.refresh(torch.randn(30, 1, 5, 5))
    conv.train()
    conv(torch.randn(30, 1, 6, 6))
    with pytest.raises(ValueError, match="expected 18 features per sample"):
        reg.penalty()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"layers": "2"}, TypeError, "layers: expected a list"),
        ({"layers": []}, ValueError, "at least one layer"),
        ({"layers": ["nope"]}, ValueError, "no submodule 'nope'"),
        ({"layers": [nn.Linear(2, 2)]}, ValueError, "not a submodule of model"),
        ({"layers": [3]}, TypeError, "expected module names or modules, got int"),
        ({"layers": ["2", "2"]}, ValueError, "listed twice"),
        ({"layers": [""]}, ValueError, "the model itself"),
        ({"alpha": 0.0}, ValueError, "alpha: expected a finite number > 0"),
        ({"beta": -1.0}, ValueError, "beta: expected a finite number >= 0"),
        ({"tau": 2.5}, TypeError, "tau: expected an integer"),
        ({"tau": {"2": 3}}, ValueError, r"tau: the mapping has no value for layers \['4'\]"),
        ({"beta": {"2": 1.0, "4": 1.0, "9": 1.0}}, ValueError, "unknown layer '9'"),
        ({"alpha": {"2": 1.0, "4": float("nan")}}, ValueError, r"alpha\['4'\]"),
        ({"convention": "nature"}, ValueError, "convention: expected one of"),
        ({"backend": "gpu"}, ValueError, "backend: expected one of"),
    ],
)
def test_constructor_errors(kwargs, error, match):
    model = _bn_mlp()
    args = {"layers": ["2", "4"], **kwargs}
    with pytest.raises(error, match=match):
        SpectralRegularizer(model, **args)


def test_other_errors():
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        SpectralRegularizer(lambda x: x, ["a"])
    model = _bn_mlp()
    reg = SpectralRegularizer(model, ["2", "4"], tau={"2": 3, "4": 17}, progress=False)
    with pytest.raises(ValueError, match="tau for layer '4' \\(N = 16 features\\)"):
        reg.refresh(_batches([40]))
    reg = SpectralRegularizer(model, ["2"], tau=3, progress=False)
    with pytest.raises(ValueError, match="data: no batches"):
        reg.refresh([])
    with pytest.raises(ValueError, match="batch_size"):
        reg.refresh(torch.randn(10, 12), batch_size=0)
    with pytest.raises(TypeError, match="data: expected batches"):
        reg.refresh([("not a tensor",)])
    with pytest.raises(ValueError, match="unknown layer '4'"):
        reg.eigenvalues("4")
    reg.refresh(_batches([40]))
    model.train()
    model(torch.full((30, 12), float("nan")))
    with pytest.raises(ValueError, match="layer '2': .*non-finite"):
        reg.penalty()


# --------------------------------------------------------------------------------------------
# checkpoints, hooks


def test_state_dict_round_trip_reproduces_the_penalty_bit_for_bit():
    model = _bn_mlp()
    reg = SpectralRegularizer(model, ["2", "4"], tau=3, progress=False)
    reg.refresh(_batches([50, 50, 9]))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "reg": reg.state_dict()}, buffer)
    x = _training_step_inputs(model)
    model(x)
    before = reg.penalty()
    reg.remove()

    buffer.seek(0)
    saved = torch.load(buffer)
    restored_model = _bn_mlp(seed=3)
    restored_model.load_state_dict(saved["model"])
    restored = SpectralRegularizer(restored_model, ["2", "4"], tau=3, progress=False)
    restored.load_state_dict(saved["reg"])
    for name in ("2", "4"):
        assert torch.equal(restored.basis(name), reg.basis(name))
        assert torch.equal(restored.eigenvalues(name), reg.eigenvalues(name))
    restored_model.train()
    restored_model(x)
    assert torch.equal(restored.penalty(), before)

    with pytest.raises(ValueError, match="expected layers"):
        SpectralRegularizer(model, ["2"], progress=False).load_state_dict(saved["reg"])
    bad = {"format": 1, "layers": {n: dict(v) for n, v in saved["reg"]["layers"].items()}}
    bad["layers"]["2"]["basis"] = bad["layers"]["2"]["basis"].double()
    with pytest.raises(ValueError, match="expected basis float32"):
        restored.load_state_dict(bad)
    with pytest.raises(TypeError, match="state: expected a mapping"):
        restored.load_state_dict([1, 2])


def test_remove_and_context_manager_take_the_hooks_off():
    model = _bn_mlp()
    with SpectralRegularizer(model, ["2"], tau=3, progress=False) as reg:
        reg.refresh(_batches([40]))
        assert len(model[2]._forward_hooks) == 1
    assert len(model[2]._forward_hooks) == 0
    model.train()
    model(_batches([30])[0][0])
    assert reg._hooks.captured == {}


# --------------------------------------------------------------------------------------------
# autocast, torch.compile


def test_autocast_bfloat16_penalises_the_bfloat16_activations_and_casts_the_basis_once():
    """Under autocast the layers' outputs are bfloat16: the penalty is that of those
    activations in the basis cast once to bfloat16, value and gradient within the oracle's
    bounds for bfloat16 operands and float32 sums (tests/ops/oracle_checks.py)."""
    from tests import bounds
    from tests.ops.oracle_checks import expected_penalty

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 24), nn.Tanh(), nn.Linear(24, 3)
    )
    reg = SpectralRegularizer(model, ["1", "3"], tau=4, progress=False)
    x = torch.randn(300, 20)
    reg.refresh(x, batch_size=128)
    model.train()
    seen = {}
    for name in ("1", "3"):  # registered after the regulariser's hooks: the same outputs

        def keep(module, inputs, out, name=name):
            out.retain_grad()
            seen[name] = out

        model[int(name)].register_forward_hook(keep)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x[:96])
        assert out.dtype == torch.bfloat16
        value = reg.penalty()
    assert value.dtype == torch.float32
    value.backward()
    cast = reg._store.cast[(torch.bfloat16, x.device)]
    want, bound = 0.0, 0.0
    for name, h in seen.items():
        assert h.dtype == torch.bfloat16 and cast[name].dtype == torch.bfloat16
        R, dR, G, dG = expected_penalty(h.detach(), cast[name], backend="torch", tau=4)
        want, bound = want + float(R), bound + dR
        bounds.assert_within(h.grad, G, dG, f"layer {name}'s gradient",
                             floor=bounds.subnormal_spacing(torch.bfloat16))  # fmt: skip
    bounds.assert_within(value.detach(), torch.tensor(want), bound + 2 * 2.0**-24 * abs(want),
                         "the layers' total")  # fmt: skip
    cast = reg._store.cast[(torch.bfloat16, x.device)]["1"]
    assert cast.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x[:96])
        reg.penalty()
    assert reg._store.cast[(torch.bfloat16, x.device)]["1"] is cast


def test_torch_compile_of_the_model_fires_the_hooks():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 2)
    )
    x = torch.randn(64, 10)
    eager = SpectralRegularizer(model, ["1", "3"], tau=3, backend="torch", progress=False)
    eager.refresh(x)
    model.train()
    model(x)
    expected = eager.penalty()
    eager.remove()

    compiled = torch.compile(model, backend="aot_eager")
    reg = SpectralRegularizer(compiled, ["1", model[3]], tau=3, backend="torch", progress=False)
    assert reg.layer_names == ["1", "3"]
    reg.refresh(x)  # runs the original module eagerly
    for name in ("1", "3"):
        assert torch.equal(reg.basis(name), eager.basis(name))
    for _ in range(2):
        loss = compiled(x).sum() + reg.penalty()
        loss.backward()
    compiled(x)
    torch.testing.assert_close(reg.penalty(), expected, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------
# Issue 12 / 16: penalty dtype, graphs, reuse within a forward, checkpoint validation
# --------------------------------------------------------------------------------------------
def _small_setup(**kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 3))
    data = [(torch.randn(40, 12), torch.randint(0, 3, (40,))) for _ in range(2)]
    reg = SpectralRegularizer(model, ["1"], tau=3, progress=False, **kwargs)
    reg.refresh(data)
    return model, reg, data


def test_penalty_dtype_bfloat16_is_close_and_keeps_v_in_bfloat16():
    model, reg, data = _small_setup()
    model(data[0][0])
    full = reg.penalty()
    model16, reg16, _ = _small_setup(penalty_dtype=torch.bfloat16)
    model16(data[0][0])
    fast = reg16.penalty()
    assert fast.dtype == torch.float32
    assert abs(float(fast) / float(full) - 1) < 0.05
    (views,) = reg16._store.cast.values()
    assert views["1"].dtype == torch.bfloat16  # cast once per refresh, not per step
    with pytest.raises(TypeError, match="penalty_dtype: expected None"):
        SpectralRegularizer(model, ["1"], penalty_dtype=torch.float16, progress=False)


def test_refresh_updates_the_basis_in_place_for_captured_graphs():
    model, reg, data = _small_setup()
    model(data[0][0])
    reg.penalty()
    (views,) = reg._store.cast.values()
    before = views["1"].clone()
    pointer = views["1"].data_ptr()
    reg.refresh([(torch.randn(40, 12) * 3, None)])
    after = reg._store.cast[(torch.float32, torch.device("cpu"))]["1"]
    assert after.data_ptr() == pointer and not torch.equal(after, before)
    assert torch.equal(after, reg.basis("1"))


def test_layer_run_twice_in_one_forward_is_refused():
    layer = nn.Linear(6, 6)
    model = nn.Sequential(layer, nn.Tanh(), layer)
    reg = SpectralRegularizer(model, [layer], tau=2, progress=False)
    with pytest.raises(RuntimeError, match="ran twice in one forward pass"):
        model(torch.randn(20, 6))
    model.eval()
    model(torch.randn(20, 6))  # evaluation passes keep nothing and are not refused
    reg.remove()


def test_load_state_dict_validates_before_installing():
    model, reg, _ = _small_setup()
    good = reg.state_dict()
    with pytest.raises(TypeError, match="'layers' to map layer names"):
        reg.load_state_dict({"format": 1, "layers": 3})
    linear = SpectralRegularizer(model, ["0"], tau=3, progress=False)  # width known: 10
    wide = {"format": 1, "layers": {"0": {"basis": torch.eye(12),
                                          "eigenvalues": torch.ones(12, dtype=torch.float64)}}}
    with pytest.raises(ValueError, match="expected a basis for 10 features"):
        linear.load_state_dict(wide)
    with pytest.raises(ValueError, match="expected a basis for 10 features"):
        reg.load_state_dict({"format": 1, "layers": {"1": wide["layers"]["0"]}})  # refreshed
    fresh = SpectralRegularizer(model, ["1"], tau=3, progress=False)
    bad = {"format": 1, "layers": {"1": dict(good["layers"]["1"])}}
    bad["layers"]["1"]["basis"] = good["layers"]["1"]["basis"].clone()
    bad["layers"]["1"]["basis"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite basis"):
        fresh.load_state_dict(bad)
    assert not fresh.refreshed


def test_default_validation_is_deferred_and_modes_are_checked():
    model, reg, _ = _small_setup()
    assert reg.validate == "deferred"
    with pytest.raises(TypeError, match="validate: expected True, False or one of"):
        SpectralRegularizer(model, ["1"], validate="no", progress=False)


def test_triton_backend_takes_the_grouped_path_with_the_same_result(device):
    pytest.importorskip("triton")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 24), nn.Tanh(), nn.Linear(24, 3)
    ).to(device)  # CUDA when present: Triton runs CPU tensors only under the interpreter
    x = torch.randn(300, 20).to(device)
    values = {}
    for backend in ("torch", "triton"):
        reg = SpectralRegularizer(model, ["1", "3"], tau=4, backend=backend, progress=False,
                                  beta={"1": 1.0, "3": 2.0})  # fmt: skip
        reg.refresh(x, batch_size=128)
        model.zero_grad()
        model(x[:96])
        if backend == "triton":
            import powerlaw_fast.ops.grouped_penalty as module  # the stage calls it

            calls = []
            original = module.grouped_penalty_triton

            def counting(*args, calls=calls, original=original, **kwargs):
                calls.append(1)
                return original(*args, **kwargs)

            module.grouped_penalty_triton = counting
            try:
                value = reg.penalty()
            finally:
                module.grouped_penalty_triton = original
            assert calls == [1]
        else:
            value = reg.penalty()
        value.backward()
        values[backend] = (value.detach(), model[0].weight.grad.clone(), reg.spectra())
        reg.remove()
    (v_t, g_t, s_t), (v_g, g_g, s_g) = values["torch"], values["triton"]
    torch.testing.assert_close(v_g, v_t, rtol=2e-4, atol=0)
    torch.testing.assert_close(g_g, g_t, rtol=2e-3, atol=1e-7)
    for name in s_t:
        torch.testing.assert_close(s_g[name], s_t[name], rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("basis_update", ["epoch", "running", "tracked"])
def test_whole_training_step_under_torch_compile_matches_eager(basis_update):
    """forward, penalty, backward and Adam step compiled together (graph breaks allowed; the
    penalty runs as its custom ops), against the same steps run eagerly."""
    import copy

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(48, 12), torch.randint(0, 3, (48,))
    losses = {}
    for label in ("eager", "compiled"):
        model = copy.deepcopy(base)
        reg = SpectralRegularizer(model, ["1"], tau=3, backend="torch", progress=False,
                                  basis_update=basis_update)
        reg.refresh(x)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)

        def step(inputs, targets, model=model, reg=reg, opt=opt):
            loss = nn.functional.cross_entropy(model(inputs), targets) + reg.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
            return loss.detach()

        run = torch.compile(step, backend="aot_eager") if label == "compiled" else step
        losses[label] = torch.stack([run(x, y) for _ in range(3)])
        reg.remove()
    torch.testing.assert_close(losses["compiled"], losses["eager"], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# basis_update="running": the basis from a running average of the training batches' covariances


def _batch_cov(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().to(torch.float64)
    centred = x - x.mean(0)
    return centred.T @ centred / (x.shape[0] - 1)


def _running_setup(**kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3))
    outputs = {}
    model[1].register_forward_hook(lambda m, a, out: outputs.__setitem__("1", out))
    reg = SpectralRegularizer(model, ["1"], tau=3, progress=False, basis_update="running",
                              **kwargs)
    return model, reg, outputs


def test_running_basis_is_the_eigenbasis_of_the_ema_of_batch_covariances():
    model, reg, outputs = _running_setup(basis_momentum=0.25)
    assert not reg.refreshed and reg.running_covariance("1") is None
    expected = None
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        model(torch.randn(50, 12, generator=g) * 2)
        cov = _batch_cov(outputs["1"])
        expected = cov if expected is None else 0.75 * expected + 0.25 * cov
        reg.penalty().backward()
        torch.testing.assert_close(reg.running_covariance("1"), expected, rtol=1e-12, atol=1e-14)
        lam, V = reg.eigenvalues("1"), reg.basis("1").double()
        ref = torch.linalg.eigvalsh(expected).flip(0)
        torch.testing.assert_close(lam, ref, rtol=1e-10, atol=1e-14)
        # V diagonalises the running average, columns in descending eigenvalue order
        torch.testing.assert_close(V.T @ expected @ V, torch.diag(ref), rtol=0, atol=1e-6)
    reg.remove()


def test_running_basis_includes_the_current_batch_before_the_penalty():
    # momentum 1: V is the current batch's eigenbasis, so the projected per-batch spectrum is
    # that batch's eigenvalues and the penalty equals spec_penalty with that V
    model, reg, outputs = _running_setup(basis_momentum=1.0)
    for seed in (1, 2):
        model(torch.randn(60, 12, generator=torch.Generator().manual_seed(seed)))
        x = outputs["1"]
        value = reg.penalty()
        lam, V = torch.linalg.eigh(_batch_cov(x))
        V = V.flip(1).float()
        expected = spec_penalty(x.detach(), V, alpha=1.0, tau=3, beta=1.0)
        torch.testing.assert_close(value.detach(), expected, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(reg.spectra()["1"].double(), lam.flip(0), rtol=1e-4,
                                   atol=1e-6)
    reg.remove()


def test_running_basis_updates_every_k_steps_in_place():
    model, reg, _ = _running_setup(basis_every=3, basis_momentum=0.5)
    g = torch.Generator().manual_seed(5)
    snapshots, pointers = [], set()
    for _ in range(7):
        model(torch.randn(40, 12, generator=g) * 3)
        reg.penalty()
        (views,) = reg._store.cast.values()
        pointers.add((reg.basis("1").data_ptr(), views["1"].data_ptr()))
        snapshots.append(reg.basis("1").clone())
    assert len(pointers) == 1  # installed in place: CUDA graphs keep reading the same buffers
    changed = [i for i in range(1, 7) if not torch.equal(snapshots[i], snapshots[i - 1])]
    assert changed == [3, 6]
    torch.testing.assert_close(views["1"], reg.basis("1"), rtol=0, atol=0)
    reg.remove()


def test_running_basis_drives_the_true_spectrum_while_a_stale_one_does_not():
    """Penalty-only training of a small tanh layer: the true spectrum's distance to 1/n
    (the penalty with the true eigenbasis) falls further with a fresh basis."""
    results = {}
    data = torch.randn(400, 12, generator=torch.Generator().manual_seed(0)) * 2
    for mode in ("epoch", "running"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 16), nn.Tanh())
        reg = SpectralRegularizer(model, ["1"], tau=3, beta=10.0, progress=False,
                                  basis_update=mode)
        if mode == "epoch":
            reg.refresh(data)  # once: stale for the whole run
        opt = torch.optim.Adam(model.parameters(), lr=3e-2)
        for step in range(60):
            model(data[(step % 4) * 100 : (step % 4 + 1) * 100])
            loss = reg.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            out = model(data)
        lam, V = torch.linalg.eigh(_batch_cov(out))
        results[mode] = float(spec_penalty(out, V.flip(1).float(), alpha=1.0, tau=3, beta=10.0))
        reg.remove()
    assert results["running"] < 0.5 * results["epoch"], results


def test_running_basis_arguments_and_epoch_mode_unchanged():
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh())
    with pytest.raises(ValueError, match="basis_update: expected one of"):
        SpectralRegularizer(model, ["1"], basis_update="step", progress=False)
    with pytest.raises(ValueError, match="basis_momentum"):
        SpectralRegularizer(model, ["1"], basis_update="running", basis_momentum=1.5)
    with pytest.raises(ValueError, match="basis_momentum"):
        SpectralRegularizer(model, ["1"], basis_update="running", basis_momentum=0.0)
    with pytest.raises(ValueError, match="basis_every"):
        SpectralRegularizer(model, ["1"], basis_update="running", basis_every=0)
    reg = SpectralRegularizer(model, ["1"], tau=3, progress=False)
    assert reg.basis_update == "epoch"
    model(torch.randn(30, 12))
    with pytest.raises(RuntimeError, match="no eigenbasis yet"):
        reg.penalty()
    assert reg.running_covariance("1") is None
    reg.remove()
    running = SpectralRegularizer(model, ["1"], tau=20, progress=False, basis_update="running")
    model(torch.randn(30, 12))
    with pytest.raises(ValueError, match="tau for layer '1'"):
        running.penalty()  # a width below tau is refused at the first eigendecomposition
    running.remove()


@pytest.mark.parametrize("basis_update", ["running", "tracked"])
def test_running_basis_on_the_grouped_triton_path(device, basis_update):
    pytest.importorskip("triton")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 24), nn.Tanh(),
                         nn.Linear(24, 3)).to(device)  # CUDA when present (see above)
    x = torch.randn(144, 20).to(device)
    values = {}
    for backend in ("torch", "triton"):
        reg = SpectralRegularizer(base, ["1", "3"], tau=4, backend=backend, progress=False,
                                  basis_update=basis_update, basis_momentum=0.5)
        out = []
        for i in range(3):
            base.zero_grad()
            base(x[i * 48 : (i + 1) * 48] * (1 + i))
            value = reg.penalty()
            value.backward()
            out.append(value.detach())
        values[backend] = (torch.stack(out), base[0].weight.grad.clone())
        reg.remove()
    torch.testing.assert_close(values["triton"][0], values["torch"][0], rtol=2e-4, atol=0)
    torch.testing.assert_close(values["triton"][1], values["torch"][1], rtol=2e-3, atol=1e-7)


# --------------------------------------------------------------------------------------------
# found by `nox -s mutants -- training/regulariser.py` (issue 28): each test below fails for a
# one-line change of regulariser.py that the tests above let through


def _tanh_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))


def test_the_defaults_are_alpha_1_tau_10_beta_1():
    reg = SpectralRegularizer(_tanh_mlp(), ["1"], progress=False)
    assert reg.settings("1") == {"alpha": 1.0, "tau": 10, "beta": 1.0}


def test_a_compiled_model_is_unwrapped_without_compiling_it():
    from powerlaw_fast.training.regulariser import _unwrap_compiled

    model = _tanh_mlp()
    wrapper = nn.Module()
    wrapper._orig_mod = model  # what torch.compile's OptimizedModule holds
    assert _unwrap_compiled(wrapper) is model and _unwrap_compiled(model) is model
    reg = SpectralRegularizer(wrapper, ["1"], tau=2, progress=False)
    assert reg.layer_names == ["1"]  # the original's names, not "_orig_mod.1"
    x = torch.randn(40, 6)
    reg.refresh(x)
    lam_ref, _ = _reference_eigh(_activations(model, {"1": model[1]}, x)["1"])
    torch.testing.assert_close(reg.eigenvalues("1"), lam_ref, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(basis_momentum=0.0), ValueError,
         r"^basis_momentum: expected a finite number > 0\.0, got 0\.0$"),
        (dict(tau=2**30 + 1), ValueError,
         r"^tau: expected an integer in 0\.\.1073741824, got 1073741825$"),
        (dict(layers=[]), ValueError,
         r"^layers: expected at least one layer to regularise, got none$"),
        (dict(layers=["zz"]), ValueError, r"^layers: no submodule 'zz' in the model"),
    ],
)
def test_constructor_errors_name_the_argument(kwargs, exc, match):
    kwargs = {"layers": ["1"], "progress": False, **kwargs}
    with pytest.raises(exc, match=match):
        SpectralRegularizer(_tanh_mlp(), kwargs.pop("layers"), **kwargs)


def test_the_largest_tau_and_refresh_batch_are_accepted_and_larger_ones_refused():
    reg = SpectralRegularizer(_tanh_mlp(), ["1"], tau=2**30, convention="authors",
                              progress=False)
    assert reg.settings("1")["tau"] == 2**30
    reg = SpectralRegularizer(_tanh_mlp(), ["1"], tau=2, progress=False)
    reg.refresh(torch.randn(8, 6), batch_size=2**30)
    assert reg.refreshed
    with pytest.raises(ValueError,
                       match=r"^batch_size: expected an integer in 1\.\.1073741824, got "
                             r"1073741825$"):
        reg.refresh(torch.randn(8, 6), batch_size=2**30 + 1)


def test_misuse_messages_say_what_to_do():
    reg = SpectralRegularizer(_tanh_mlp(), ["1"], tau=2, progress=False)
    with pytest.raises(RuntimeError, match=(
        r"^SpectralRegularizer: no eigenbasis yet; call reg\.refresh\(train_loader\) \(at each "
        r"epoch start\) or reg\.load_state_dict\(\.\.\.\) before reg\.penalty\(\)$")):
        reg.basis("1")
    with pytest.raises(ValueError,
                       match=r"^layer: unknown layer 'zz'; regularised layers: \['1'\]$"):
        reg.running_covariance("zz")
    with pytest.raises(ValueError, match=r"^state: expected format 1 or 2, got 7$"):
        reg.load_state_dict({"format": 7, "layers": {}})


def test_tracked_mode_with_a_bfloat16_penalty_tracks_with_bfloat16_operands():
    from powerlaw_fast.training._tracked_basis import track_eigenbasis

    model = _tanh_mlp()
    reg = SpectralRegularizer(model, ["1"], tau=2, progress=False, backend="torch",
                              basis_update="tracked", basis_momentum=0.5,
                              penalty_dtype=torch.bfloat16)
    x = torch.randn(64, 6)
    reg.refresh(x)
    V0, lam0 = reg.basis("1").clone(), reg.eigenvalues("1").clone()
    x2 = torch.randn(64, 6)
    h = model[1](model[0](x2))
    reg.penalty()
    V, lam = track_eigenbasis(V0, lam0, h, momentum=0.5, step=0, operand_dtype=torch.bfloat16)
    assert torch.equal(reg.basis("1"), V) and torch.equal(reg.eigenvalues("1"), lam)
    V32, _ = track_eigenbasis(V0, lam0, h, momentum=0.5, step=0)
    assert not torch.equal(V32, V)  # float32 operands would give another basis


def test_over_a_process_group_the_refresh_is_of_all_ranks_rows_and_only_rank_0_draws(
        monkeypatch, capsys):
    from tests.distributed_utils import ThreadGroup

    x = torch.randn(30, 6)
    shards = [x[:13], x[13:]]
    # the group's ranks are the global ranks 4 and 7: its rank 0 (global 4) draws the bar
    group = ThreadGroup([4, 7]).patch(monkeypatch)
    token = object()
    models = [_tanh_mlp(), _tanh_mlp()]  # one replica per rank, equal weights
    model = models[0]

    def body(rank):
        reg = SpectralRegularizer(models[rank], ["1"], tau=2, progress=True,
                                  process_group=token)
        reg.refresh(shards[rank], batch_size=8)
        return reg.eigenvalues("1"), reg.basis("1")

    results = group.run(body)
    lam_ref, V_ref = _reference_eigh(_activations(model, {"1": model[1]}, x)["1"])
    for lam, V in results:
        _assert_same_eigensystem(lam, V, lam_ref, V_ref)
    assert torch.equal(results[0][1], results[1][1])
    assert group.groups and all(g is token for g in group.groups)
    assert capsys.readouterr().err.count("spectral refresh:   0%") == 1

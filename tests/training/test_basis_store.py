"""The regulariser's eigenbases (training/_basis_store.py): one flat buffer per dtype and device,
and a checkpoint's layers read back with every check made before anything is installed.

Found by `nox -s mutants -- training/_basis_store.py` (issue 28): each test fails for a one-line
change of _basis_store.py that the regulariser's tests let through."""

import pytest
import torch

from powerlaw_fast.training._basis_store import BasisStore, read_layers

WIDTHS = {"a": 3, "b": 2, "c": 4}


def bases():
    """A distinct orthonormal basis per layer (signed permutations) and its eigenvalues."""
    basis, values = {}, {}
    for k, (name, n) in enumerate(WIDTHS.items()):
        perm = torch.roll(torch.eye(n), shifts=k + 1, dims=1)
        basis[name] = perm * torch.tensor([(-1.0) ** (i + k) for i in range(n)])
        values[name] = torch.arange(n, 0, -1, dtype=torch.float64) + k
    return basis, values


def test_views_of_three_layers_are_each_layers_basis_in_one_buffer():
    store = BasisStore(list(WIDTHS))
    basis, values = bases()
    store.install(dict(basis), values)
    views = store.views(torch.float64, torch.device("cpu"))
    for name in WIDTHS:
        assert views[name].dtype == torch.float64 and torch.equal(views[name],
                                                                   basis[name].double())
    flat = views["a"].untyped_storage()
    assert all(v.untyped_storage().data_ptr() == flat.data_ptr() for v in views.values())
    assert [v.storage_offset() for v in views.values()] == [0, 9, 13]


def test_views_are_on_the_asked_device():
    # the meta device stands in for a GPU: a buffer left on the CPU would show
    store = BasisStore(list(WIDTHS))
    store.install(*bases())
    views = store.views(torch.bfloat16, torch.device("meta"))
    assert all(v.device.type == "meta" and v.dtype == torch.bfloat16 for v in views.values())
    assert [tuple(v.shape) for v in views.values()] == [(3, 3), (2, 2), (4, 4)]


def checkpoint():
    basis, values = bases()
    return {n: {"basis": basis[n], "eigenvalues": values[n]} for n in WIDTHS}


CPU = torch.device("cpu")


def read(entries, device=CPU):
    return read_layers(entries, list(WIDTHS), known_width=lambda n: None,
                       check_tau=lambda n, N: None, device_of=lambda n: device)


def test_read_layers_copies_onto_each_layers_device():
    entries = checkpoint()
    basis, values = read(entries)
    for name in WIDTHS:
        assert torch.equal(basis[name], entries[name]["basis"])
        assert torch.equal(values[name], entries[name]["eigenvalues"])
    # copies: changing the checkpoint's tensors afterwards changes nothing installed
    for name in WIDTHS:
        entries[name]["basis"].zero_()
        entries[name]["eigenvalues"].zero_()
    again, _ = read(checkpoint())
    for name in WIDTHS:
        assert torch.equal(basis[name], again[name]) and bool((values[name] > 0).all())
    on_meta, values_meta = read(checkpoint(), torch.device("meta"))
    assert all(t.device.type == "meta" for t in [*on_meta.values(), *values_meta.values()])


def with_layer(name, **entry):
    entries = checkpoint()
    entries[name] = {**entries[name], **entry}
    return entries


@pytest.mark.parametrize(
    "entries,exc,match",
    [
        ([1, 2], TypeError, r"^state: expected 'layers' to map layer names to their basis and "
                            r"eigenvalues, got list$"),
        (with_layer("b", eigenvalues=[2.0, 1.0]), TypeError,
         r"^state: layer 'b': expected tensors for basis and eigenvalues$"),
        # eigenvalues [1, 1] with a [1, 1] basis: not the [N] vector, whatever N
        ({**checkpoint(), "b": {"basis": torch.eye(1),
                                "eigenvalues": torch.ones(1, 1, dtype=torch.float64)}},
         ValueError, r"^state: layer 'b': expected basis float32 \[N, N\] and eigenvalues "
                     r"float64 \[N\], got torch\.float32 \(1, 1\) and torch\.float64 \(1, 1\)$"),
        (with_layer("c", eigenvalues=torch.ones(3, dtype=torch.float64)), ValueError,
         r"^state: layer 'c': expected basis float32 \[N, N\] and eigenvalues float64 \[N\], "
         r"got torch\.float32 \(4, 4\) and torch\.float64 \(3,\)$"),
    ],
)
def test_read_layers_refuses_malformed_entries(entries, exc, match):
    with pytest.raises(exc, match=match):
        read(entries)

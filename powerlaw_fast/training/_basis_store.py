"""The regulariser's eigenbases: installed in place, cast once per dtype and device into one
flat buffer (the grouped kernels read every layer's V from it), and read back from a
checkpoint with every check made before anything is installed.

Example::

    >>> import torch
    >>> from powerlaw_fast.training._basis_store import BasisStore
    >>> store = BasisStore(["a", "b"])
    >>> ones = {n: torch.ones(n, dtype=torch.float64) for n in (3, 2)}
    >>> store.install({"a": torch.eye(3), "b": torch.eye(2)}, {"a": ones[3], "b": ones[2]})
    >>> views = store.views(torch.bfloat16, torch.device("cpu"))
    >>> views["a"].dtype, views["b"].shape
    (torch.bfloat16, torch.Size([2, 2]))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from powerlaw_fast._validation import check_orthonormal


class BasisStore:
    """``basis[name]`` float32 ``[N, N]`` (eigenvectors as columns, descending eigenvalues) and
    ``eigenvalues[name]`` float64 ``[N]`` per layer, in layer order ``names``."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.basis: dict[str, torch.Tensor] = {}
        self.eigenvalues: dict[str, torch.Tensor] = {}
        # (dtype, device) -> {layer: V}, every layer's V a view of one flat buffer
        self.cast: dict[tuple[torch.dtype, torch.device], dict[str, torch.Tensor]] = {}

    def __bool__(self) -> bool:
        return bool(self.basis)

    def install(self, basis: dict, values: dict) -> None:
        """Make ``basis`` and ``values`` current. In place where the shapes allow: a CUDA graph
        captured around the penalty keeps reading the same V buffers, so a refresh outside the
        graph stays visible to its replays."""
        for key, views in list(self.cast.items()):
            if all(views[n].shape == basis[n].shape for n in views):
                for n, view in views.items():
                    view.copy_(basis[n])
            else:
                del self.cast[key]
        for name, V in basis.items():
            old = self.basis.get(name)
            if old is not None and old.shape == V.shape and old.device == V.device:
                basis[name] = old.copy_(V)
        self.basis = basis
        self.eigenvalues = values

    def views(self, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
        """Every layer's V in ``dtype`` on ``device``, as views of one flat buffer: cast once
        per installed basis (under autocast, or with a penalty dtype), updated in place after."""
        key = (dtype, device)
        views = self.cast.get(key)
        if views is None:
            flat = torch.cat(
                [self.basis[n].to(device=device, dtype=dtype).flatten() for n in self.names]
            )
            views, offset = {}, 0
            for name in self.names:
                N = self.basis[name].shape[0]
                views[name] = flat[offset : offset + N * N].view(N, N)
                offset += N * N
            self.cast[key] = views
        return views

    def state(self) -> dict:
        return {
            name: {"basis": self.basis[name], "eigenvalues": self.eigenvalues[name]}
            for name in self.names
        }


def read_layers(
    entries,
    names: list[str],
    *,
    known_width: Callable[[str], int | None],
    check_tau: Callable[[str, int], None],
    device_of: Callable[[str], torch.device],
) -> tuple[dict, dict]:
    """The ``"layers"`` of a checkpoint -> (bases, eigenvalues) on each layer's device, after
    checking types, shapes, widths, finiteness, tau and the bases' orthonormality."""
    if not isinstance(entries, Mapping):
        raise TypeError(
            f"state: expected 'layers' to map layer names to their basis and eigenvalues, "
            f"got {type(entries).__name__}"
        )
    if set(entries) != set(names):
        raise ValueError(f"state: expected layers {sorted(names)}, got {sorted(entries)}")
    basis, values = {}, {}
    for name in names:
        V, lam = entries[name]["basis"], entries[name]["eigenvalues"]
        if not (isinstance(V, torch.Tensor) and isinstance(lam, torch.Tensor)):
            raise TypeError(f"state: layer {name!r}: expected tensors for basis and eigenvalues")
        N = lam.shape[0] if lam.dim() == 1 else -1
        if V.dtype != torch.float32 or lam.dtype != torch.float64 or V.shape != (N, N):
            raise ValueError(
                f"state: layer {name!r}: expected basis float32 [N, N] and eigenvalues float64 "
                f"[N], got {V.dtype} {tuple(V.shape)} and {lam.dtype} {tuple(lam.shape)}"
            )
        width = known_width(name)
        if width is not None and width != N:
            raise ValueError(
                f"state: layer {name!r}: expected a basis for {width} features (the layer's "
                f"width), got one for {N}"
            )
        if not (torch.isfinite(V).all() and torch.isfinite(lam).all()):
            raise ValueError(
                f"state: layer {name!r}: expected finite basis and eigenvalues, got NaN or inf"
            )
        check_tau(name, N)
        check_orthonormal(V, f"state: layer {name!r}: basis")
        device = device_of(name)
        basis[name] = V.detach().to(device, copy=True)
        values[name] = lam.detach().to(device, copy=True)
    return basis, values

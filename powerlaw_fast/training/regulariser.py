"""Whole-model spectral regularisation: eigenbasis refresh, activation hooks, per-layer penalty sum.

The training scheme of Nassar et al. (2020), sec. 3.2 (DESIGN.md sections 2 and 3):

1. At each epoch start, :meth:`SpectralRegularizer.refresh` runs the model once over the training
   set (eval mode, no gradients), accumulates every regularised layer's activation covariance in
   float64 in one streaming pass, and takes a float64 symmetric eigendecomposition per layer.
   The eigenvectors ``V`` ([N, N], columns in descending eigenvalue order) are kept constant
   until the next refresh and are never differentiated.
2. Every training step, forward hooks keep each layer's output of the latest training forward
   pass, and :meth:`SpectralRegularizer.penalty` returns
   ``sum_layers spec_penalty(x_layer, V_layer; alpha, tau, beta)`` to add to the loss.

Optionally (``basis_update="running"``) the basis follows training instead of the epoch
refresh: :meth:`SpectralRegularizer.penalty` folds each layer's covariance of the batch it
penalises into a float64 running average (exponential, weight ``basis_momentum`` on the newest
batch; no extra forward pass) and every ``basis_every`` penalties installs the running
average's eigenvectors as ``V`` in place. A stale ``V`` lets the network satisfy the penalty by
rotating its spectrum instead of flattening it; a basis at most a step old is what moves the
tail of the spectrum onto 1/n (issue 15's measurements). Cost per layer: one ``[B, N]``
float64 GEMM per step and one ``N x N`` float64 ``eigh`` every ``basis_every`` steps.

When the hooks keep activations: only in a forward pass that runs with gradients enabled while
the layer is in training mode, i.e. the training forward. Evaluation passes (``model.eval()``,
``torch.no_grad()``, adversarial attacks on an eval-mode model) leave nothing behind, so they
neither hold memory nor get penalised by mistake. :meth:`~SpectralRegularizer.refresh` has its
own capture path. Between two penalties the latest training forward wins (e.g. with gradient
accumulation over micro-batches, call ``penalty()`` after each micro-batch's forward).

Batch size: the per-batch spectrum estimate needs ``B >= 1.5 N`` rows for an N-wide layer (the
paper's rule; below ``B = N`` the batch covariance is rank-deficient and its tail is zero). The
regulariser warns once per layer when ``B < N``.

Example::

    >>> import torch
    >>> from torch import nn
    >>> from powerlaw_fast.training.regulariser import SpectralRegularizer
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 3))
    >>> data = [(torch.randn(40, 20), torch.randint(0, 3, (40,))) for _ in range(3)]
    >>> reg = SpectralRegularizer(model, ["1"], tau=5, progress=False)
    >>> reg.refresh(data)
    >>> x, y = data[0]
    >>> loss = nn.functional.cross_entropy(model(x), y) + reg.penalty()
    >>> loss.backward()
    >>> reg.basis("1").shape, reg.eigenvalues("1").dtype
    (torch.Size([16, 16]), torch.float64)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from powerlaw_fast._backend import BACKENDS, resolve_backend
from powerlaw_fast._torch_helpers import StopForward, eval_mode, find_submodule, module_device
from powerlaw_fast._validation import check_int_range, check_orthonormal, check_real
from powerlaw_fast.ops import status
from powerlaw_fast.ops._settings import CONVENTIONS
from powerlaw_fast.ops._settings import anchor_index as _anchor_index
from powerlaw_fast.ops.grouped_penalty import can_group, grouped_penalty_triton
from powerlaw_fast.ops.spectral_penalty import penalty_and_spectrum
from powerlaw_fast.ops.status import DeferredValidationError, validation_mode
from powerlaw_fast.training.accumulator import CovarianceAccumulator, eigh_descending
from powerlaw_fast.training.capture import iterate_inputs, model_device

STATE_FORMAT = 2  # the layout of state_dict() (2 adds the running basis); 1 is still read
BASIS_UPDATES = ("epoch", "running")


def _in_backward() -> bool:
    """True while autograd runs a backward pass: activation checkpointing recomputes the
    forward there, and that recomputation is not a new training forward."""
    return torch._C._current_graph_task_id() != -1


def _reused_layer_error(name: str) -> RuntimeError:
    return RuntimeError(
        f"layer {name!r} ran twice in one forward pass: its basis describes one use and the "
        f"penalty would see another; a module reused within the forward cannot be regularised "
        f"(wrap each use in its own module)"
    )


def _unwrap_compiled(model: nn.Module) -> nn.Module:
    # torch.compile(model) returns a wrapper whose submodule names gain an "_orig_mod." prefix;
    # the hooks belong on the original modules (which the compiled forward runs) and the
    # refresh runs the original eagerly, so it does not trigger recompilation in eval mode.
    original = getattr(model, "_orig_mod", None)
    return original if isinstance(original, nn.Module) else model


class SpectralRegularizer:
    """The 1/n spectral penalty summed over several layers of a model, with the epoch refresh.

    Args:
        model: the network (an ``nn.Module``; a ``torch.compile``'d model is unwrapped, and the
            hooks, on its original submodules, fire in the compiled forward too).
        layers: the regularised layers, a non-empty list of submodules of ``model`` or of their
            names (``model.get_submodule`` paths such as ``"blocks.hidden1"``; models with a
            ``hidden_layers()`` method also accept those names, e.g. ``"hidden1"``). A layer's
            output ``[B, *]`` is flattened per sample to ``[B, N]``.
        alpha: power-law exponent > 0, one value or a mapping layer -> value.
        tau: anchor rank (see ``convention``), one value or a mapping layer -> value.
        beta: penalty strength >= 0, one value or a mapping layer -> value. A mapping is keyed by
            the layer names (:attr:`layer_names`) or by the modules, and must name every layer.
        convention: ``"paper"`` (tau 1-indexed) or ``"authors"`` (josuenassar/power_law: tau
            0-indexed, non-positive terms skipped); see :func:`~powerlaw_fast.spec_penalty`.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"`` for the penalty ops.
        progress: show a tqdm progress bar during :meth:`refresh`.
        validate: how the penalty reports non-finite activations and a zero anchor eigenvalue:
            ``"deferred"`` (default: no host synchronisation; on a GPU the error is raised by
            the next step's penalty or by :func:`powerlaw_fast.raise_pending_errors`),
            ``"immediate"`` / True (one synchronisation per layer and step) or ``"off"`` /
            False. Nothing is checked inside a CUDA graph.
        penalty_dtype: None (the penalty's GEMMs in the activations' dtype) or
            ``torch.bfloat16``: bfloat16 GEMM operands with float32 sums, also for a float32
            model. A batch of B rows estimates each eigenvalue with a sampling error of about
            sqrt(2 / B) (3.7% at B = 1500); bfloat16 rounding moves each value by about 0.4%,
            a small fraction of that, for a fraction of the GEMM time.
        process_group: a ``torch.distributed`` group whose ranks each see a shard of every batch
            (and of the refresh data, e.g. through a ``DistributedSampler``). The refresh merges
            the ranks' moments (one all-reduce of N^2 + N + 1 floats per layer and epoch) and
            broadcasts rank 0's eigenbasis, so every rank holds the same V; the penalty is that
            of the global batch (all-reduces of N + 1 and N floats per layer and step). Under
            ``DistributedDataParallel``, which averages gradients over ranks, add
            ``world_size * reg.penalty()`` to each rank's loss to get the single-process
            gradient.

        basis_update: where ``V`` comes from. ``"epoch"`` (default, the paper's scheme): only
            :meth:`refresh` (a pass over the data, once per epoch) and :meth:`load_state_dict`
            set it. ``"running"``: each :meth:`penalty` also folds the covariance of the batch
            it penalises (training-mode activations, float64) into a running average and, on
            its first call and every ``basis_every`` calls after, installs that average's
            eigenvectors in place (before computing the penalty, so the basis includes the
            current batch); :meth:`refresh` is then optional (it sets ``V`` but leaves the
            running average alone). Cost: one ``[B, N]`` float64 GEMM per layer and step plus
            one ``N x N`` float64 ``eigh`` per layer every ``basis_every`` steps. The update is
            not CUDA-graph capturable (``eigh`` synchronises): capture the rest of the step, or
            use ``"epoch"``. With a ``process_group`` the batch moments are all-reduced and
            rank 0's eigenvectors broadcast.
        basis_every: with ``basis_update="running"``, penalty calls between two
            eigendecompositions (default 1: every step; issue 15 found that a basis more than a
            few steps old leaves the spectrum's tail where vanilla training puts it).
        basis_momentum: with ``basis_update="running"``, the weight of the newest batch's
            covariance in the running average, in (0, 1] (default 0.1: about the last 10
            batches; 1 = the current batch only, which over-shoots at ``B`` near ``N``).

    Attributes:
        layer_names: the names of the regularised layers, in the order given.
    """

    def __init__(
        self,
        model: nn.Module,
        layers,
        *,
        alpha=1.0,
        tau=10,
        beta=1.0,
        convention: str = "paper",
        backend: str = "auto",
        progress: bool = True,
        validate: bool | str = "deferred",
        penalty_dtype: torch.dtype | None = None,
        process_group=None,
        basis_update: str = "epoch",
        basis_every: int = 1,
        basis_momentum: float = 0.1,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        self._model = _unwrap_compiled(model)
        if convention not in CONVENTIONS:
            raise ValueError(f"convention: expected one of {CONVENTIONS}, got {convention!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        self.convention = convention
        self.backend = backend
        self.progress = bool(progress)
        self.validate = validation_mode(validate)
        if penalty_dtype not in (None, torch.float32, torch.bfloat16):
            raise TypeError(
                f"penalty_dtype: expected None, torch.float32 or torch.bfloat16, got "
                f"{penalty_dtype}"
            )
        self.penalty_dtype = penalty_dtype
        self.process_group = process_group
        if basis_update not in BASIS_UPDATES:
            raise ValueError(
                f"basis_update: expected one of {BASIS_UPDATES}, got {basis_update!r}"
            )
        self.basis_update = basis_update
        self.basis_every = check_int_range(basis_every, "basis_every", 1, 1 << 30)
        self.basis_momentum = check_real(basis_momentum, "basis_momentum", low=0.0,
                                         low_inclusive=False)
        if self.basis_momentum > 1.0:
            raise ValueError(f"basis_momentum: expected a number in (0, 1], got {basis_momentum}")
        # running mode: name -> float64 running covariance [N, N]; penalty calls so far
        self._running: dict[str, torch.Tensor] = {}
        self._running_steps = 0

        self._modules: dict[str, nn.Module] = {}
        for entry in self._as_layer_list(layers):
            name, module = self._resolve(entry)
            if name in self._modules or any(m is module for m in self._modules.values()):
                raise ValueError(f"layers: layer {name!r} is listed twice")
            self._modules[name] = module
        self.layer_names: list[str] = list(self._modules)

        def positive(v, what):
            return check_real(v, what, low=0.0, low_inclusive=False)

        def non_negative(v, what):
            return check_real(v, what, low=0.0, low_inclusive=True)

        def integer(v, what):
            return check_int_range(v, what, 0, 1 << 30)

        self._alpha = self._per_layer(alpha, "alpha", positive)
        self._tau = self._per_layer(tau, "tau", integer)
        self._beta = self._per_layer(beta, "beta", non_negative)

        self._basis: dict[str, torch.Tensor] = {}
        self._eigenvalues: dict[str, torch.Tensor] = {}
        # (dtype, device) -> {layer: V}, every layer's V a view of one flat buffer (the grouped
        # kernels read all layers' bases from it)
        self._cast_basis: dict[tuple[torch.dtype, torch.device], dict[str, torch.Tensor]] = {}
        self._captured: dict[str, torch.Tensor] = {}
        self._latest_spectrum: dict[str, torch.Tensor] = {}
        self._small_batch_warned: set[str] = set()
        self._refresh_sink = None  # set during refresh(): called with (name, output)
        self._fired: set[str] = set()  # layers that ran in the current call of the model
        self._model_depth = 0  # calls of the model in progress (its forward, possibly nested)
        self._versions: dict[str, int] = {}  # name -> the kept output's version at capture
        self._steps = 0  # penalty() calls, for the errors' "step"
        self._handles = [
            module.register_forward_hook(self._make_hook(name))
            for name, module in self._modules.items()
        ]
        self._handles.append(self._model.register_forward_pre_hook(self._enter_model))
        self._handles.append(
            self._model.register_forward_hook(self._leave_model, always_call=True)
        )

    # ----------------------------------------------------------------------------------------
    # Construction helpers
    @staticmethod
    def _as_layer_list(layers) -> list:
        if isinstance(layers, (str, nn.Module)) or not isinstance(layers, Iterable):
            raise TypeError(
                f"layers: expected a list of modules or module names, got {type(layers).__name__}"
            )
        layers = list(layers)
        if not layers:
            raise ValueError("layers: expected at least one layer to regularise, got none")
        return layers

    def _resolve(self, entry) -> tuple[str, nn.Module]:
        if isinstance(entry, str) and not entry:
            raise ValueError("layers: the model itself ('') cannot be a regularised layer")
        name, module = find_submodule(self._model, entry, "layers")
        if not name:
            raise ValueError("layers: the model itself cannot be a regularised layer")
        return name, module

    def _layer_name(self, key, what: str) -> str:
        if isinstance(key, str):
            if key in self._modules:
                return key
            raise ValueError(
                f"{what}: unknown layer {key!r}; regularised layers: {self.layer_names}"
            )
        if isinstance(key, nn.Module):
            for name, module in self._modules.items():
                if module is key:
                    return name
            raise ValueError(
                f"{what}: the given {type(key).__name__} is not one of the regularised layers "
                f"{self.layer_names}"
            )
        raise TypeError(f"{what}: expected a layer name or module, got {type(key).__name__}")

    def _per_layer(self, value, what: str, check) -> dict[str, float | int]:
        if not isinstance(value, Mapping):
            checked = check(value, what)
            return {name: checked for name in self.layer_names}
        settings = {}
        for key, v in value.items():
            name = self._layer_name(key, f"{what} (mapping key)")
            if name in settings:
                raise ValueError(f"{what}: layer {name!r} is given twice in the mapping")
            settings[name] = check(v, f"{what}[{name!r}]")
        missing = [n for n in self.layer_names if n not in settings]
        if missing:
            raise ValueError(f"{what}: the mapping has no value for layers {missing}")
        return settings

    def _enter_model(self, module, args) -> None:
        if self._model_depth == 0:
            self._fired.clear()
        self._model_depth += 1

    def _leave_model(self, module, args, output) -> None:
        self._model_depth = max(0, self._model_depth - 1)

    def _make_hook(self, name: str):
        def hook(module, args, output):
            sink = self._refresh_sink
            if sink is not None:
                sink(name, output)
            elif module.training and torch.is_grad_enabled() and not _in_backward():
                # Reuse is checked within one call of the model; a layer called outside it
                # (``model[:2](x)``, the layer itself) is a forward of its own, latest wins.
                if self._model_depth > 0:
                    if name in self._fired:
                        raise _reused_layer_error(name)
                    self._fired.add(name)
                self._captured[name] = output
                if isinstance(output, torch.Tensor) and not torch.compiler.is_compiling():
                    self._versions[name] = output._version

        return hook

    # ----------------------------------------------------------------------------------------
    # Settings and state
    def settings(self, layer) -> dict:
        """``{"alpha", "tau", "beta"}`` used for ``layer`` (a name or module)."""
        name = self._layer_name(layer, "layer")
        return {"alpha": self._alpha[name], "tau": self._tau[name], "beta": self._beta[name]}

    @property
    def refreshed(self) -> bool:
        """True once :meth:`refresh` (or :meth:`load_state_dict`) has provided the eigenbases."""
        return bool(self._basis)

    def basis(self, layer) -> torch.Tensor:
        """``V [N, N]`` float32 of ``layer``: eigenvectors as columns, descending eigenvalues."""
        name = self._layer_name(layer, "layer")
        self._require_refreshed()
        return self._basis[name]

    def eigenvalues(self, layer) -> torch.Tensor:
        """Eigenvalues ``[N]`` float64, descending, of ``layer``'s covariance over the data set."""
        name = self._layer_name(layer, "layer")
        self._require_refreshed()
        return self._eigenvalues[name]

    def spectra(self) -> dict[str, torch.Tensor]:
        """Name -> the per-batch spectrum ``[N]`` of the latest :meth:`penalty` call, sorted in
        descending order and detached (float32; float64 for float64 activations), for logging.
        Layers whose penalty has not been computed since the last refresh are absent."""
        return {
            name: lam.sort(descending=True).values
            for name, lam in self._latest_spectrum.items()
        }

    def state_dict(self) -> dict:
        """The basis state for a checkpoint: eigenbases and eigenvalues per layer and, with
        ``basis_update="running"``, the running covariances and the number of penalty calls
        (so that a resumed run installs the same basis on the same step as an uninterrupted
        one)."""
        self._require_refreshed()
        return {
            "format": STATE_FORMAT,
            "layers": {
                name: {"basis": self._basis[name], "eigenvalues": self._eigenvalues[name]}
                for name in self.layer_names
            },
            "running": {name: cov for name, cov in self._running.items()},
            "running_steps": self._running_steps,
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore the eigenbases of :meth:`state_dict` exactly (bitwise), each moved to its
        layer's device (the device of the layer's parameters, else of the model's)."""
        if not isinstance(state, Mapping) or "layers" not in state:
            raise TypeError("state: expected a mapping from SpectralRegularizer.state_dict()")
        if state.get("format") not in (1, STATE_FORMAT):
            raise ValueError(
                f"state: expected format 1 or {STATE_FORMAT}, got {state.get('format')!r}"
            )
        entries = state["layers"]
        if not isinstance(entries, Mapping):
            raise TypeError(
                f"state: expected 'layers' to map layer names to their basis and eigenvalues, "
                f"got {type(entries).__name__}"
            )
        if set(entries) != set(self.layer_names):
            raise ValueError(
                f"state: expected layers {sorted(self.layer_names)}, got {sorted(entries)}"
            )
        basis, values = {}, {}
        fallback = model_device(self._model)
        for name in self.layer_names:
            V, lam = entries[name]["basis"], entries[name]["eigenvalues"]
            if not (isinstance(V, torch.Tensor) and isinstance(lam, torch.Tensor)):
                raise TypeError(
                    f"state: layer {name!r}: expected tensors for basis and eigenvalues"
                )
            N = lam.shape[0] if lam.dim() == 1 else -1
            if V.dtype != torch.float32 or lam.dtype != torch.float64 or V.shape != (N, N):
                raise ValueError(
                    f"state: layer {name!r}: expected basis float32 [N, N] and eigenvalues float64 "
                    f"[N], got {V.dtype} {tuple(V.shape)} and {lam.dtype} {tuple(lam.shape)}"
                )
            width = self._known_width(name)
            if width is not None and width != N:
                raise ValueError(
                    f"state: layer {name!r}: expected a basis for {width} features (the layer's "
                    f"width), got one for {N}"
                )
            if not (torch.isfinite(V).all() and torch.isfinite(lam).all()):
                raise ValueError(
                    f"state: layer {name!r}: expected finite basis and eigenvalues, got NaN or inf"
                )
            self._check_tau(name, N)
            check_orthonormal(V, f"state: layer {name!r}: basis")
            device = module_device(self._modules[name], fallback)
            basis[name] = V.detach().to(device, copy=True)
            values[name] = lam.detach().to(device, copy=True)
        running = self._running_state(state, basis)
        self._install(basis, values)
        self._running = running
        self._running_steps = int(state.get("running_steps", 0))

    def _running_state(self, state: Mapping, basis: dict) -> dict[str, torch.Tensor]:
        """The running covariances of a checkpoint, checked against the bases' widths."""
        entries = state.get("running") or {}
        if not isinstance(entries, Mapping):
            raise TypeError(f"state: expected 'running' to be a mapping, got "
                            f"{type(entries).__name__}")  # fmt: skip
        if self.basis_update == "running" and set(entries) != set(self.layer_names):
            warnings.warn(
                "state: no running covariance for every layer (saved with "
                "basis_update='epoch' or by an older version): the running average restarts "
                "from the next batch",
                stacklevel=3,
            )
            return {}
        running = {}
        for name, cov in entries.items():
            if name not in basis:
                raise ValueError(f"state: running covariance for unknown layer {name!r}")
            N = basis[name].shape[0]
            if not isinstance(cov, torch.Tensor) or cov.dtype != torch.float64 or (
                cov.shape != (N, N)
            ):
                raise ValueError(
                    f"state: layer {name!r}: expected a float64 [{N}, {N}] running covariance, "
                    f"got {getattr(cov, 'dtype', type(cov).__name__)} "
                    f"{tuple(getattr(cov, 'shape', ()))}"
                )
            running[name] = cov.detach().to(basis[name].device, copy=True)
        return running

    def _known_width(self, name: str) -> int | None:
        """The layer's number of output features when it can be known without a forward: its
        basis, its ``out_features``, or the width the model reports for it (the paper's models'
        ``hidden_widths()``); otherwise the next training forward checks it."""
        if name in self._basis:
            return self._basis[name].shape[0]
        module = self._modules[name]
        width = getattr(module, "out_features", None)
        if width is None and hasattr(self._model, "hidden_widths"):
            widths = self._model.hidden_widths()
            for hidden, layer in self._model.hidden_layers().items():
                if layer is module:
                    width = widths[hidden]
        return width

    def remove(self) -> None:
        """Take the forward hooks off the model and drop every kept tensor."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._captured.clear()

    def __enter__(self) -> SpectralRegularizer:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _require_refreshed(self) -> None:
        if not self._basis:
            raise RuntimeError(
                "SpectralRegularizer: no eigenbasis yet; call reg.refresh(train_loader) (at each "
                "epoch start) or reg.load_state_dict(...) before reg.penalty()"
            )

    def _check_tau(self, name: str, N: int) -> None:
        try:
            _anchor_index(N, self._tau[name], self.convention)
        except ValueError as err:
            raise ValueError(f"tau for layer {name!r} (N = {N} features): {err}") from None

    def _install(self, basis: dict, values: dict) -> None:
        # In place where the shapes allow: a CUDA graph captured around penalty() keeps reading
        # the same V buffers, so a refresh outside the graph stays visible to its replays.
        for key, views in list(self._cast_basis.items()):
            if all(views[n].shape == basis[n].shape for n in views):
                for n, view in views.items():
                    view.copy_(basis[n])
            else:
                del self._cast_basis[key]
        for name, V in basis.items():
            old = self._basis.get(name)
            if old is not None and old.shape == V.shape and old.device == V.device:
                basis[name] = old.copy_(V)
        self._basis = basis
        self._eigenvalues = values
        self._latest_spectrum.clear()

    # ----------------------------------------------------------------------------------------
    # Refresh
    def refresh(self, data, *, batch_size: int = 1000) -> None:
        """Recompute every layer's eigenbasis from one pass over ``data``.

        The model runs in eval mode (each submodule's training flag is restored afterwards, also
        on an error) without gradients; each layer's covariance over all rows is accumulated in
        float64 around a shift
        (:class:`~powerlaw_fast.training.accumulator.CovarianceAccumulator`, so ``[dataset, N]``
        is never held), then ``torch.linalg.eigh`` in float64. The forward is
        cut short once every regularised layer has run. The previous bases stay in place if
        the pass fails.

        Args:
            data: an iterable of batches ``x`` or ``(x, y, ...)`` (e.g. a DataLoader; a partial
                last batch is fine), or a tensor ``[M, ...]`` of inputs split into
                ``batch_size`` rows. Inputs are moved to the model's device.
            batch_size: rows per forward pass when ``data`` is a tensor.
        """
        batch_size = check_int_range(batch_size, "batch_size", 1, 1 << 30)
        device = model_device(self._model)
        accumulators: dict[str, CovarianceAccumulator] = {}
        fired: set[str] = set()
        wanted = len(self._modules)

        def sink(name: str, output) -> None:
            if not isinstance(output, torch.Tensor):
                raise TypeError(
                    f"layer {name!r}: expected the layer to output a tensor, got "
                    f"{type(output).__name__}"
                )
            if name in fired:
                raise _reused_layer_error(name)
            fired.add(name)
            rows = output.detach().reshape(output.shape[0], -1)
            acc = accumulators.get(name)
            if acc is None:
                acc = accumulators[name] = CovarianceAccumulator(rows.shape[1], device=rows.device)
            elif rows.shape[1] != acc.num_features:
                raise ValueError(
                    f"layer {name!r}: expected {acc.num_features} features per sample as in the "
                    f"first batch, got {rows.shape[1]}"
                )
            acc.update(rows)
            if len(fired) == wanted:
                raise StopForward

        total = None
        if isinstance(data, torch.Tensor):
            total = math.ceil(data.shape[0] / batch_size) if data.dim() >= 1 else None
        elif hasattr(data, "__len__"):
            try:
                total = len(data)
            except TypeError:
                total = None
        batches = tqdm(
            iterate_inputs(data, batch_size), total=total, desc="spectral refresh",
            unit="batch", disable=not self.progress or self._rank() != 0, leave=False,
        )
        self._refresh_sink = sink
        try:
            with eval_mode(self._model), torch.no_grad():
                for inputs in batches:
                    fired.clear()
                    try:
                        self._model(inputs.to(device, non_blocking=True))
                    except StopForward:
                        pass
                    if len(fired) != wanted:
                        missing = [n for n in self.layer_names if n not in fired]
                        raise ValueError(
                            f"layers {missing} did not run during the model's forward pass"
                        )
        finally:
            self._refresh_sink = None
            batches.close()
        if not accumulators:
            raise ValueError("data: no batches to refresh the eigenbases from")

        basis, values = {}, {}
        for name in self.layer_names:
            acc = accumulators[name]
            if self.process_group is not None:
                acc.all_reduce(self.process_group)
            self._check_tau(name, acc.num_features)
            lam, vectors = eigh_descending(acc.covariance())
            basis[name] = vectors.to(torch.float32)
            values[name] = lam
            if self.process_group is not None:
                # identical inputs give identical eigenvectors in practice, but eigenvector
                # signs are not guaranteed across devices: rank 0's basis is the one every
                # rank uses
                self._broadcast_from_first_rank(basis[name], values[name])
        self._install(basis, values)

    def _rank(self) -> int:
        import torch.distributed as dist

        if self.process_group is None or not dist.is_initialized():
            return 0
        return dist.get_rank(self.process_group)

    def _broadcast_from_first_rank(self, *tensors: torch.Tensor) -> None:
        import torch.distributed as dist

        if dist.get_world_size(self.process_group) == 1:
            return
        source = dist.get_global_rank(self.process_group, 0)
        for t in tensors:
            dist.broadcast(t, src=source, group=self.process_group)

    # ----------------------------------------------------------------------------------------
    # Penalty
    def _bases(self, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
        """Every layer's V in ``dtype`` on ``device``, as views of one flat buffer: cast once
        per refresh (under autocast, or with ``penalty_dtype``), updated in place after."""
        key = (dtype, device)
        views = self._cast_basis.get(key)
        if views is None:
            flat = torch.cat(
                [self._basis[n].to(device=device, dtype=dtype).flatten() for n in self.layer_names]
            )
            views, offset = {}, 0
            for name in self.layer_names:
                N = self._basis[name].shape[0]
                views[name] = flat[offset : offset + N * N].view(N, N)
                offset += N * N
            self._cast_basis[key] = views
        return views

    def penalty(self) -> torch.Tensor:
        """Sum over the layers of the spectral penalty on the latest training forward pass.

        Each layer contributes ``spec_penalty(x, V; alpha, tau, beta, convention)`` with its own
        settings, ``x`` its output ``[B, *]`` flattened to ``[B, N]``. Differentiable in the
        activations (hence in the model's parameters); the bases are constants. The kept
        activations are released, so each forward pass can be penalised once.

        On the Triton backend all layers go through one grouped op (six launches for any
        number of layers, no host synchronisation with the default deferred validation) when
        they share a batch size, a dtype and a device, are at most 4096 wide and no process
        group is set; otherwise each layer is one call of the single-layer op.

        Returns a 0-dim tensor (float32; float64 when every layer's activations are float64).

        Raises:
            RuntimeError: no refresh yet, or a layer has no activations from a training forward
                pass (with gradients, in training mode) since the last ``penalty()``.
        """
        if not torch.compiler.is_compiling():
            status.poll()  # an earlier step's deferred error, before any work of this one
        captured, self._captured = self._captured, {}
        if self.basis_update == "epoch":
            self._require_refreshed()
        missing = [n for n in self.layer_names if n not in captured]
        if missing:
            raise RuntimeError(
                f"SpectralRegularizer: no activations for layers {missing}: call penalty() once "
                f"after each training forward pass (model in training mode, gradients enabled); "
                f"the activations of a forward pass are released by the first penalty() call"
            )
        self._steps += 1
        versions, self._versions = self._versions, {}
        for name in self.layer_names:
            self._check_not_modified(name, captured[name], versions.get(name))
        xs = [self._activations(name, captured.pop(name)) for name in self.layer_names]
        if self.basis_update == "running":
            if torch.compiler.is_compiling():  # eigh and its host logic run eagerly
                torch.compiler.disable(self._update_running_basis)(xs)
            else:
                self._update_running_basis(xs)
        device, dtype = xs[0].device, xs[0].dtype
        backend = resolve_backend(self.backend, device, dtype=dtype)
        grouped = (
            not torch.compiler.is_compiling()  # compiled steps use the opaque custom ops
            and self.process_group is None
            and all(x.device == device for x in xs)
            and can_group(xs, backend)
        )
        # The ops keep their own float32 (or float64) arithmetic; autocast must not recast it.
        with torch.autocast(device.type, enabled=False), status.where(f"step {self._steps}"):
            if grouped:
                return self._grouped_penalty(xs)
            total = None
            for name, x in zip(self.layer_names, xs, strict=True):
                term = self._layer_penalty(name, x)
                if total is None:
                    total = term
                else:
                    total = total + term.to(torch.promote_types(total.dtype, term.dtype))
            return total

    @staticmethod
    def _check_not_modified(name: str, out, version: int | None) -> None:
        """The kept output must be what the layer returned: an in-place op after the layer
        (``nn.ReLU(inplace=True)``, ``h += ...``) would change what is penalised."""
        if version is None or not isinstance(out, torch.Tensor) or out._version == version:
            return
        raise RuntimeError(
            f"layer {name!r}: its output was modified in place after the layer ran (e.g. by "
            f"nn.ReLU(inplace=True) or an in-place op on it), so the penalty would see the "
            f"modified values, not the layer's; use the out-of-place op after a regularised "
            f"layer (nn.ReLU(inplace=False))"
        )

    def _activations(self, name: str, out) -> torch.Tensor:
        """A layer's kept output as ``[B, N]``, checked against its basis."""
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"layer {name!r}: expected the layer to output a tensor, got {type(out).__name__}"
            )
        x = out.reshape(out.shape[0], -1)
        known = self._basis.get(name, self._running.get(name))
        N = x.shape[1] if known is None else known.shape[0]
        if x.shape[1] != N:
            raise ValueError(
                f"layer {name!r}: expected {N} features per sample (as at the last refresh), got "
                f"{x.shape[1]} from output shape {tuple(out.shape)}"
            )
        B = x.shape[0]
        if self.process_group is not None:
            import torch.distributed as dist

            B *= dist.get_world_size(self.process_group)  # the global batch, roughly
        if B < N and name not in self._small_batch_warned:
            self._small_batch_warned.add(name)
            warnings.warn(
                f"layer {name!r}: batch of B = {B} rows for N = {N} features; the per-batch "
                f"spectrum is rank-deficient below B = N and noisy below B = 1.5 N (the paper "
                f"uses B >= 1.5 x the widest regularised layer)",
                stacklevel=4,
            )
        return x

    def running_covariance(self, layer) -> torch.Tensor | None:
        """With ``basis_update="running"``: the float64 running average ``[N, N]`` of
        ``layer``'s batch covariances (None before the first penalty, or in ``"epoch"`` mode)."""
        name = self._layer_name(layer, "layer")
        return self._running.get(name)

    def _update_running_basis(self, xs: list[torch.Tensor]) -> None:
        """Fold the batch covariances into the running averages; every ``basis_every`` calls
        (and on the first) eigendecompose them and install the bases in place."""
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "SpectralRegularizer(basis_update='running'): the basis update cannot run inside "
                "a CUDA graph capture (eigh synchronises); capture without the penalty or use "
                "basis_update='epoch'"
            )
        m = self.basis_momentum
        with torch.no_grad(), torch.autocast(xs[0].device.type, enabled=False):
            for name, x in zip(self.layer_names, xs, strict=True):
                rows = x.detach().to(torch.float64)
                count = torch.tensor(float(rows.shape[0]), dtype=torch.float64,
                                     device=rows.device)
                total = rows.sum(0)
                if self.process_group is not None:
                    import torch.distributed as dist

                    # raw moments of the global batch: N^2 + N + 1 floats per layer and step
                    moments = torch.cat([count.reshape(1), total, (rows.T @ rows).flatten()])
                    dist.all_reduce(moments, group=self.process_group)
                    N = rows.shape[1]
                    count, total = moments[0], moments[1 : N + 1]
                    second = moments[N + 1 :].view(N, N)
                    mean = total / count
                    cov = (second - count * torch.outer(mean, mean)) / (count - 1)
                else:
                    centred = rows - total / count
                    cov = centred.T @ centred / (count - 1)
                old = self._running.get(name)
                if old is None or old.shape != cov.shape or old.device != cov.device:
                    self._running[name] = cov
                else:
                    old.mul_(1.0 - m).add_(cov, alpha=m)
        due = not self._basis or self._running_steps % self.basis_every == 0
        self._running_steps += 1
        if not due:
            return
        basis, values = {}, {}
        for name in self.layer_names:
            cov = self._running[name]
            self._check_tau(name, cov.shape[0])
            lam, vectors = eigh_descending(cov)
            basis[name] = vectors.to(torch.float32)
            values[name] = lam
            if self.process_group is not None:
                self._broadcast_from_first_rank(basis[name], values[name])
        self._install(basis, values)

    def _compute_dtype(self, x: torch.Tensor):
        return self.penalty_dtype if x.dtype != torch.float64 else None

    def _grouped_penalty(self, xs) -> torch.Tensor:
        compute = self._compute_dtype(xs[0])
        views = self._bases(compute or xs[0].dtype, xs[0].device)
        names = self.layer_names
        total, lams = grouped_penalty_triton(
            xs, [views[n] for n in names],
            alphas=[self._alpha[n] for n in names],
            anchors=[_anchor_index(x.shape[1], self._tau[n], self.convention)
                     for n, x in zip(names, xs, strict=True)],
            betas=[self._beta[n] for n in names],
            convention=self.convention, validate=self.validate, compute_dtype=compute,
            names=names, taus=[self._tau[n] for n in names],
        )  # fmt: skip
        for name, lam in zip(names, lams, strict=True):
            self._latest_spectrum[name] = lam
        return total

    def _layer_penalty(self, name: str, x: torch.Tensor) -> torch.Tensor:
        compute = self._compute_dtype(x)
        V = self._bases(compute or x.dtype, x.device)[name]
        try:
            with status.where(f"layer {name!r}, step {self._steps}"):
                value, lam = penalty_and_spectrum(
                    x, V, **self.settings(name), convention=self.convention,
                    backend=self.backend, validate=self.validate,
                    process_group=self.process_group, compute_dtype=compute,
                )  # fmt: skip
        except DeferredValidationError:
            raise  # about an earlier call: it names its own layer and step
        except ValueError as err:
            raise ValueError(f"layer {name!r}: {err}") from None
        self._latest_spectrum[name] = lam
        return value

    def __repr__(self) -> str:
        layers = ", ".join(
            f"{n}(alpha={self._alpha[n]}, tau={self._tau[n]}, beta={self._beta[n]})"
            for n in self.layer_names
        )
        return f"SpectralRegularizer([{layers}], convention={self.convention!r})"

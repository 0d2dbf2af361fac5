"""Whole-model spectral regularisation: eigenbasis refresh, activation hooks, per-layer penalty sum.

The training scheme of Nassar et al. (2020), sec. 3.2:

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
``basis_update="tracked"`` follows the same running average's eigenbasis with small rotations
each step (about ten GEMMs and small block eigendecompositions on a GPU, no ``N x N``
eigendecomposition); see :mod:`powerlaw_fast.training._tracked_basis`.

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

import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from powerlaw_fast._backend import BACKENDS, resolve_backend
from powerlaw_fast._torch_helpers import find_submodule, module_device
from powerlaw_fast._validation import check_int_range, check_real
from powerlaw_fast.ops import grouped_penalty as _layers_penalty  # noqa: F401  (its stage)
from powerlaw_fast.ops import status
from powerlaw_fast.ops._settings import CONVENTIONS
from powerlaw_fast.ops._settings import anchor_index as _anchor_index
from powerlaw_fast.ops.backends import implementation
from powerlaw_fast.ops.status import validation_mode
from powerlaw_fast.training._basis_store import BasisStore, read_layers
from powerlaw_fast.training._hooks import LayerHooks
from powerlaw_fast.training._refresh import accumulate_layers, eigenbases
from powerlaw_fast.training._running_basis import RunningBasis
from powerlaw_fast.training._tracked_basis import TrackedBasis
from powerlaw_fast.training.capture import model_device

STATE_FORMAT = 2  # the layout of state_dict() (2 adds the running basis); 1 is still read
BASIS_UPDATES = ("epoch", "running", "tracked")


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
            rank 0's eigenvectors broadcast. ``"tracked"``: the same running average's
            eigenbasis, followed by small rotations each step instead of an
            eigendecomposition (see :mod:`powerlaw_fast.training._tracked_basis`): the
            batch's covariance in the current basis (two ``[B, N]`` GEMMs), a
            batched eigendecomposition of 64-column blocks, two sweeps of damped first-order
            rotations (about eight ``N x N`` GEMMs) and a Newton-Schulz re-orthonormalisation
            every 4 steps; on a CPU, where LAPACK's ``eigh`` is cheap, M's exact
            eigendecomposition instead. The first step, when :meth:`refresh` has not set
            ``V``, eigendecomposes the first batch's covariance. Prefer it to ``"running"``
            on a GPU with wide layers, where an ``N x N`` eigendecomposition per step costs
            far more than the step; keep ``"running"`` as the exact reference. On a GPU each
            step synchronises twice with the host (``torch.linalg.eigh``'s error check on the
            blocks), so it cannot be captured in a CUDA graph.
        basis_every: with ``basis_update="running"``, penalty calls between two
            eigendecompositions (default 1: every step; issue 15 found that a basis more than a
            few steps old leaves the spectrum's tail where vanilla training puts it).
        basis_momentum: with ``basis_update="running"`` or ``"tracked"``, the weight of the
            newest batch's covariance in the running average, in (0, 1] (default 0.1: about
            the last 10 batches; 1 = the current batch only, which over-shoots at ``B`` near
            ``N``).

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
        self._running = RunningBasis(self.basis_momentum, self.basis_every)
        self._tracked = TrackedBasis(self.basis_momentum)

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

        self._store = BasisStore(self.layer_names)
        self._hooks = LayerHooks(self._model, self._modules)
        self._latest_spectrum: dict[str, torch.Tensor] = {}
        self._small_batch_warned: set[str] = set()
        self._steps = 0  # penalty() calls, for the errors' "step"

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

    # ----------------------------------------------------------------------------------------
    # Settings and state
    def settings(self, layer) -> dict:
        """``{"alpha", "tau", "beta"}`` used for ``layer`` (a name or module)."""
        name = self._layer_name(layer, "layer")
        return {"alpha": self._alpha[name], "tau": self._tau[name], "beta": self._beta[name]}

    @property
    def refreshed(self) -> bool:
        """True once :meth:`refresh` (or :meth:`load_state_dict`) has provided the eigenbases."""
        return bool(self._store)

    def basis(self, layer) -> torch.Tensor:
        """``V [N, N]`` float32 of ``layer``: eigenvectors as columns, descending eigenvalues."""
        name = self._layer_name(layer, "layer")
        self._require_refreshed()
        return self._store.basis[name]

    def eigenvalues(self, layer) -> torch.Tensor:
        """Eigenvalues ``[N]`` float64, descending, of ``layer``'s covariance over the data set."""
        name = self._layer_name(layer, "layer")
        self._require_refreshed()
        return self._store.eigenvalues[name]

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
        one); with ``"tracked"``, the number of tracking steps (the basis and eigenvalues are
        the tracked state itself)."""
        self._require_refreshed()
        return {"format": STATE_FORMAT, "layers": self._store.state(), **self._running.state(),
                **self._tracked.state()}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore the eigenbases of :meth:`state_dict` exactly (bitwise), each moved to its
        layer's device (the device of the layer's parameters, else of the model's). Every check
        (types, shapes, widths, finiteness, tau, orthonormal bases) runs before anything is
        installed."""
        if not isinstance(state, Mapping) or "layers" not in state:
            raise TypeError("state: expected a mapping from SpectralRegularizer.state_dict()")
        if state.get("format") not in (1, STATE_FORMAT):
            raise ValueError(
                f"state: expected format 1 or {STATE_FORMAT}, got {state.get('format')!r}"
            )
        fallback = model_device(self._model)
        basis, values = read_layers(
            state["layers"], self.layer_names, known_width=self._known_width,
            check_tau=self._check_tau,
            device_of=lambda name: module_device(self._modules[name], fallback),
        )  # fmt: skip
        running = RunningBasis(self.basis_momentum, self.basis_every)
        running.load(state, {n: (V.shape[0], V.device) for n, V in basis.items()},
                     expected=self.basis_update == "running")  # fmt: skip
        tracked = TrackedBasis(self.basis_momentum)
        tracked.load(state)
        self._install(basis, values)
        self._running, self._tracked = running, tracked

    def _known_width(self, name: str) -> int | None:
        """The layer's number of output features when it can be known without a forward: its
        basis, its ``out_features``, or the width the model reports for it (the paper's models'
        ``hidden_widths()``); otherwise the next training forward checks it."""
        if name in self._store.basis:
            return self._store.basis[name].shape[0]
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
        self._hooks.remove()

    def __enter__(self) -> SpectralRegularizer:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _require_refreshed(self) -> None:
        if not self._store:
            raise RuntimeError(
                "SpectralRegularizer: no eigenbasis yet; call reg.refresh(train_loader) (at each "
                "epoch start) or reg.load_state_dict(...) before reg.penalty()"
            )

    def _install(self, basis: dict, values: dict) -> None:
        self._store.install(basis, values)
        self._latest_spectrum.clear()

    def _check_tau(self, name: str, N: int) -> None:
        try:
            _anchor_index(N, self._tau[name], self.convention)
        except ValueError as err:
            raise ValueError(f"tau for layer {name!r} (N = {N} features): {err}") from None

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
        accumulators = accumulate_layers(
            self._model, self.layer_names, self._hooks, data, batch_size=batch_size,
            progress=self.progress and self._rank() == 0,
        )  # fmt: skip
        covariances = {}
        for name in self.layer_names:
            acc = accumulators[name]
            if self.process_group is not None:
                acc.all_reduce(self.process_group)
            self._check_tau(name, acc.num_features)
            covariances[name] = acc.covariance()
        self._install(*eigenbases(covariances, self.process_group))

    def _rank(self) -> int:
        import torch.distributed as dist

        if self.process_group is None or not dist.is_initialized():
            return 0
        return dist.get_rank(self.process_group)

    # ----------------------------------------------------------------------------------------
    # Penalty
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
        captured = self._hooks.take()
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
        xs = [self._activations(name, captured[name]) for name in self.layer_names]
        if self.basis_update != "epoch":
            update = (self._update_running_basis if self.basis_update == "running"
                      else self._update_tracked_basis)  # fmt: skip
            if torch.compiler.is_compiling():  # eigh and its host logic run eagerly
                torch.compiler.disable(update)(xs)
            else:
                update(xs)
        names = self.layer_names
        backend = resolve_backend(self.backend, xs[0].device, dtype=xs[0].dtype)
        compute = self.penalty_dtype
        Vs = [self._store.views(compute if x.dtype != torch.float64 and compute else x.dtype,
                                x.device)[name] for name, x in zip(names, xs, strict=True)]
        # The ops keep their own float32 (or float64) arithmetic; autocast must not recast it.
        with torch.autocast(xs[0].device.type, enabled=False), \
                status.where(f"step {self._steps}"):  # fmt: skip
            total, lams = implementation("layers_penalty", backend)(
                xs, Vs, alphas=[self._alpha[n] for n in names],
                anchors=[_anchor_index(x.shape[1], self._tau[n], self.convention)
                         for n, x in zip(names, xs, strict=True)],
                betas=[self._beta[n] for n in names], convention=self.convention,
                validate=self.validate, compute_dtype=compute, names=names,
                taus=[self._tau[n] for n in names], process_group=self.process_group,
            )  # fmt: skip
        self._latest_spectrum.update(zip(names, lams, strict=True))
        return total

    def _activations(self, name: str, out) -> torch.Tensor:
        """A layer's kept output as ``[B, N]``, checked against its basis."""
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"layer {name!r}: expected the layer to output a tensor, got {type(out).__name__}"
            )
        x = out.reshape(out.shape[0], -1)
        known = self._store.basis.get(name, self._running.covariance.get(name))
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
        return self._running.covariance.get(name)

    def _update_running_basis(self, xs: list[torch.Tensor]) -> None:
        """Fold the batch covariances into the running averages; when due, eigendecompose them
        and install the bases in place."""
        with torch.autocast(xs[0].device.type, enabled=False):
            due = self._running.fold(dict(zip(self.layer_names, xs, strict=True)),
                                     self.process_group)  # fmt: skip
        if not (due or not self._store):
            return
        for name, cov in self._running.covariance.items():
            self._check_tau(name, cov.shape[0])
        self._install(*eigenbases(self._running.covariance, self.process_group))

    def _update_tracked_basis(self, xs: list[torch.Tensor]) -> None:
        """Rotate every layer's basis towards the eigenbasis of the running covariance with
        the current batch folded in (an exact eigendecomposition of the first batch when no
        basis is installed yet), and install it in place."""
        first = not self._store
        with torch.autocast(xs[0].device.type, enabled=False):
            basis, values = self._tracked.step(
                dict(zip(self.layer_names, xs, strict=True)), self._store.basis,
                self._store.eigenvalues, self.process_group,
                operand_dtype=torch.bfloat16 if self.penalty_dtype == torch.bfloat16 else None,
            )  # fmt: skip
        if first:
            for name, V in basis.items():
                self._check_tau(name, V.shape[0])
        self._install(basis, values)

    def __repr__(self) -> str:
        layers = ", ".join(
            f"{n}(alpha={self._alpha[n]}, tau={self._tau[n]}, beta={self._beta[n]})"
            for n in self.layer_names
        )
        return f"SpectralRegularizer([{layers}], convention={self.convention!r})"

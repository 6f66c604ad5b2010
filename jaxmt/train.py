"""Many models trained as one program: one vmapped Optax update over stacked tenants.

A hyperparameter search or an ensemble is N models of one architecture with different
hyperparameters, inits and data orders. Trained one by one, each step of each model is a
few small kernels; trained as one program (HFTA, ModelBatch), each step is one set of
batched kernels over a tenant axis. ``MultiTenantTrainer`` holds the tenants' params and
optimizer states stacked on that axis and runs ``jit(vmap(step))`` over
``(params, opt_state, batch)``. Per-tenant hyperparameters live in the optimizer state
(``optax.inject_hyperparams``), so different learning rates or weight decays are array
values of one program, not different programs.

Non-finite losses: with ``on_nonfinite="freeze"`` (default) a tenant whose loss, gradients,
updated params or updated optimizer state are NaN or Inf in a step keeps its params and optimizer state from before that step, is
listed in ``diverged`` and trains no further; the other tenants go on, and a RuntimeWarning
names it. With ``on_nonfinite="raise"`` the step raises ``NonFiniteLossError`` naming the
tenants and no tenant is updated.

The backward pass (``backward``): the gradient of the summed losses is one batched backward
pass; ``vmap(value_and_grad)`` is each tenant's own. Under plain vmap, the first makes each
conv's filter gradient one conv over every tenant (``batch_group_count``), which runs faster
on a GPU (an H100, float32, ResNet-18 at 8 tenants x 16 images: 22.7 against 45.9 ms a
step; 16 x 8: 23.9 against 62.3 ms; MobileNetV2 8 x 16: 36.2 against 59.8 ms;
benchmarks/README.md, Training step: the backward pass, H100) and far slower on a CPU (ResNet-18 tiny, 4 x 4: 41
against 6 ms), where XLA computes that conv densely with zero masks, so that a NaN or Inf in
one tenant's step can reach the others' gradients (0 x NaN). ``"auto"`` takes each tenant's
own pass on a CPU under plain vmap and the summed one elsewhere. A summed step that flags
any tenant as non-finite is stepped again for those tenants, each on its own pass, before
anything is decided: a tenant reached only through the batched pass gets its own update, and
only the tenants non-finite on their own are frozen (or raised). A leak can only make a
tenant non-finite (a product with a zero mask), never give it other finite values, so a step
that flags nobody needs no second pass.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmt.errors import InputError, NonFiniteLossError, ParamMismatchError, UnknownTenantError
from jaxmt.lowering import LoweringPolicy
from jaxmt.validation import check_tenant_ids, first_structure_difference, leaf_dtype, template_ordered_leaves
from jaxmt.train_step import (
    LossFn,
    PyTree,
    eval_program,
    init_program,
    split_hyperparams,
    split_trainable,
    stacked_init_program,
    step_program,
)

if TYPE_CHECKING:
    from jaxmt.model import MultiTenantModel

_ON_NONFINITE = ("freeze", "raise")
_BACKWARDS = ("auto", "summed", "per_tenant")
# What tracing raises where a traced number is read in Python (TracerBoolConversionError is a
# ConcretizationTypeError).
_CONCRETE_VALUE_ERRORS = (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError)


def _platform(tree: PyTree) -> str:
    """The platform of the device holding the first leaf of ``tree``."""
    return next(iter(jax.tree.leaves(tree)[0].devices())).platform


# ----------------------------------------------------------------------------- trainer
class MultiTenantTrainer:
    """N models of one architecture, each with its own hyperparameters and data, trained as one program.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` for ONE tenant; pure and jit-able.
      stacked_params: the tenants' params stacked along a leading tenant axis (row t is
        ``tenant_ids[t]``). ``from_init`` and ``from_params`` build it.
      tenant_ids: one hashable, unique id per row.
      optimizer: an Optax optimizer factory, e.g. ``optax.adamw`` or ``optax.sgd``.
      hyperparams: keyword arguments of ``optimizer``. A number is shared by all tenants; a
        sequence of numbers gives one value per tenant (length = number of tenants). Numbers
        become per-tenant arrays in the optimizer state (``optax.inject_hyperparams``);
        other values (bools, None, callables or pytrees such as adamw's ``mask``) are passed
        as given. Arguments left out keep the optimizer's defaults, untraced and uncast, as
        without the trainer (``optax.inject_hyperparams`` alone would trace them and cast
        them to the params' dtype).
      static_hyperparams: keyword arguments of ``optimizer`` passed as given, the same for
        every tenant and never traced: numbers the optimizer reads in Python (adafactor's
        ``min_dim_size_to_factor``, a schedule's step counts). Not settable per tenant.
      trainable: ``trainable(leaf_path) -> bool`` on ``jax.tree_util.keystr`` paths; leaves
        it rejects (e.g. BatchNorm ``batch_stats``) are constants: no gradient, no optimizer
        state, never changed. Default: every leaf is trained (integer and bool leaves, which
        have no gradient, must be left out by name).
      on_nonfinite: "freeze" or "raise": what a NaN or Inf loss of one tenant does (see the
        module docstring).
      apply_fn: ``apply_fn(params, x)`` for serving; needed by ``to_model``.
      lowering: how the loss is batched over tenants (``jaxmt.lowering``): "vmap" (plain
        ``jax.vmap``), "auto", "rule" or a conv lowering. With per-tenant filters, vmap turns
        convs into grouped convs, whose gradients are slow (on a CPU a small CNN's
        backward pass ran 40x faster under "rule"); dense layers batch well either way.
        ``to_model`` serves with the same lowering.
      backward: "auto", "summed" or "per_tenant": one batched backward pass of the summed
        losses (a step that flags a tenant non-finite is stepped again for the flagged
        tenants, each on its own pass), or each tenant's own pass every step (see the module
        docstring). "auto": "per_tenant" on a CPU under plain vmap, else "summed".

    Raises:
      TypeError: ``hyperparams`` and ``static_hyperparams`` miss a required argument of
        ``optimizer`` or name one it does not take, or the optimizer needs the concrete
        value of a number given in ``hyperparams`` (the message names them), or a leaf
        left trainable is not floating (an integer or bool leaf has no gradient), or
        ``loss_fn`` is not callable.
      ValueError: a per-tenant hyperparameter has the wrong length or a non-finite value,
        a name is in both ``hyperparams`` and ``static_hyperparams``, no ids or ids repeat,
        ``trainable`` rejects every leaf, or ``on_nonfinite`` or ``backward`` is unknown.
      ParamMismatchError: ``stacked_params`` has no array leaves, or a leaf has no tenant
        axis of the right size.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, optax, jaxmt
      >>> def init_fn(seed):
      ...     return {"w": jax.random.normal(jax.random.key(seed), (3,))}
      >>> def loss_fn(params, batch):
      ...     return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)
      >>> trainer = jaxmt.MultiTenantTrainer.from_init(
      ...     loss_fn, init_fn, {"slow": 0, "fast": 1}, optimizer=optax.sgd,
      ...     hyperparams={"learning_rate": [0.01, 0.1]})
      >>> x = np.random.default_rng(0).normal(size=(2, 8, 3)).astype(np.float32)
      >>> losses = trainer.step_stacked({"x": x, "y": x.sum(-1)})
      >>> sorted(losses)
      ['fast', 'slow']
    """

    def __init__(
        self,
        loss_fn: LossFn,
        stacked_params: PyTree,
        tenant_ids: Sequence[Hashable],
        *,
        optimizer: Callable[..., optax.GradientTransformation] = optax.adamw,
        hyperparams: Mapping[str, Any] | None = None,
        static_hyperparams: Mapping[str, Any] | None = None,
        trainable: Callable[[str], bool] | None = None,
        on_nonfinite: str = "freeze",
        apply_fn: Callable[[PyTree, Any], Any] | None = None,
        lowering: str | LoweringPolicy | Mapping[str, str] = "vmap",
        backward: str = "auto",
    ):
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if on_nonfinite not in _ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {_ON_NONFINITE}, got {on_nonfinite!r}")
        if backward not in _BACKWARDS:
            raise ValueError(f"backward must be one of {_BACKWARDS}, got {backward!r}")
        self._tenants = _check_ids(tenant_ids)
        self._index = {t: i for i, t in enumerate(self._tenants)}
        n = len(self._tenants)
        leaves_with_path, self._treedef = jax.tree_util.tree_flatten_with_path(stacked_params)
        if not leaves_with_path:
            raise ParamMismatchError(f"stacked_params has no array leaves, got {type(stacked_params).__name__} {stacked_params!r:.200}; "
                                     "expected a pytree of arrays [tenants, ...]")
        self._leaf_paths = tuple(jax.tree_util.keystr(path) for path, _ in leaves_with_path)
        for path, (_, leaf) in zip(self._leaf_paths, leaves_with_path):
            if np.ndim(leaf) < 1 or np.shape(leaf)[0] != n:
                raise ParamMismatchError(
                    f"stacked leaf {path} has shape {list(np.shape(leaf))}; expected a leading tenant axis of {n}"
                )
        self._trainable: tuple[bool, ...] | None = None
        if trainable is not None:
            mask = tuple(bool(trainable(path)) for path in self._leaf_paths)
            if not any(mask):
                raise ValueError("trainable() rejects every leaf: nothing to train")
            self._trainable = None if all(mask) else mask
        for path, (_, leaf), trained in zip(self._leaf_paths, leaves_with_path, self._trainable or [True] * len(self._leaf_paths)):
            dtype = leaf_dtype(leaf)
            if trained and not jnp.issubdtype(dtype, jnp.inexact):  # else JAX's grad fails the first step, naming no leaf
                raise TypeError(f"leaf {path} is {dtype.name}{list(np.shape(leaf)[1:])}: only floating leaves can be trained "
                                "(a counter, mask or index table has no gradient); leave it out with trainable=")
        self.loss_fn = loss_fn
        self.apply_fn = apply_fn
        self.optimizer = optimizer
        self.on_nonfinite = on_nonfinite
        self.lowering = LoweringPolicy.of(lowering)

        hyperparams, fixed = dict(hyperparams or {}), dict(static_hyperparams or {})
        name = getattr(optimizer, "__name__", repr(optimizer))
        both = sorted(set(hyperparams) & set(fixed))
        if both:
            raise ValueError(f"{both} given both in hyperparams and in static_hyperparams; give each once")
        try:
            inspect.signature(optimizer).bind(**hyperparams, **fixed)
        except TypeError as exc:
            raise TypeError(f"hyperparams {sorted({**hyperparams, **fixed})} do not fit optimizer {name}: {exc}") from None
        static, per_tenant = split_hyperparams(hyperparams, self._tenants)
        static.update(fixed)
        self._hyper_names = tuple(per_tenant)
        static_items = tuple(sorted(static.items()))
        # A copy: steps donate the trainer's buffers, which must not be the caller's arrays.
        self._params = jax.tree.map(_strong_copy, stacked_params)
        train, _ = split_trainable(self._treedef, self._trainable, self._params)
        try:
            # Strongly typed, as the step returns it (cast to these dtypes): a weakly typed init leaf
            # (jnp.asarray(1.0) in a hand-written init) would make the second step compile again.
            self._opt_state = jax.tree.map(_strong, init_program(optimizer, static_items, self._hyper_names)(per_tenant, train))
        except _CONCRETE_VALUE_ERRORS as exc:
            raise self._concrete_value_error(exc) from exc
        if backward == "auto":
            on_cpu = _platform(self._params) == "cpu"
            backward = "per_tenant" if on_cpu and self.lowering.is_plain_vmap else "summed"
        self.backward = backward
        program_of = functools.partial(step_program, loss_fn, optimizer, static_items, self._hyper_names, self._treedef,
                                       self._trainable, self.lowering, on_nonfinite == "freeze")
        self._step_program = program_of(backward == "per_tenant")
        # Each tenant's own pass, for a summed step that flagged tenants (built when first needed, and
        # kept: a step program outside the cache, e.g. of an unhashable static option, is a new jit).
        self._own_pass_program = None if backward == "per_tenant" else functools.cache(functools.partial(program_of, True))
        self._active = np.ones(n, bool)
        self.diverged: dict[Hashable, int] = {}
        self._losses: list[np.ndarray] = []

    def _concrete_value_error(self, exc: Exception) -> TypeError:
        """What tracing the optimizer or the loss raised where Python read a traced value,
        with the remedy when the value may be a per-tenant hyperparameter."""
        name = getattr(self.optimizer, "__name__", repr(self.optimizer))
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        message = f"tracing the training step (optimizer {name}, loss_fn) needed a concrete value: {type(exc).__name__}: {first_line}"
        if self._hyper_names:
            message += (f". Per-tenant hyperparameters {sorted(self._hyper_names)} are traced: if the optimizer reads one "
                        "of them in Python, pass it in static_hyperparams= (the same value for every tenant)")
        return TypeError(message)

    # --------------------------------------------------------------- constructors
    @classmethod
    def from_init(
        cls, loss_fn: LossFn, init_fn: Callable[[jax.Array], PyTree], seeds: Mapping[Hashable, int], **kwargs: Any
    ) -> "MultiTenantTrainer":
        """Tenants initialised on the device by ``vmap(init_fn)`` over their integer seeds.

        ``init_fn(seed) -> params`` must accept a traced int32 seed (e.g. ``models`` specs'
        ``init``, or ``lambda s: module.init(jax.random.key(s), x)``); tenant t's params equal
        ``init_fn(seeds[t])``. Other keyword arguments go to the constructor.
        """
        tenant_ids = _check_ids(list(seeds))
        seed_array = jnp.asarray([int(seeds[t]) for t in tenant_ids], jnp.int32)
        stacked = stacked_init_program(init_fn)(seed_array)
        return cls(loss_fn, stacked, tenant_ids, **kwargs)

    @classmethod
    def from_params(cls, loss_fn: LossFn, params_by_tenant: Mapping[Hashable, PyTree], **kwargs: Any) -> "MultiTenantTrainer":
        """Tenants from one params pytree each (validated against the first, then stacked).

        Mappings may differ in type only (a flax FrozenDict for a dict): their entries are
        matched by key, and the stack has the first tenant's structure.
        """
        tenant_ids = _check_ids(list(params_by_tenant))
        first = tenant_ids[0]
        template = params_by_tenant[first]
        want_leaves, want_def = jax.tree_util.tree_flatten_with_path(template)
        leaves_by_tenant = {first: [leaf for _, leaf in want_leaves]}
        for tenant_id in tenant_ids[1:]:
            got_leaves, got_def = jax.tree_util.tree_flatten(params_by_tenant[tenant_id])
            if got_def != want_def:
                difference = first_structure_difference(template, params_by_tenant[tenant_id])
                if difference is not None:
                    raise ParamMismatchError(
                        f"tenant {tenant_id!r}: params pytree structure differs from that of tenant {first!r}: {difference}"
                    )
                # Only the mapping types differ (a flax FrozenDict for a dict): the same entries, matched by key.
                got_leaves = template_ordered_leaves(params_by_tenant[tenant_id], template, want_def, f"tenant {tenant_id!r}: params")
            leaves_by_tenant[tenant_id] = got_leaves
            for (path, want), got in zip(want_leaves, got_leaves):
                if np.shape(got) != np.shape(want) or jnp.result_type(got) != jnp.result_type(want):
                    raise ParamMismatchError(
                        f"tenant {tenant_id!r}: leaf {jax.tree_util.keystr(path)} is "
                        f"{jnp.result_type(got)}{list(np.shape(got))}, expected {jnp.result_type(want)}{list(np.shape(want))}"
                    )
        stacked = want_def.unflatten([jnp.stack(leaves) for leaves in zip(*(leaves_by_tenant[t] for t in tenant_ids))])
        return cls(loss_fn, stacked, tenant_ids, **kwargs)

    # -------------------------------------------------------------------- queries
    @property
    def tenants(self) -> list[Hashable]:
        """Tenant ids in stacking order (the order of every per-tenant array)."""
        return list(self._tenants)

    def __len__(self) -> int:
        return len(self._tenants)

    def __contains__(self, tenant_id: object) -> bool:
        try:
            return tenant_id in self._index
        except TypeError:
            return False

    @property
    def num_steps(self) -> int:
        """Steps taken so far, one per ``step`` or ``step_stacked`` (a step that raised is not counted)."""
        return len(self._losses)

    @property
    def active(self) -> list[Hashable]:
        """Tenants that are still updated (not frozen, not diverged)."""
        return [t for t, on in zip(self._tenants, self._active) if on]

    @property
    def stacked_params(self) -> PyTree:
        """All tenants' params, leaves [tenants, ...] on the device.

        The next step donates these buffers (with on_nonfinite="freeze"): copy what you keep.
        """
        return self._params

    @property
    def opt_state(self) -> PyTree:
        """All tenants' optimizer states, leaves [tenants, ...]; donated like ``stacked_params``."""
        return self._opt_state

    def params_of(self, tenant_id: Hashable) -> PyTree:
        """One tenant's params (device slices of the stack)."""
        i = self._position(tenant_id)
        return jax.tree.map(lambda leaf: leaf[i], self._params)

    @property
    def hyperparams(self) -> dict[str, np.ndarray]:
        """The per-tenant numeric hyperparameters as given: name -> values [tenants]."""
        return {name: np.asarray(self._opt_state.hyperparams[name]) for name in self._hyper_names}

    @property
    def history(self) -> dict[Hashable, np.ndarray]:
        """Loss curves: tenant -> losses [num_steps]; NaN where the tenant was not training."""
        losses = np.stack(self._losses) if self._losses else np.zeros((0, len(self._tenants)), np.float32)
        return {t: losses[:, i] for i, t in enumerate(self._tenants)}

    # ------------------------------------------------------------------- training
    def step(self, batches_by_tenant: Mapping[Hashable, PyTree]) -> dict[Hashable, float]:
        """One update of every active tenant on its own batch; returns tenant -> loss of those tenants.

        Every tenant needs a batch, of one structure and shape for all (they run as one
        program). Host arrays are stacked on the host, device arrays on the device.

        Raises:
          UnknownTenantError: a key is not a tenant (nothing is computed).
          InputError: a tenant has no batch, or its batch differs in structure or shape.
          NonFiniteLossError: with on_nonfinite="raise", a tenant's loss, gradients,
            updated params or optimizer state are not finite (no tenant is updated).
        """
        if not isinstance(batches_by_tenant, Mapping):
            raise InputError(f"step takes a mapping tenant -> batch, got {type(batches_by_tenant).__name__}; use step_stacked for stacked batches")
        for tenant_id in batches_by_tenant:
            self._position(tenant_id)
        missing = [t for t in self._tenants if t not in batches_by_tenant]
        if missing:
            raise InputError(f"no batch for tenants {missing!r}: every tenant trains in each step")
        first = self._tenants[0]
        want_leaves, want_def = jax.tree_util.tree_flatten_with_path(batches_by_tenant[first])
        for tenant_id in self._tenants[1:]:
            got_leaves, got_def = jax.tree_util.tree_flatten(batches_by_tenant[tenant_id])
            if got_def != want_def:
                where = first_structure_difference(batches_by_tenant[first], batches_by_tenant[tenant_id])
                where = where or f"mappings of other types, {got_def} for {want_def}"  # None: only mapping types differ
                raise InputError(f"tenant {tenant_id!r}: batch structure differs from that of tenant {first!r}: {where}")
            for (path, want), got in zip(want_leaves, got_leaves):
                if np.shape(got) != np.shape(want):
                    raise InputError(
                        f"tenant {tenant_id!r}: batch leaf {jax.tree_util.keystr(path)} has shape {list(np.shape(got))}, "
                        f"expected {list(np.shape(want))} like tenant {first!r}"
                    )
        stacked = jax.tree.map(_stack, *(batches_by_tenant[t] for t in self._tenants))
        return self.step_stacked(stacked)

    def step_stacked(self, batch: PyTree) -> dict[Hashable, float]:
        """``step`` with the batches already stacked: every leaf [tenants, ...] in ``tenants`` order."""
        self._check_stacked_batch(batch)
        active = self._active.copy()
        params, opt_state, losses, finite = self._run_step(self._step_program, active, batch)
        flagged = active & ~finite
        if flagged.any() and self._own_pass_program is not None:
            # The summed backward may have carried one tenant's NaN or Inf into others: the flagged
            # tenants again, each on its own pass. Frozen in the first pass, they hold their params
            # from before the step; under "raise" nothing was updated, so every active tenant goes again.
            again = flagged if self.on_nonfinite == "freeze" else active
            params, opt_state, losses_again, finite_again = self._run_step(self._own_pass_program(), again, batch)
            losses, finite = np.where(again, losses_again, losses), np.where(again, finite_again, finite)
        bad = [t for t, on, ok in zip(self._tenants, active, finite) if on and not ok]
        step_index = len(self._losses)
        if bad and self.on_nonfinite == "raise":
            raise NonFiniteLossError(
                f"step {step_index}: loss, gradients, updated params or optimizer state are NaN or Inf for tenants {bad!r} "
                f"(losses {[float(losses[self._index[t]]) for t in bad]}); no tenant was updated. "
                f"Lower their learning rates or stop them with freeze()",
                bad,
                step_index,
            )
        self._params, self._opt_state = params, opt_state
        for tenant_id in bad:
            self._active[self._index[tenant_id]] = False
            self.diverged[tenant_id] = step_index
        self._losses.append(np.where(active, losses, np.nan).astype(np.float32))
        if bad:  # after the bookkeeping: a warning filter that raises must not leave the step half recorded
            warnings.warn(
                f"step {step_index}: tenants {bad!r} diverged (NaN or Inf loss, gradients, updated params or optimizer state); they keep the "
                f"params from before this step and train no further",
                RuntimeWarning,
                stacklevel=2,
            )
        return {t: float(losses[i]) for i, t in enumerate(self._tenants) if active[i]}

    def _run_step(self, program: Callable, active: np.ndarray, batch: PyTree) -> tuple[PyTree, PyTree, np.ndarray, np.ndarray]:
        """One run of a step program on the trainer's params: (params, opt_state, losses, finite),
        the last two as NumPy arrays. Under "freeze" the program donated the trainer's buffers,
        so the trainer holds the new ones before this waits for the losses: an interrupt there
        (Ctrl-C) leaves the trainer with its weights (the step is then not counted)."""
        try:
            params, opt_state, losses, finite = program(self._params, self._opt_state, jnp.asarray(active), batch)
        except _CONCRETE_VALUE_ERRORS as exc:  # raised while tracing: nothing ran, nothing changed
            raise self._concrete_value_error(exc) from exc
        if self.on_nonfinite == "freeze":
            self._params, self._opt_state = params, opt_state
        return params, opt_state, np.asarray(losses), np.asarray(finite)

    def freeze(self, tenant_ids: Sequence[Hashable]) -> None:
        """Stops updating these tenants (early stopping of a trial); their params stay as they are.

        Raises:
          UnknownTenantError: an id is not a tenant (nobody is frozen).
          TypeError: a lone string instead of a sequence of ids.
        """
        positions = [self._position(t) for t in _id_list(tenant_ids, "freeze")]
        self._active[positions] = False

    def set_hyperparam(self, name: str, values: float | Sequence[float] | Mapping[Hashable, float]) -> None:
        """Changes a per-tenant hyperparameter from the next step on (e.g. decay one trial's rate).

        ``values``: one number for all tenants, a sequence [tenants], or tenant -> number for
        some of them. The optimizer state keeps its moments; no recompilation.

        Raises:
          KeyError: ``name`` is not a hyperparameter given to the constructor.
          UnknownTenantError, ValueError: as for the constructor.
        """
        if name not in self._hyper_names:
            raise KeyError(f"{name!r} is not a per-tenant hyperparameter; known: {list(self._hyper_names)}")
        current = np.asarray(self._opt_state.hyperparams[name])
        if isinstance(values, Mapping):
            new = current.astype(np.float64)  # as given, until checked against the stored dtype
            for tenant_id, value in values.items():
                position = self._position(tenant_id)
                number = np.asarray(value)
                if number.ndim != 0 or number.dtype.kind not in "iuf":
                    raise ValueError(f"hyperparameter {name!r} of tenant {tenant_id!r} must be a number, got {value!r}")
                new[position] = number
        else:
            per_tenant = split_hyperparams({name: values}, self._tenants)[1]
            if name not in per_tenant:  # a bool, None, a string or a callable: not a per-tenant number
                raise ValueError(f"hyperparameter {name!r} must be a number or a sequence of {len(self._tenants)} numbers, got {values!r}")
            new = np.asarray(per_tenant[name], np.float64)
        if not np.all(np.isfinite(new)):
            raise ValueError(f"hyperparameter {name!r} must be finite, got {new.tolist()}")
        if current.dtype.kind in "iu" and not np.array_equal(new, np.round(new)):
            raise ValueError(f"hyperparameter {name!r} holds integers (it was given as {current.tolist()}); "
                             f"{new.tolist()} would be truncated: give it as a float (e.g. 0.0) to the constructor")
        with np.errstate(over="ignore", invalid="ignore"):
            stored = new.astype(current.dtype)
        as_float = stored.astype(np.float64)
        unfit = ~np.isfinite(as_float) | ((as_float != new) if current.dtype.kind in "iu" else False)
        if unfit.any():
            i = int(np.argmax(unfit))
            raise ValueError(f"hyperparameter {name!r} of tenant {self._tenants[i]!r} is held as {current.dtype.name}, "
                             f"which cannot hold {float(new[i])!r} (it would become {stored[i].item()!r})")
        hyperparams = dict(self._opt_state.hyperparams)
        hyperparams[name] = jnp.asarray(stored)
        self._opt_state = self._opt_state._replace(hyperparams=hyperparams)

    def evaluate(self, fn: Callable[[PyTree, PyTree], Any], batch: PyTree, *, stacked: bool = False) -> dict[Hashable, Any]:
        """``fn(params, batch)`` of every tenant in one vmapped program; returns tenant -> NumPy value.

        ``batch`` is shared by all tenants (e.g. a validation set), or with ``stacked=True``
        has a leading tenant axis. The compiled program is cached per ``fn``.

        Raises:
          InputError: with ``stacked=True``, a batch leaf without a leading tenant axis.
        """
        if stacked:
            self._check_stacked_batch(batch)
        values = jax.tree.map(np.asarray, eval_program(fn, stacked, self.lowering)(self._params, batch))
        return {t: jax.tree.map(lambda v: v[i], values) for i, t in enumerate(self._tenants)}

    # --------------------------------------------------------------------- export
    def export_to(self, model: "MultiTenantModel", tenant_ids: Sequence[Hashable] | None = None, *, replace: bool = False) -> list[Hashable]:
        """Writes trained tenants into a serving model's store, device to device; returns their ids.

        Default: every tenant that did not diverge. New tenants go in with one validated
        scatter (``TenantStore.add_stacked``); with ``replace=True`` resident ones are updated
        in place, otherwise a resident id raises DuplicateTenantError before any change. All
        or nothing: every row is checked before the first is written.

        Raises:
          UnknownTenantError: an id is not a tenant of this trainer (nothing is exported).
          TypeError: a lone string instead of a sequence of ids.
          ParamMismatchError: the model's template differs from these params.
          NonFiniteParamsError: a tenant's params hold NaN or Inf (naming it; nothing is exported).
        """
        ids = [t for t in self._tenants if t not in self.diverged] if tenant_ids is None else _id_list(tenant_ids, "export_to")
        positions = [self._position(t) for t in ids]
        with model.store.lock:
            updated = [(t, p) for t, p in zip(ids, positions) if replace and t in model]
            new = [(t, p) for t, p in zip(ids, positions) if not (replace and t in model)]
            if updated:  # checked before the first write; add_stacked checks the new ones itself, all or nothing
                model.store.check_stacked([t for t, _ in updated], self._rows_at([p for _, p in updated]))
            if new:
                model.store.add_stacked([t for t, _ in new], self._rows_at([p for _, p in new]))
            for tenant_id, position in updated:
                model.update_tenant(tenant_id, jax.tree.map(lambda leaf: leaf[position], self._params))
        return ids

    def _rows_at(self, positions: list[int]) -> PyTree:
        """The stacked params of the tenants at these positions, on the device."""
        if positions == list(range(len(self._tenants))):
            return self._params  # every tenant in order: no gather needed
        index = jax.device_put(np.asarray(positions, np.int32))  # explicit: indices only
        return jax.tree.map(lambda leaf: jnp.take(leaf, index, axis=0), self._params)

    def to_model(
        self, tenant_ids: Sequence[Hashable] | None = None, *, apply_fn: Callable[[PyTree, Any], Any] | None = None, **model_kwargs: Any
    ) -> "MultiTenantModel":
        """A MultiTenantModel serving the trained tenants (see ``export_to`` for which).

        ``apply_fn`` defaults to the one given to the constructor; other keyword arguments go
        to ``MultiTenantModel`` (capacity defaults to the number of tenants exported).
        """
        from jaxmt.model import MultiTenantModel

        apply_fn = apply_fn if apply_fn is not None else self.apply_fn
        if apply_fn is None:
            raise ValueError("to_model needs an apply_fn: pass it here or to the trainer's constructor")
        ids = [t for t in self._tenants if t not in self.diverged] if tenant_ids is None else _id_list(tenant_ids, "to_model")
        example = self.params_of(ids[0] if ids else self._tenants[0])
        model_kwargs.setdefault("capacity", max(1, len(ids)))
        model_kwargs.setdefault("lowering", self.lowering)
        model = MultiTenantModel(apply_fn, example, **model_kwargs)
        self.export_to(model, ids)
        return model

    # ------------------------------------------------------------------ internals
    def _check_stacked_batch(self, batch: PyTree) -> None:
        """InputError naming the first leaf of a stacked batch whose leading axis is not one row per tenant."""
        n = len(self._tenants)
        for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
            if np.ndim(leaf) < 1 or np.shape(leaf)[0] != n:
                where = f"leaf {jax.tree_util.keystr(path)}" if path else "array"
                raise InputError(f"batch {where} has shape {list(np.shape(leaf))}; expected a leading tenant axis of {n}")

    def _position(self, tenant_id: Hashable) -> int:
        try:
            return self._index[tenant_id]
        except (KeyError, TypeError):
            raise UnknownTenantError(tenant_id, len(self._tenants)) from None

    def __repr__(self) -> str:
        return (
            f"MultiTenantTrainer(tenants={len(self._tenants)}, active={int(self._active.sum())}, "
            f"steps={self.num_steps}, optimizer={getattr(self.optimizer, '__name__', self.optimizer)!s}, "
            f"hyperparams={list(self._hyper_names)})"
        )


def _check_ids(tenant_ids: Sequence[Hashable]) -> list[Hashable]:
    ids = _id_list(tenant_ids, "MultiTenantTrainer")  # once: an iterator would be empty the second time
    if not ids:
        raise ValueError("a trainer needs at least one tenant")
    return check_tenant_ids(ids)


def _id_list(tenant_ids: Sequence[Hashable], caller: str) -> list[Hashable]:
    """The ids as a list; a lone string is refused: iterated, it would name its characters as tenants."""
    if isinstance(tenant_ids, (str, bytes)):
        raise TypeError(f"{caller} takes a sequence of tenant ids, got the string {tenant_ids!r}; pass [{tenant_ids!r}]")
    return list(tenant_ids)


def _strong(leaf: jax.Array) -> jax.Array:
    """``leaf`` in its dtype, never weakly typed. A weak-typed leaf (what ``jnp.full((), 0.5)``
    in an init makes) and the optimizer moments initialised from it turn strong at the first
    updates, each a new signature that compiles the step again."""
    return leaf.astype(leaf.dtype) if getattr(leaf, "weak_type", False) else leaf


def _strong_copy(leaf: Any) -> jax.Array:
    """A device copy of ``leaf`` in its dtype, never weakly typed (see ``_strong``)."""
    return _strong(jnp.array(leaf, copy=True))


def _stack(*leaves: Any) -> Any:
    if any(isinstance(leaf, jax.Array) for leaf in leaves):
        return jnp.stack(leaves)
    return np.stack(leaves)

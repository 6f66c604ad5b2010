"""The pure parts of many-tenant training: one tenant's step, the compiled programs, data order.

``MultiTenantTrainer`` (``jaxmt/train.py``) holds the state; everything here is a pure
function of arrays and static configuration, or a cache of compiled programs keyed on what
defines them (loss, optimizer, static hyperparameters, parameter structure).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmt.lowering import LoweringPolicy, tenant_batched

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]


def split_trainable(treedef: Any, trainable: tuple[bool, ...] | None, params: PyTree) -> tuple[PyTree, PyTree]:
    """(trainable part, constant part): the same structure with None where a leaf is not held."""
    if trainable is None:
        return params, None
    leaves = treedef.flatten_up_to(params)
    train = treedef.unflatten([leaf if keep else None for leaf, keep in zip(leaves, trainable)])
    const = treedef.unflatten([None if keep else leaf for leaf, keep in zip(leaves, trainable)])
    return train, const


def merge_trainable(treedef: Any, trainable: tuple[bool, ...] | None, train: PyTree, const: PyTree) -> PyTree:
    """The inverse of ``split_trainable``: full params from the trainable and constant parts."""
    if trainable is None:
        return train
    train_leaves, const_leaves = treedef.flatten_up_to(train), treedef.flatten_up_to(const)
    return treedef.unflatten([t if keep else c for t, c, keep in zip(train_leaves, const_leaves, trainable)])


def _all_finite(tree: PyTree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _update_one(
    tx: optax.GradientTransformation, train: PyTree, opt_state: PyTree, grads: PyTree, loss: jax.Array, active: jax.Array
) -> tuple[PyTree, PyTree, jax.Array]:
    """One tenant's optimizer update; vmapped over tenants. Returns (train, opt_state, finite).

    A tenant that is inactive, or whose loss, gradients, updated params or updated optimizer
    state are not finite (a finite gradient times a huge learning rate can overflow; Adam's
    second moment overflows on gradients above ~1e19 in float32 while the params stay finite
    and stop moving), keeps its params and optimizer state (a select inside the program: no
    tenant's failure leaks into another).
    """
    updates, new_opt_state = tx.update(grads, opt_state, train)
    new_train = optax.apply_updates(train, updates)
    # In the dtypes its init gave it (before the finiteness check: a cast may overflow): the per-tenant
    # hyperparameters are float32 arrays, which promote a bfloat16 moment to float32 (optax alone, given
    # numbers, keeps it bfloat16; a new dtype would also compile the step again).
    new_opt_state = jax.tree.map(lambda new, old: new.astype(old.dtype), new_opt_state, opt_state)
    finite = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(new_train) & _all_finite(new_opt_state)
    commit = active & finite
    new_train = jax.tree.map(lambda new, old: jnp.where(commit, new, old), new_train, train)
    new_opt_state = jax.tree.map(lambda new, old: jnp.where(commit, new, old), new_opt_state, opt_state)
    return new_train, new_opt_state, finite


def tenants_step(
    loss_k: Callable[[PyTree, PyTree], jax.Array],
    tx: optax.GradientTransformation,
    treedef: Any,
    trainable: tuple[bool, ...] | None,
    params_k: PyTree,
    opt_state_k: PyTree,
    active_k: jax.Array,
    batch_k: PyTree,
    per_tenant_loss: Callable | None = None,
) -> tuple[PyTree, PyTree, jax.Array, jax.Array]:
    """One step of K tenants: (params_k, opt_state_k, losses [K], finite [K]).

    ``loss_k`` is the tenant-batched loss (``jaxmt.lowering.tenant_batched``), [K] losses.
    Tenants share no weights, so the gradient of the summed losses with respect to tenant
    k's params is the gradient of tenant k's own loss: one backward pass serves all.

    With ``per_tenant_loss`` given the step takes ``vmap(value_and_grad)`` of the one-tenant
    loss instead: each tenant's backward pass is its own. Under plain vmap the gradient of
    the summed losses makes each conv's filter gradient one conv with
    ``batch_group_count = K``, which XLA on CPUs computes densely with zero masks, so a NaN
    or Inf in one tenant's batch can reach every tenant's gradient (0 x NaN); per tenant it
    reaches its own only. Which form a trainer runs, and how it keeps tenants apart with the
    summed one, is ``MultiTenantTrainer``'s ``backward``.
    """
    train_k, const_k = split_trainable(treedef, trainable, params_k)

    def total(train_k: PyTree) -> tuple[jax.Array, jax.Array]:
        losses = loss_k(merge_trainable(treedef, trainable, train_k, const_k), batch_k)
        return jnp.sum(losses), losses

    if per_tenant_loss is not None:  # vmap(grad): each tenant's backward pass is its own (no batch-grouped conv)
        def one(train: PyTree, const: PyTree, batch: PyTree) -> jax.Array:
            return per_tenant_loss(merge_trainable(treedef, trainable, train, const), batch)

        losses, grads_k = jax.vmap(jax.value_and_grad(one))(train_k, const_k, batch_k)
    else:
        (_, losses), grads_k = jax.value_and_grad(total, has_aux=True)(train_k)
    update = functools.partial(_update_one, tx)
    new_train_k, new_opt_state_k, finite = jax.vmap(update)(train_k, opt_state_k, grads_k, losses, active_k)
    return merge_trainable(treedef, trainable, new_train_k, const_k), new_opt_state_k, losses.astype(jnp.float32), finite


def _injected(
    optimizer: Callable[..., optax.GradientTransformation], static: tuple[tuple[str, Any], ...], hyper_names: tuple[str, ...]
) -> Callable[..., Any]:
    """``optimizer`` under ``optax.inject_hyperparams`` with only ``hyper_names`` (the per-tenant
    numbers) held in the state; every other argument, given in ``static`` or left at its default,
    reaches the optimizer as given, as it does without the trainer. Injected, a default would be
    traced (adafactor reads min_dim_size_to_factor in Python) and cast to the params' dtype
    (adam's b2=0.999 is 1.0 in bfloat16, where its bias correction divides by zero)."""
    factory = _named_factory(optimizer, (*dict(static), *hyper_names))
    static_args = tuple(name for name in inspect.signature(factory).parameters if name not in hyper_names)
    return functools.partial(optax.inject_hyperparams(factory, static_args=static_args), **dict(static))


_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def _named_factory(optimizer: Callable[..., optax.GradientTransformation], names: Sequence[str]) -> Callable[..., Any]:
    """``optimizer`` with a signature that names each of ``names`` and nothing variadic.
    ``optax.inject_hyperparams`` binds arguments by the signature and calls the factory with
    them by name: one that lands in ``**kwargs`` (a wrapper's ``**options``) reached the
    factory as a single argument named after the ``**kwargs``, so it was lost, silently."""
    parameters = [p for p in inspect.signature(optimizer).parameters.values() if p.kind in _NAMED]
    named = {p.name for p in parameters}
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY) for name in names if name not in named]
    if not extra:
        return optimizer

    @functools.wraps(optimizer)
    def factory(**kwargs: Any) -> optax.GradientTransformation:
        return optimizer(**kwargs)

    factory.__signature__ = inspect.Signature([*parameters, *extra])  # read before __wrapped__
    return factory


# Programs are cached on what defines them, so trainers rebuilt with the same loss, optimizer
# and architecture (successive-halving rounds, a notebook re-run) reuse the compiled code.
def _cached(build: Callable[..., Any]) -> Callable[..., Any]:
    cached = functools.lru_cache(maxsize=64)(build)

    def get(*key: Any) -> Any:
        try:
            hash(key)
        except TypeError:  # e.g. an unhashable static hyperparameter: build, do not cache
            return build(*key)
        return cached(*key)

    return get


@_cached
def init_program(optimizer: Callable, static: tuple, hyper_names: tuple) -> Callable:
    """The compiled, tenant-vmapped optimizer init: per-tenant hyperparameters land in the state."""
    injected = _injected(optimizer, static, hyper_names)
    return jax.jit(jax.vmap(lambda hyper, params: injected(**hyper).init(params)))


@_cached
def step_program(
    loss_fn: LossFn,
    optimizer: Callable,
    static: tuple,
    hyper_names: tuple,
    treedef: Any,
    trainable: Any,
    lowering: LoweringPolicy,
    donate: bool,
    per_tenant: bool,
) -> Callable:
    """The compiled step; ``per_tenant``: each tenant's backward pass on its own
    (``vmap(value_and_grad)`` of ``loss_fn``, whatever the lowering), else the gradient of the
    summed losses of ``loss_fn`` batched by ``lowering``."""
    # The update reads every numeric hyperparameter from the (per-tenant) optimizer state;
    # the values this transformation is built with only mark the names as numeric.
    tx = _injected(optimizer, static, hyper_names)(**{name: jnp.zeros((), jnp.float32) for name in hyper_names})
    step = functools.partial(tenants_step, tenant_batched(loss_fn, lowering), tx, treedef, trainable,
                             per_tenant_loss=loss_fn if per_tenant else None)
    # "raise" must be able to drop a step, so it keeps the old buffers (no donation).
    return jax.jit(step, donate_argnums=(0, 1) if donate else ())


@_cached
def eval_program(fn: Callable, stacked: bool, lowering: LoweringPolicy) -> Callable:
    """The compiled ``fn(params, batch)`` of every tenant, with ``batch`` shared or (``stacked``)
    per tenant; batched by ``lowering``."""
    if lowering.is_plain_vmap:
        return jax.jit(jax.vmap(fn, in_axes=(0, 0 if stacked else None)))
    fn_k = tenant_batched(fn, lowering)

    def shared(params_k: PyTree, batch: PyTree) -> Any:  # the interpreter wants a tenant axis on every input
        tenants = jax.tree.leaves(params_k)[0].shape[0]
        return fn_k(params_k, jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, (tenants, *jnp.shape(leaf))), batch))

    return jax.jit(fn_k if stacked else shared)


@_cached
def stacked_init_program(init_fn: Callable) -> Callable:
    """The compiled, vmapped ``init_fn``: every tenant's params from its seed in one program."""
    return jax.jit(jax.vmap(init_fn))


def shuffled_batch_indices(num_examples: int, batch_size: int, seeds: Sequence[int], epochs: int = 1) -> np.ndarray:
    """Per-tenant data order: row indices [steps, tenants, batch_size], one shuffle per epoch.

    Tenant t draws its permutations from ``np.random.default_rng(seeds[t])``; the last partial
    batch of each epoch is dropped, so ``steps = epochs * (num_examples // batch_size)``.
    ``x[idx[s]]`` is then the stacked batch [tenants, batch_size, ...] of step s, and
    ``x[idx[:, t]]`` tenant t's batches when it is trained alone.

    Raises:
      ValueError: batch_size outside [1, num_examples], epochs < 1, or no seeds.
    """
    if not 1 <= batch_size <= num_examples:
        raise ValueError(f"batch_size must be in [1, {num_examples}] (num_examples), got {batch_size}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds must name at least one tenant")
    per_epoch = num_examples // batch_size
    idx = np.empty((epochs * per_epoch, len(seeds), batch_size), np.int64)
    for t, seed in enumerate(seeds):
        rng = np.random.default_rng(int(seed))
        for epoch in range(epochs):
            order = rng.permutation(num_examples)[: per_epoch * batch_size]
            idx[epoch * per_epoch : (epoch + 1) * per_epoch, t] = order.reshape(per_epoch, batch_size)
    return idx


def split_hyperparams(hyperparams: Mapping[str, Any], tenants: list[Hashable]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(static values, per-tenant numeric values [tenants]) from the user's hyperparameters."""
    static: dict[str, Any] = {}
    per_tenant: dict[str, np.ndarray] = {}
    n = len(tenants)
    for name, value in hyperparams.items():
        # Not numbers: passed to the optimizer as given (a pytree such as adamw's mask is a Mapping).
        if value is None or isinstance(value, (bool, str, Mapping)) or callable(value):
            static[name] = value
            continue
        values = np.asarray(value)
        if values.dtype.kind not in "iuf" or values.ndim > 1:
            raise ValueError(f"hyperparameter {name!r} must be a number or a sequence of {n} numbers, got {value!r}")
        if values.ndim == 1 and values.shape[0] != n:
            raise ValueError(f"hyperparameter {name!r} has {values.shape[0]} values for {n} tenants")
        given = np.broadcast_to(values, (n,))
        with np.errstate(over="ignore", invalid="ignore"):
            values = given.astype(np.float32 if given.dtype.kind == "f" else np.int32)
        if not np.all(np.isfinite(values)):
            bad = tenants[int(np.argmin(np.isfinite(values)))]
            raise ValueError(f"hyperparameter {name!r} of tenant {bad!r} is not finite")
        if values.dtype.kind == "i" and not np.array_equal(values, given):
            i = int(np.argmin(values == given))
            raise ValueError(f"hyperparameter {name!r} of tenant {tenants[i]!r} is the integer {given[i]}, "
                             f"which int32 cannot hold: give it as a float")
        per_tenant[name] = values
    return static, per_tenant

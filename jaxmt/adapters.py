"""Adapters: Flax modules (linen and nnx) to the core contract ``apply_fn(params, x)``.

The core knows only a pure function of one tenant and a params pytree. For linen the params
are the ``variables`` dict as given (less sown intermediates, below). For nnx they are the module's state as a pure dict of
arrays, so that the store, checkpoints and training treat both alike.

An nnx module's RNG state (the ``nnx.Rngs`` streams that e.g. ``nnx.Dropout(rate, rngs=rngs)``
holds: a typed key and a counter) is not served per tenant: a key is not a weight, and the
store cannot stack a typed-key leaf. It is split off every module, and the template
module's RNG state is merged back in at each call. Serving is inference: the graph comes
from a copy of the template module put in eval mode (``module.eval()``), so that dropout is
the identity and BatchNorm uses each tenant's running statistics, which are served per
tenant like its weights, whatever mode the modules were given in (in train mode a tenant's
answer would depend on the other rows of its step).

What a module sowed (nnx ``Intermediate`` state, linen's ``intermediates`` collection) is
likewise not served: it is an earlier call's output, shaped by that call's batch, and a
call that may not change it never reads it; a tenant may come with it or without.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any

from jaxmt.errors import DuplicateTenantError

PyTree = Any

# The linen collection that ``sow`` writes: outputs of an earlier call, not weights.
LINEN_INTERMEDIATES = "intermediates"


def _linen_apply(module: Any, method: Any, apply_kwargs: tuple, variables: PyTree, x: Any) -> Any:
    return module.apply(variables, x, method=method, **dict(apply_kwargs))


def _nnx_apply(graphdef: Any, rng_state: Any, abstract_state: Any, method: Any, apply_kwargs: tuple,
               pure_state: PyTree, x: Any) -> Any:
    """One tenant's call: the template's graph and RNG state with the tenant's other state.

    Both states are copied first: ``replace_by_pure_dict`` fills in place, and ``nnx.merge``
    shares Variables with the states it is given, so a call that advanced an RNG counter
    would otherwise write a tracer into the template's state."""
    from flax import nnx

    state = _clone_state(abstract_state)
    nnx.replace_by_pure_dict(state, pure_state)  # fills the copy in place
    module = nnx.merge(graphdef, _clone_state(rng_state), state)
    call = module if method is None else (getattr(module, method) if isinstance(method, str) else functools.partial(method, module))
    return call(x, **dict(apply_kwargs))


def _clone_state(state: Any) -> Any:
    import jax

    return jax.tree_util.tree_map(lambda leaf: leaf, state)


def _nnx_unserved() -> tuple:
    """Filters of the nnx state that is not served per tenant: RNG streams and sown
    intermediates (see the module docstring)."""
    from flax import nnx

    return (nnx.RngState, nnx.Intermediate)


def _nnx_pure_state(value: Any) -> PyTree:
    """A tenant's servable state as a pure dict: its module's or ``nnx.State``'s state less
    the RNG state and sown intermediates, which are not per tenant (see the module docstring)."""
    from flax import nnx

    if isinstance(value, nnx.Module):
        *_, state = nnx.state(value, *_nnx_unserved(), ...)
    elif isinstance(value, nnx.State):
        *_, state = nnx.split_state(value, *_nnx_unserved(), ...)
    else:  # a pure dict already (e.g. from nnx.to_pure_dict): checked against the template when added
        return value
    return nnx.to_pure_dict(state)


def _linen_served(variables: PyTree) -> PyTree:
    """A tenant's linen variables less the ``intermediates`` collection (see the module
    docstring); variables that are not a mapping are left to the template check."""
    if isinstance(variables, Mapping) and LINEN_INTERMEDIATES in variables:
        return {name: value for name, value in variables.items() if name != LINEN_INTERMEDIATES}
    return variables


def _by_tenant(variables_by_tenant: Any) -> dict[Hashable, PyTree]:
    """``variables_by_tenant`` as a dict: a mapping of id to variables, or an iterable of
    ``(id, variables)`` pairs (a generator, ``dict.items()``).

    Items that are not pairs are refused rather than handed to ``dict()``: of a list of
    linen variables dicts it would take each dict's two collection names as an id and its
    variables. A repeated id among pairs is refused too, where ``dict()`` keeps the last.

    Raises:
      TypeError: neither a mapping nor an iterable of pairs (naming the first other item).
      DuplicateTenantError: an id given twice.
    """
    if isinstance(variables_by_tenant, Mapping):
        return dict(variables_by_tenant)
    taken = "a mapping of tenant id to variables or an iterable of (id, variables) pairs"
    if isinstance(variables_by_tenant, (str, bytes)) or not isinstance(variables_by_tenant, Iterable):
        raise TypeError(f"variables_by_tenant must be {taken}, got {type(variables_by_tenant).__name__}")
    tenants: dict[Hashable, PyTree] = {}
    for position, item in enumerate(variables_by_tenant):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"variables_by_tenant must be {taken}; item {position} is a {type(item).__name__}")
        tenant_id, variables = item
        if tenant_id in tenants:
            raise DuplicateTenantError(f"tenant {tenant_id!r} is given twice in variables_by_tenant (item {position})")
        tenants[tenant_id] = variables
    return tenants


def flax_apply_and_params(
    module: Any,
    variables_by_tenant: Mapping[Hashable, PyTree] | Iterable[tuple[Hashable, PyTree]],
    method: str | Callable | None = None,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> tuple[Callable[[PyTree, Any], Any], dict[Hashable, PyTree], PyTree]:
    """Returns ``(apply_fn, params_by_tenant, example_params)`` for a linen or nnx module.

    ``variables_by_tenant`` is a mapping or an iterable of ``(id, variables)`` pairs. For
    nnx, ``module``'s RNG state is kept by ``apply_fn`` and shared by every tenant; the
    params are the rest of each module's state less what it sowed."""
    import jax
    import numpy as np
    from flax import linen, nnx

    from jaxmt.validation import leaf_dtype

    kwargs = tuple(sorted((apply_kwargs or {}).items()))
    if isinstance(module, (nnx.Module, linen.Module)):
        variables_by_tenant = _by_tenant(variables_by_tenant)
    if isinstance(module, nnx.Module):
        module = nnx.clone(module)  # put in eval mode here, not the caller's module
        module.eval()
        nnx.pop(module, nnx.Intermediate)  # what it sowed: not in the graph every call merges into
        graphdef, rng_state, state = nnx.split(module, nnx.RngState, ...)
        params_by_tenant = {t: _nnx_pure_state(v) for t, v in variables_by_tenant.items()}
        example = nnx.to_pure_dict(state)
        # Shapes and dtypes only: every call fills a copy with its tenant's values, so the
        # template module's own arrays would be device memory held for nothing.
        abstract_state = jax.tree_util.tree_map(lambda leaf: jax.ShapeDtypeStruct(np.shape(leaf), leaf_dtype(leaf)), state)
        apply_fn = functools.partial(_nnx_apply, graphdef, rng_state, abstract_state, method, kwargs)
        return apply_fn, params_by_tenant, example
    if isinstance(module, linen.Module):
        if not variables_by_tenant:
            raise ValueError("a linen module needs at least one tenant's variables to serve as the template")
        params_by_tenant = {t: _linen_served(v) for t, v in variables_by_tenant.items()}
        example = next(iter(params_by_tenant.values()))
        return functools.partial(_linen_apply, module, method, kwargs), params_by_tenant, example
    raise TypeError(f"from_flax takes a flax.linen.Module or flax.nnx.Module, got {type(module).__name__}")

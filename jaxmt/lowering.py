"""Lowering: how a function of one tenant becomes a function of K stacked tenants.

``tenant_batched(apply_fn, lowering)`` returns ``fn(params_k, x_kb) -> y_kb`` where every
leaf of ``params_k`` and ``x_kb`` has a leading tenant axis K.

``lowering="vmap"`` is ``jax.vmap(apply_fn)``: XLA batches a conv whose input and filter both
carry the tenant axis into ONE grouped convolution (tenants folded into feature groups),
which on an H100 ran 1x1 layers at 0.07-0.8x of the dense conv. Any other choice runs
``apply_fn`` through a tenant-batching interpreter of its jaxpr:

* ``apply_fn`` is traced once for ONE tenant (``jax.make_jaxpr``) and its equations are
  evaluated with K-stacked values. A ``conv_general_dilated`` whose input and filter are
  both tenant-batched is replaced by the lowering that the policy picks for its shape
  (``jaxmt.lowering_ops``: batched matmul, per-tenant loop, grouped conv in another
  layout, ...). Every other equation is evaluated by ``jax.vmap`` of that one primitive,
  so it batches exactly as plain vmap would (dense layers already become one batched
  ``dot_general``, which is the fast form: nothing to choose there).
* Jit-wrapped sub-functions (``pjit``, ``closed_call``, ``checkpoint``) that contain convs
  are inlined so their convs are seen (a ``checkpoint`` block is evaluated inside
  ``jax.checkpoint`` again, so that the backward pass still recomputes it); scans, conds
  and custom-derivative functions are batched whole by vmap, so convs inside them keep
  vmap's form.

Why a jaxpr transform rather than interception of Flax modules (``nn.intercept_methods``):
it needs no Flax at all, so it works for linen, nnx, Equinox, Haiku and plain JAX alike,
and it sees every conv however it was written (``nn.Conv``, ``lax.conv`` in a custom
module, ``jax.nn`` helpers). The costs: ``apply_fn`` is traced a second time per program
(milliseconds to a second for a ResNet-50, once per compile), layers are named by their
position and shape rather than by a module path, and convs hidden in control flow are not
rewritten. All lowerings are ordinary differentiable JAX, so gradients flow through them.

Measured on an H100 (bf16, benchmarks/README.md "Lowering"): "auto" ran ResNet-50 at 16
tenants x 8 images at 0.95-1.00x of exclusive access with the Pallas implicit-GEMM kernel
among its choices (0.85x without it; naive vmap: 0.43x), ResNet-18 at 32 x 8 at 0.97-1.01x
(0.65x without; vmap 0.52-0.58x), MobileNetV2 at 16 x 8 at 0.93-1.06x, none of its convs on
the kernel (vmap 0.27-0.48x). The kernel (``jaxmt.pallas_conv``) runs the 3x3 convs that XLA's
grouped forms run at 0.1-0.7x of a dense conv, and ResNet's 7x7 stem at about twice XLA's own
dense stem.

The policy (``LoweringPolicy``, or a string or mapping that converts to one):

  "vmap"    plain ``jax.vmap`` (nothing interpreted).
  "auto"    (``MultiTenantModel``'s default) per conv: the disk cache, else measure on the
            device (GPU/TPU; the first compile of a new architecture then takes longer),
            else the choice cached for the same layer at another K x B, else the rule
            (``jaxmt.autotune``). Layers other than convs batch as under "vmap".
  "rule"    per conv: ``jaxmt.autotune.default_rule`` (no measurement, no cache).
  a name    one of ``CONV_LOWERINGS`` forced wherever it applies; vmap where it does not.
  mapping   per-layer overrides on top of "auto": keys are "conv:<i>" (the i-th
            tenant-batched conv in trace order, as ``describe_lowering`` lists them; convs
            inside scans, loops, conds and custom-derivative functions are not counted, as
            they are not lowered), a layer kind ("1x1", "kxk", "depthwise", "grouped") or a
            signature key.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import threading
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax import lax
from jax.extend import core as jex_core

from jaxmt.autotune import Planner, default_cache_path, default_rule
from jaxmt.lowering_ops import CONV_LOWERINGS, ConvParams, ConvSignature, applicable, lower_conv

POLICIES: tuple[str, ...] = ("vmap", "auto", "rule")
LOWERINGS: tuple[str, ...] = tuple(dict.fromkeys((*POLICIES, *CONV_LOWERINGS)))
LAYER_KINDS: tuple[str, ...] = ("1x1", "kxk", "depthwise", "grouped")

PyTree = Any


@dataclasses.dataclass(frozen=True)
class LoweringPolicy:
    """How each tenant-batched conv is lowered; hashable, and ``key`` names it in program keys.

    Attributes:
      default: "vmap", "auto", "rule" or a conv lowering forced wherever it applies.
      overrides: ``((selector, lowering), ...)`` or a mapping ``{selector: lowering}``; a
        selector is "conv:<i>", a layer kind or a signature key (``ConvSignature.key``).
        Two choices for one selector raise ``ValueError``; an override that does not apply
        to its layer raises ``ValueError`` when the program is traced.
      autotune: measure on the device when "auto" has no cached choice (None: on for
        GPU/TPU, off on CPU, ``JAXMT_AUTOTUNE`` overrides).
      cache_path: the choices file (None: ``$JAXMT_LOWERING_CACHE`` or
        ``~/.cache/jaxmt/lowering.json``).
    """

    default: str = "auto"
    overrides: tuple[tuple[str, str], ...] | Mapping[str, str] = ()
    autotune: bool | None = None
    cache_path: str | None = None

    def __post_init__(self) -> None:
        if self.default not in LOWERINGS:
            raise ValueError(f"unknown lowering {self.default!r}; choose one of {LOWERINGS}")
        object.__setattr__(self, "overrides", _override_pairs(self.overrides))
        for selector, choice in self.overrides:
            if choice not in CONV_LOWERINGS:
                raise ValueError(f"override {selector!r}: unknown conv lowering {choice!r}; choose one of {CONV_LOWERINGS}")
            if not isinstance(selector, str) or not (
                selector in LAYER_KINDS or _SIGNATURE_KEY.fullmatch(selector) or _layer_index(selector) is not None
            ):
                raise ValueError(
                    f"override selector {selector!r} is not 'conv:<i>', a layer kind {LAYER_KINDS} or a signature key"
                )
        # "conv:07" names conv 7, as "conv:7" does (the interpreter looks the latter up).
        canonical = tuple((f"conv:{_layer_index(sel)}" if _layer_index(sel) is not None else sel, choice)
                          for sel, choice in self.overrides)
        _check_no_conflicts(self.overrides, canonical)
        object.__setattr__(self, "overrides", canonical)

    @classmethod
    def of(cls, lowering: str | LoweringPolicy | Mapping[str, str]) -> LoweringPolicy:
        """Converts the ``lowering`` argument of ``MultiTenantModel`` into a policy."""
        if isinstance(lowering, LoweringPolicy):
            return lowering
        if isinstance(lowering, str):
            return cls(default=lowering)
        if isinstance(lowering, Mapping):
            return cls(overrides=lowering)
        raise TypeError(f"lowering must be a str, a mapping or a jaxmt LoweringPolicy, got {type(lowering).__name__}")

    @property
    def is_plain_vmap(self) -> bool:
        """Whether the policy is plain ``jax.vmap`` everywhere (no per-conv lowering to choose)."""
        return self.default == "vmap" and not self.overrides

    @property
    def key(self) -> str:
        """A string that differs whenever the programs this policy builds may differ."""
        if self.is_plain_vmap:
            return "vmap"
        parts = [self.default]
        parts += [f"{s}={c}" for s, c in self.overrides]
        if self.autotune is not None:
            parts.append(f"autotune={int(self.autotune)}")
        if self.cache_path is not None:
            parts.append(f"cache={self.cache_path}")
        return ";".join(parts)


def lowering_key(lowering: str | LoweringPolicy | Mapping[str, str]) -> str:
    """The ``ProgramKey.lowering`` string of a ``lowering`` argument."""
    return LoweringPolicy.of(lowering).key


# What ``ConvSignature.key`` looks like (dims, strides, padding, then optional fields and the
# dtypes), so that a typo such as "conv 0" (for "conv:0") is refused instead of matching no
# layer, silently.
_SIGNATURE_KEY = re.compile(r"conv K=\d+ x=[\dx]+ w=[\dx]+ s=[\dx]+ p=[-\d:,]+( \S+=\S+)*? dt=\S+( .+)?")


def _override_pairs(overrides: Any) -> tuple[tuple[str, str], ...]:
    """``overrides`` as (selector, lowering) pairs; a mapping's items sorted, as
    ``LoweringPolicy.of`` takes them (a mapping iterated as pairs would unpack its keys)."""
    if isinstance(overrides, Mapping):
        return tuple(sorted((str(k), str(v)) for k, v in overrides.items()))
    items = [overrides] if isinstance(overrides, str) else list(overrides)
    for item in items:
        if isinstance(item, str) or not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"lowering overrides must be (selector, lowering) pairs or a mapping, got {item!r}")
    return tuple((selector, choice) for selector, choice in items)


def _check_no_conflicts(given: tuple[tuple[str, str], ...], canonical: tuple[tuple[str, str], ...]) -> None:
    """Refuses two overrides of one selector ("conv:7" and "conv:07") with different choices:
    the interpreter would honour whichever came last, an accident of their order."""
    seen: dict[str, tuple[str, str]] = {}
    for (name, choice), (selector, _) in zip(given, canonical):
        if selector in seen and seen[selector][1] != choice:
            first, first_choice = seen[selector]
            raise ValueError(f"overrides {first!r}={first_choice} and {name!r}={choice} both select {selector}; "
                             "give each layer one choice")
        seen.setdefault(selector, (name, choice))


def _layer_index(selector: str) -> int | None:
    if selector.startswith("conv:") and selector[5:].isdigit():
        return int(selector[5:])
    return None


_PLANNERS: dict[tuple[Any, str], Planner] = {}
_PLANNERS_LOCK = threading.Lock()


def _planner_for(policy: LoweringPolicy) -> Planner:
    """One planner per (autotune, cache file) per process, so each layer is measured once."""
    path = str(policy.cache_path or default_cache_path())
    key = (policy.autotune, path)
    with _PLANNERS_LOCK:
        if key not in _PLANNERS:
            _PLANNERS[key] = Planner(policy.autotune, path)
        return _PLANNERS[key]


@dataclasses.dataclass(frozen=True)
class LayerChoice:
    """What the interpreter did with one tenant-batched conv."""

    index: int
    signature: ConvSignature
    lowering: str
    source: str  # "override", "forced", "fallback", "rule", "cache", "memo", "nearest" or "autotune"


class _Context:
    def __init__(self, tenants: int, policy: LoweringPolicy):
        self.tenants = tenants
        self.policy = policy
        self.overrides = dict(policy.overrides)
        self.choices: list[LayerChoice] = []

    def choose(self, sig: ConvSignature, params: ConvParams) -> tuple[str, str]:
        index = len(self.choices)
        for selector in (f"conv:{index}", sig.key, sig.kind):
            if selector in self.overrides:
                choice = self.overrides[selector]
                if not applicable(choice, sig):
                    raise ValueError(f"lowering override {selector}={choice} does not apply to conv:{index} ({sig.key})")
                return choice, "override"
        default = self.policy.default
        if default == "auto":
            return _planner_for(self.policy).choose(sig, params)
        if default == "rule":
            return default_rule(sig), "rule"
        if applicable(default, sig):
            return default, "forced"
        return "vmap", "fallback"


def tenant_batched(apply_fn: Callable[[Any, Any], Any], choice: str | LoweringPolicy | Mapping[str, str] = "vmap") -> Callable[[Any, Any], Any]:
    """The tenant-batched form of ``apply_fn`` under the given lowering policy.

    Args:
      apply_fn: ``apply_fn(params, x) -> y`` for one tenant.
      choice: a policy, or a string or mapping (see the module docstring).

    Returns:
      ``fn(params_k, x_kb) -> y_kb``; every input leaf has a leading tenant axis K, and so
      has every output leaf. Equal to ``jax.vmap(apply_fn)`` within the dtype's rounding.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> def apply_fn(w, x):  # a 1x1 conv, NHWC
      ...     return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
      >>> w_k = jax.random.normal(jax.random.key(0), (3, 1, 1, 4, 5))
      >>> x_kb = jax.random.normal(jax.random.key(1), (3, 2, 6, 6, 4))
      >>> y = tenant_batched(apply_fn, "einsum")(w_k, x_kb)
      >>> bool(jnp.allclose(y, jax.vmap(apply_fn)(w_k, x_kb), atol=1e-5))
      True
    """
    policy = LoweringPolicy.of(choice)
    if policy.is_plain_vmap:
        return jax.vmap(apply_fn)
    return functools.partial(_interpret_batched, apply_fn, policy, None)


def describe_lowering(
    apply_fn: Callable[[Any, Any], Any], params_k: PyTree, x_kb: PyTree, choice: str | LoweringPolicy | Mapping[str, str] = "auto"
) -> list[LayerChoice]:
    """The lowering chosen for each tenant-batched conv of ``apply_fn`` at these shapes.

    Arguments may be arrays or ``jax.ShapeDtypeStruct``; nothing is computed except the
    autotuner's measurements when "auto" meets an uncached layer on a GPU.
    """
    record: list[LayerChoice] = []
    jax.eval_shape(functools.partial(_interpret_batched, apply_fn, LoweringPolicy.of(choice), record), params_k, x_kb)
    return record


# ------------------------------------------------------------------ the interpreter
def _interpret_batched(apply_fn: Callable, policy: LoweringPolicy, record: list | None, params_k: PyTree, x_kb: PyTree) -> PyTree:
    leaves, treedef = jax.tree_util.tree_flatten((params_k, x_kb))
    if not leaves:
        raise ValueError("tenant_batched needs at least one array input")
    sizes = {int(np.shape(leaf)[0]) if np.ndim(leaf) else None for leaf in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"every input leaf needs the same leading tenant axis, got sizes {sorted(map(str, sizes))}")
    (tenants,) = sizes
    # (weak types kept: a weakly typed input promotes as it would under jax.vmap)
    one_tenant = [jax.ShapeDtypeStruct(np.shape(leaf)[1:], leaf.dtype, weak_type=bool(getattr(leaf, "weak_type", False)))
                  for leaf in leaves]
    closed, out_shape = jax.make_jaxpr(lambda *flat: apply_fn(*jax.tree_util.tree_unflatten(treedef, flat)), return_shape=True)(*one_tenant)
    ctx = _Context(tenants, policy)
    outs = _eval_jaxpr(closed.jaxpr, closed.consts, [(leaf, True) for leaf in leaves], ctx)
    beyond = sorted(i for sel, _ in policy.overrides if (i := _layer_index(sel)) is not None and i >= len(ctx.choices))
    if beyond:  # a typo'd index would otherwise change nothing, silently
        listed = f" (conv:0 to conv:{len(ctx.choices) - 1})" if ctx.choices else ""
        raise ValueError(f"lowering overrides name conv {beyond}, but the model has {len(ctx.choices)} tenant-batched "
                         f"convs{listed} outside control flow (convs in scans, loops, conds and custom-derivative "
                         "functions keep vmap's form and are not counted)")
    if record is not None:
        record.extend(ctx.choices)
    flat_out = [v if batched else _broadcast(v, tenants) for v, batched in outs]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), flat_out)


def _broadcast(value: Any, tenants: int) -> jax.Array:
    value = jax.numpy.asarray(value)
    return jax.numpy.broadcast_to(value, (tenants, *value.shape))


_REMAT_PRIMITIVES = ("checkpoint", "remat", "remat2")
_CALL_PRIMITIVES = ("pjit", "jit", "closed_call", "core_call", *_REMAT_PRIMITIVES)


def _inner_jaxpr(eqn: Any) -> tuple[Any, list] | None:
    """(jaxpr, consts) of a call-like equation that can be inlined, else None."""
    if eqn.primitive.name not in _CALL_PRIMITIVES:
        return None
    inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    if isinstance(inner, jex_core.ClosedJaxpr):
        return inner.jaxpr, list(inner.consts)
    if isinstance(inner, jex_core.Jaxpr) and not inner.constvars:
        return inner, []
    return None


@functools.lru_cache(maxsize=4096)
def _has_conv(jaxpr: Any) -> bool:
    for eqn in jaxpr.eqns:
        if eqn.primitive is lax.conv_general_dilated_p:
            return True
        inner = _inner_jaxpr(eqn)
        if inner is not None and _has_conv(inner[0]):
            return True
    return False


def _eval_jaxpr(jaxpr: Any, consts: list, args: list[tuple[Any, bool]], ctx: _Context) -> list[tuple[Any, bool]]:
    """Evaluates ``jaxpr`` on (value, tenant-batched?) pairs; batched values lead with K."""
    env: dict[Any, tuple[Any, bool]] = {}

    def read(var: Any) -> tuple[Any, bool]:
        return (var.val, False) if isinstance(var, jex_core.Literal) else env[var]

    env.update({var: (c, False) for var, c in zip(jaxpr.constvars, consts)})
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        outs = _eval_eqn(eqn, ins, ctx)
        for var, out in zip(eqn.outvars, outs):
            if not isinstance(var, jex_core.DropVar):
                env[var] = out
    return [read(v) for v in jaxpr.outvars]


def _bind_params(eqn: Any) -> tuple[list, dict]:
    # jax >= 0.7 returns the params alone; older versions (subfuns, params).
    got = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(got, tuple) and len(got) == 2 and isinstance(got[1], dict):
        return list(got[0]), got[1]
    return [], got


def _eval_eqn(eqn: Any, ins: list[tuple[Any, bool]], ctx: _Context) -> list[tuple[Any, bool]]:
    prim = eqn.primitive
    values = [v for v, _ in ins]
    batched = [b for _, b in ins]
    subfuns, bind_params = _bind_params(eqn)
    if not any(batched):
        out = prim.bind(*subfuns, *values, **bind_params)
        return [(o, False) for o in (out if prim.multiple_results else [out])]
    if prim is lax.conv_general_dilated_p and batched[0] and batched[1]:
        return [(_batched_conv(eqn, values[0], values[1], ctx), True)]
    inner = _inner_jaxpr(eqn)
    if inner is not None and _has_conv(inner[0]):
        jaxpr, consts = inner
        if prim.name in _REMAT_PRIMITIVES:
            return _eval_rematerialised(eqn, jaxpr, consts, ins, ctx)
        return _eval_jaxpr(jaxpr, consts, ins, ctx)

    def one_tenant(*args: Any) -> list:
        out = prim.bind(*subfuns, *args, **bind_params)
        return list(out) if prim.multiple_results else [out]

    in_axes = [0 if b else None for b in batched]
    outs = jax.vmap(one_tenant, in_axes=in_axes, axis_size=ctx.tenants)(*values)
    return [(o, True) for o in outs]


def _eval_rematerialised(eqn: Any, jaxpr: Any, consts: list, ins: list[tuple[Any, bool]], ctx: _Context) -> list[tuple[Any, bool]]:
    """A ``jax.checkpoint`` block with convs, evaluated inside ``jax.checkpoint`` again (with
    its policy): inlined bare, its convs would be lowered but the backward pass would keep
    the block's intermediates instead of recomputing them, undoing the memory its author saved."""
    flags = [batched for _, batched in ins]
    out_flags: list[bool] = []

    def block(*values: Any) -> list:
        outs = _eval_jaxpr(jaxpr, consts, list(zip(values, flags)), ctx)
        out_flags[:] = [batched for _, batched in outs]
        return [value for value, _ in outs]

    remat = jax.checkpoint(block, prevent_cse=eqn.params.get("prevent_cse", True), policy=eqn.params.get("policy"))
    return list(zip(remat(*(value for value, _ in ins)), out_flags))


def _batched_conv(eqn: Any, x: jax.Array, w: jax.Array, ctx: _Context) -> jax.Array:
    """One tenant-batched conv: to the canonical layout, the chosen lowering, and back."""
    p = eqn.params
    dn = p["dimension_numbers"]
    if not isinstance(dn, lax.ConvDimensionNumbers):
        dn = lax.conv_dimension_numbers(x.shape[1:], w.shape[1:], dn)
    nd = len(dn.lhs_spec) - 2
    lhs_perm = (dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1])  # -> N, *S, C
    rhs_perm = (*dn.rhs_spec[2:], dn.rhs_spec[1], dn.rhs_spec[0])  # -> *R, I, O
    x_c = _transpose_tenant(x, lhs_perm)
    w_c = _transpose_tenant(w, rhs_perm)
    pet = p.get("preferred_element_type")
    params = ConvParams(
        window_strides=tuple(p["window_strides"]),
        padding=tuple(tuple(pad) for pad in p["padding"]),
        lhs_dilation=tuple(p["lhs_dilation"]),
        rhs_dilation=tuple(p["rhs_dilation"]),
        feature_group_count=int(p["feature_group_count"]),
        batch_group_count=int(p["batch_group_count"]),
        precision=p.get("precision"),
        preferred_element_type=pet,
    )
    sig = ConvSignature(
        tenants=ctx.tenants,
        lhs_shape=tuple(x_c.shape[1:]),
        rhs_shape=tuple(w_c.shape[1:]),
        window_strides=params.window_strides,
        padding=params.padding,
        lhs_dilation=params.lhs_dilation,
        rhs_dilation=params.rhs_dilation,
        feature_group_count=params.feature_group_count,
        batch_group_count=params.batch_group_count,
        lhs_dtype=np.dtype(x.dtype).name,
        rhs_dtype=np.dtype(w.dtype).name,
        preferred_element_type=None if pet is None else np.dtype(pet).name,
        precision=repr(params.precision) if params.precision is not None else "None",
    )
    choice, source = ctx.choose(sig, params)
    ctx.choices.append(LayerChoice(len(ctx.choices), sig, choice, source))
    y_c = lower_conv(choice, x_c, w_c, params)  # [K, N, *S', O]
    out_inverse = [0] * (nd + 2)  # canonical axis held at each position of the model's layout
    out_inverse[dn.out_spec[0]] = 0
    out_inverse[dn.out_spec[1]] = nd + 1
    for i, axis in enumerate(dn.out_spec[2:]):
        out_inverse[axis] = 1 + i
    return _transpose_tenant(y_c, tuple(out_inverse))


def _transpose_tenant(value: jax.Array, perm: tuple[int, ...]) -> jax.Array:
    """Transposes the per-tenant axes of value [K, ...] by ``perm``; a no-op if identity."""
    if perm == tuple(range(len(perm))):
        return value
    return jax.numpy.transpose(value, (0, *(a + 1 for a in perm)))

"""The exceptions jaxmt raises: part of the API.

Every error names the offending tenant, leaf path or shape and says what was expected.
Operations that raise leave the store, the program cache and the scheduler as they were.
"""

from __future__ import annotations


class JaxmtError(Exception):
    """Base class of every exception jaxmt raises on purpose."""


class UnknownTenantError(JaxmtError, KeyError):
    """A tenant id that the store does not hold."""

    def __init__(self, tenant_id: object, known: int | None = None):
        self.tenant_id = tenant_id
        self.known = known
        detail = f" ({known} tenants are resident)" if known is not None else ""
        super().__init__(f"unknown tenant {tenant_id!r}{detail}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])

    def __reduce__(self) -> tuple:  # pickle and copy rebuild it from its arguments, not from its message
        return type(self), (self.tenant_id, self.known), self.__dict__


class DuplicateTenantError(JaxmtError, ValueError):
    """add_tenant with an id that is already resident (use update_tenant)."""


class ParamMismatchError(JaxmtError, ValueError):
    """A params pytree whose structure, leaf shapes or dtypes differ from the template."""


class NonFiniteParamsError(ParamMismatchError):
    """A params pytree with NaN or Inf values."""


class InputError(JaxmtError, ValueError):
    """A request whose rows, shape or dtype the model cannot take."""


class CapacityError(JaxmtError, MemoryError):
    """The store cannot grow: its capacity limit is reached or allocation failed."""


class CompileError(JaxmtError, RuntimeError):
    """Building the program for one bucket failed; other buckets are unaffected."""


class Overloaded(JaxmtError, RuntimeError):
    """A request would finish past its deadline by more than the allowed factor."""


class SchedulerClosed(JaxmtError, RuntimeError):
    """A request submitted to, or still queued in, a closed scheduler."""


class NonFiniteLossError(JaxmtError, FloatingPointError):
    """A training step whose loss, gradients, updated params or optimizer state are NaN or Inf for some tenants.

    ``tenant_ids`` names them and ``step`` is the index of the rejected step.
    """

    def __init__(self, message: str, tenant_ids: list, step: int):
        super().__init__(message)
        self.tenant_ids = list(tenant_ids)
        self.step = step

    def __reduce__(self) -> tuple:  # pickle and copy rebuild it from its arguments (args holds the message only)
        return type(self), (self.args[0], self.tenant_ids, self.step), self.__dict__


class CheckpointError(JaxmtError, ValueError):
    """A checkpoint that is missing, truncated, malformed or does not fit the model.

    Raised before anything is changed: the model, the store and an earlier checkpoint in the
    same directory are as they were.
    """


class ManifestError(JaxmtError, ValueError):
    """A batch manifest line naming an unknown tenant or an unreadable or misshapen input.

    ``line`` is the 1-based line number in the manifest file (the CSV header is line 1).
    """

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.line = line

"""jaxmt: many models of one architecture served (and trained) as one XLA program.

Tenants share an architecture but not weights. Their parameters are stacked along a tenant
axis, each step's active tenants run as one ``vmap``-ed, compiled program, and a scheduler
forms steps from per-tenant request queues.
"""

from jaxmt.buckets import BucketPolicy, Plan, Step, make_plan
from jaxmt.errors import (
    CapacityError,
    CompileError,
    DuplicateTenantError,
    InputError,
    JaxmtError,
    NonFiniteParamsError,
    Overloaded,
    ParamMismatchError,
    SchedulerClosed,
    UnknownTenantError,
)
from jaxmt.model import MultiTenantModel, PendingPrediction
from jaxmt.programs import ProgramCache, ProgramKey, enable_persistent_compilation_cache
from jaxmt.store import TenantStore

__version__ = "0.1.0"

__all__ = [
    "BucketPolicy",
    "CapacityError",
    "CompileError",
    "DuplicateTenantError",
    "InputError",
    "JaxmtError",
    "MultiTenantModel",
    "NonFiniteParamsError",
    "Overloaded",
    "ParamMismatchError",
    "PendingPrediction",
    "Plan",
    "ProgramCache",
    "ProgramKey",
    "SchedulerClosed",
    "Step",
    "TenantStore",
    "UnknownTenantError",
    "enable_persistent_compilation_cache",
    "make_plan",
]

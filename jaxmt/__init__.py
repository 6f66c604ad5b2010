"""jaxmt: many models of one architecture served (and trained) as one XLA program.

Tenants share an architecture but not weights. Their parameters are stacked along a tenant
axis, each step's active tenants run as one ``vmap``-ed, compiled program, and a scheduler
forms steps from one earliest-deadline-first queue of every tenant's requests.
"""

from jaxmt.baselines import ExclusiveServer, SpaceOnlyServer, TimeOnlyServer, exclusive_predict, time_only_predict
from jaxmt.batch import predict_manifest
from jaxmt.buckets import BucketPolicy, Plan, Step, make_plan
from jaxmt.checkpoint import restore_model, restore_store, save_store
from jaxmt.errors import (
    CapacityError,
    CheckpointError,
    CompileError,
    DuplicateTenantError,
    InputError,
    JaxmtError,
    ManifestError,
    NonFiniteLossError,
    NonFiniteParamsError,
    Overloaded,
    ParamMismatchError,
    SchedulerClosed,
    UnknownTenantError,
)
from jaxmt.gc_pauses import GcPauses, freeze_heap
from jaxmt.metrics import to_prometheus
from jaxmt.lowering import LoweringPolicy, describe_lowering, tenant_batched
from jaxmt.model import MultiTenantModel
from jaxmt.rows import RowParts
from jaxmt.steps import PendingPrediction
from jaxmt.programs import ProgramCache, ProgramKey, enable_persistent_compilation_cache
from jaxmt.scheduler import Scheduler, SchedulerConfig
from jaxmt.sharding import ShardedMultiTenantModel, tenant_mesh
from jaxmt.store import TenantStore
from jaxmt.tenant_import import add_tenant_from_checkpoint
from jaxmt.train import MultiTenantTrainer
from jaxmt.train_step import shuffled_batch_indices

__version__ = "0.1.0"

__all__ = [
    "BucketPolicy",
    "CapacityError",
    "CheckpointError",
    "CompileError",
    "DuplicateTenantError",
    "ExclusiveServer",
    "GcPauses",
    "InputError",
    "JaxmtError",
    "LoweringPolicy",
    "ManifestError",
    "MultiTenantModel",
    "MultiTenantTrainer",
    "NonFiniteLossError",
    "NonFiniteParamsError",
    "Overloaded",
    "ParamMismatchError",
    "PendingPrediction",
    "Plan",
    "ProgramCache",
    "ProgramKey",
    "RowParts",
    "Scheduler",
    "SchedulerClosed",
    "SchedulerConfig",
    "ShardedMultiTenantModel",
    "SpaceOnlyServer",
    "Step",
    "TenantStore",
    "TimeOnlyServer",
    "UnknownTenantError",
    "add_tenant_from_checkpoint",
    "describe_lowering",
    "enable_persistent_compilation_cache",
    "exclusive_predict",
    "freeze_heap",
    "make_plan",
    "predict_manifest",
    "restore_model",
    "restore_store",
    "save_store",
    "shuffled_batch_indices",
    "tenant_batched",
    "tenant_mesh",
    "time_only_predict",
    "to_prometheus",
]

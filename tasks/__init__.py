"""Task rows (`segmentation_results`) in Supabase: processing -> completed | failed, by UPDATE only."""

from tasks.errors import TaskNotUpdated, TaskStoreError, TaskStoreTimeout, TaskStoreUnavailable
from tasks.store import DisabledTaskStore, SupabaseTaskStore, TaskResult, TaskStore

__all__ = [
    "DisabledTaskStore",
    "SupabaseTaskStore",
    "TaskNotUpdated",
    "TaskResult",
    "TaskStore",
    "TaskStoreError",
    "TaskStoreTimeout",
    "TaskStoreUnavailable",
]

"""What can go wrong when recording a task's status."""


class TaskStoreError(Exception):
    """Base class; messages are safe to show."""


class TaskNotUpdated(TaskStoreError):
    """The UPDATE matched no row: the row does not exist, or row-level security hid it (wrong key)."""


class TaskStoreUnavailable(TaskStoreError):
    """Supabase refused the key, answered with an error, or could not be reached."""


class TaskStoreTimeout(TaskStoreError):
    pass

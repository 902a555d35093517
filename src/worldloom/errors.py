"""User-facing errors.

Anything a user can fix (a bad key, a missing file, a corrupt checkpoint) is raised as a
``WorldloomError`` with one actionable line. The CLI prints that line and exits non-zero;
any other exception is a bug in worldloom and keeps its traceback.
"""


class WorldloomError(Exception):
    """An error the user can act on; its message is one line."""


class ConfigError(WorldloomError):
    """A configuration key, value or preset is wrong."""


class DataError(WorldloomError):
    """A data file is missing, empty, or too short."""


class CheckpointError(WorldloomError):
    """A run folder or checkpoint is missing, corrupt, or of another architecture."""


class EnvError(WorldloomError):
    """An environment id is unknown, or an environment package is missing."""

"""The project's error types: each message names the problem and the fix.

Stages turn these into a one-paragraph message and exit status 2 (see `pipeline.runtime.cli`);
anything else is a bug and keeps its traceback.
"""


class PipelineError(Exception):
    """A problem with the user's inputs or environment that the user can fix."""


class ConfigError(PipelineError, ValueError):
    """A params.yaml key has a wrong type or an impossible value."""

    def __init__(self, key: str, problem: str):
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}")


class DataError(PipelineError):
    """The raw data is missing, too small or unreadable."""


class WeightsError(PipelineError):
    """A weight source cannot be found, read or matched to VGG16."""

"""Errors in a pipeline's definition, raised when it is built, before anything runs."""


class PipelineError(ValueError):
    """The pipeline as written cannot run; the message names the agent or placeholder and the fix."""

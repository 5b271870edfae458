"""The exceptions stream-ser raises; third-party errors are converted at the boundary."""


class StreamSerError(Exception):
    """Base class of every error stream-ser reports to the user."""


class ConfigError(StreamSerError):
    """A setting, flag or configuration file is invalid."""


class AudioInputError(StreamSerError):
    """An audio source cannot be opened, decoded or read."""


class ModelError(StreamSerError):
    """A model directory, model card or inference session is unusable."""


class PublishError(StreamSerError):
    """Results cannot be delivered (for example, the broker is unreachable)."""

"""Exceptions that name the layer, config key or file at fault."""


class JFactorError(ValueError):
    """Base class of every error jfactor raises on bad input."""


class StackError(JFactorError):
    """A stack or one of its layers is malformed; the message names the layer path."""


class FoldError(JFactorError):
    """A well-formed stack that is not one shift-invariant convolution."""


class ConfigError(JFactorError):
    """A config file or value is invalid; the message names the file and key path."""

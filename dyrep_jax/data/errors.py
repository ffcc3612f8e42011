"""The one exception type the input pipeline raises for bad data or configuration."""


class DataError(ValueError):
    """A dataset cannot be used as asked; the message says what is wrong and how to fix it."""

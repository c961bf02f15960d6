"""User-facing errors: the CLI prints these as one clear message, never as a traceback."""


class TunelabError(Exception):
    """A problem the user can fix (bad config, bad data row, resource exhausted).

    The message must say what is wrong and where (config field, file:line:field, training
    step) and, when there is one, the fix.
    """

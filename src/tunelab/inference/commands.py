"""`tunelab generate | chat | serve | bench-infer`."""


def register(sub) -> None:
    """Add the inference subcommands to the `tunelab` parser."""

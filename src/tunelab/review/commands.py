"""`tunelab review init | add-reviewer | add-task | serve | report | export`."""


def register(sub) -> None:
    """Add the review subcommands to the `tunelab` parser."""

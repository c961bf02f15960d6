"""`tunelab board`: a local, read-only dashboard of run folders (app.py: the pages; runs.py: what they read)."""

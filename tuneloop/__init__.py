"""Process entry points: the ``tuneloop`` command line and the demo."""

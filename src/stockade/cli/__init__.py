"""The ``stockade`` command line, built on ``stockade.sdk``."""

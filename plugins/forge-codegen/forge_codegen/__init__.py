"""FORGE developer experience: ``forge-node new``, ``dev``, ``generate ts`` and ``generate migration``."""

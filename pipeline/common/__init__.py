"""What both stages share: the GLUE task table, the settings, the typed errors, progress and resources.

Nothing here imports ``transformers``: stage two depends on this package, so it must stay light.
"""

"""The operator's command line (``python -m cdc``, ``cdc``): one module per command or group; ``main`` dispatches."""

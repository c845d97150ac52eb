"""Shared plumbing for the CDC pipeline: settings, database pool, Kafka config, stats, local services.

The pipeline's stages live at the top level of the project: ``producer.py`` (capture and publish),
``consumer_final.py`` (apply and dead-letter) and ``employee.py`` (the event model).
"""

__version__ = "0.1.0"

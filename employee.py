"""employee.py: the seed's typed contract for the ``employees`` table and its change events."""

from cdc.model.event import *  # noqa: F403  (replaced by the table model's contract below)
from cdc.model.event import _from_json_fast  # noqa: F401

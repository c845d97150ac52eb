"""The pipeline's own exceptions, in one place.

Three kinds matter to the daemons: ``TransientError`` (wait and retry), ``BadMessageError``
(retry a few times, then dead-letter) and everything else (a bug or a setup problem: stop loudly).
"""


class CDCError(Exception):
    """Base class of every error raised on purpose by this project."""


class ConfigError(CDCError):
    """A setting is missing or malformed. Reported as one line, without a traceback."""


class ServiceError(CDCError):
    """A local service (Kafka broker, PostgreSQL server) could not be started, stopped or reached."""


class SchemaMissingError(CDCError):
    """The database has no CDC schema: ``make up`` or the setup SQL has not been applied."""


class TransientError(CDCError):
    """Worth retrying unchanged after a pause: lost connection, restart, deadlock, Kafka retriable.

    ``kind`` says which, for the metrics: connection (unreachable, dropped, pool), conflict
    (deadlock, serialization, lock timeout, a concurrent decision), failover (read-only),
    server (out of resources, shutting down, an internal error), other.
    """

    def __init__(self, message: str, kind: str = "other") -> None:
        super().__init__(message)
        self.kind = kind


class BadMessageError(CDCError):
    """One message cannot be applied: undecodable, invalid, or rejected by a constraint."""


class UnencodableValueError(BadMessageError):
    """psycopg2 could not put a value into a statement (e.g. a lone surrogate, a NUL)."""


class DeliveryError(CDCError):
    """Kafka reported a failed delivery; whatever depended on it must not be committed."""


class LeadershipLost(CDCError):
    """The producer no longer holds its advisory lock; another instance may be active."""


class HaltError(CDCError):
    """The consumer must stop: going on would skip a message or dead-letter the whole stream."""


class ActionIdReusedError(HaltError):
    """An action_id the destination decided before came again as a different change: the source's
    action_id sequence went back, and taking the new change for a duplicate would lose it."""

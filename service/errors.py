"""Typed errors of the storage node, each naming the gRPC status it maps to.

The tree::

    RdaxError                      code 'INTERNAL' when raised as is
    ├── InvalidArgument            'INVALID_ARGUMENT'
    ├── NotFound                   'NOT_FOUND'
    ├── FailedPrecondition         'FAILED_PRECONDITION'
    │   └── UnstableBlockMap       a hole or a bad extent flag in a range to seal
    ├── PermissionDenied           'PERMISSION_DENIED'
    ├── OutOfRange                 'OUT_OF_RANGE'
    ├── ResourceExhausted          'RESOURCE_EXHAUSTED'
    ├── AlreadyExists              'ALREADY_EXISTS'
    └── Unavailable                'UNAVAILABLE'

`code` is a plain string so that this module needs no grpc import: the gRPC
layer turns it into a grpc.StatusCode. Messages are written for a person:
they say what is wrong and what to do about it.
"""


class RdaxError(Exception):
    """Base of every error the service reports to a client."""

    code: str = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(RdaxError):
    code = "INVALID_ARGUMENT"


class NotFound(RdaxError):
    code = "NOT_FOUND"


class FailedPrecondition(RdaxError):
    code = "FAILED_PRECONDITION"


class UnstableBlockMap(FailedPrecondition):
    """The block map of [offset, offset + length) cannot be sealed.

    `flags` holds the offending FIEMAP_EXTENT_* bits, or 0 for a hole.
    """

    def __init__(self, message: str, *, offset: int, length: int, flags: int) -> None:
        super().__init__(message)
        self.offset = offset
        self.length = length
        self.flags = flags


class PermissionDenied(RdaxError):
    code = "PERMISSION_DENIED"


class OutOfRange(RdaxError):
    code = "OUT_OF_RANGE"


class ResourceExhausted(RdaxError):
    code = "RESOURCE_EXHAUSTED"


class AlreadyExists(RdaxError):
    code = "ALREADY_EXISTS"


class Unavailable(RdaxError):
    code = "UNAVAILABLE"

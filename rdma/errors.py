"""Typed errors of the verbs wrapper, each naming the verb and its arguments.

    VerbsError                      any failed verb: .verb, .args, .errno
    ├── DeviceNotFound              no RDMA device matches a name / netdev / IP
    ├── RegistrationError           ibv_reg_mr refused (pinned and ODP)
    ├── ConnectError                QP state transitions failed
    ├── WorkCompletionError         a work request completed with an error status
    └── Abandoned                   the caller gave up on the connection (Connection.abandon): its peer is gone
"""
from __future__ import annotations

import errno as _errno


def _fmt_args(args: dict[str, object]) -> str:
    parts = []
    for key, value in args.items():
        if isinstance(value, int) and key in ("addr", "remote_addr") :
            parts.append(f"{key}={value:#x}")
        else:
            parts.append(f"{key}={value}")
    return ", ".join(parts)


class VerbsError(Exception):
    """A verb failed; the message reads like the call that failed."""

    def __init__(self, verb: str, args: dict[str, object] | None = None,
                 errno: int | None = None, detail: str = "") -> None:
        self.verb = verb
        self.args_ = dict(args or {})
        self.errno = errno
        text = f"{verb}({_fmt_args(self.args_)})"
        if errno is not None:
            text += f": errno {errno} ({_errno.errorcode.get(errno, '?')})"
        if detail:
            text += f": {detail}"
        super().__init__(text)


class DeviceNotFound(VerbsError):
    pass


class RegistrationError(VerbsError):
    pass


class ConnectError(VerbsError):
    pass


class WorkCompletionError(VerbsError):
    """A completion with status != success; .status is the ibv_wc_status."""

    def __init__(self, verb: str, args: dict[str, object], status: int, status_name: str) -> None:
        self.status = status
        self.status_name = status_name
        super().__init__(verb, args, detail=f"completed with {status_name} ({status})")


class Abandoned(VerbsError):
    """Waiting for completions stopped because the connection was abandoned; .reason says why."""

    def __init__(self, verb: str, args: dict[str, object], reason: str) -> None:
        self.reason = reason
        super().__init__(verb, args, detail=f"abandoned: {reason}")

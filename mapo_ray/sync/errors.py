"""The one error type of weight sync."""

from __future__ import annotations


class WeightSyncError(RuntimeError):
    """A weight update could not be planned, sent, received or loaded; the message says who and where.

    ``lost``: the rollout actors whose process died during it (Ray may restart them), so
    that a caller can tell a lost member, which a new group can bring back, from a bug.
    """

    def __init__(self, message: str, lost: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.lost = lost


class NotInGroupError(WeightSyncError):
    """An update reached a process that is not a member of the group it was sent over:
    one restarted since the group formed, whose ``join`` the old process made."""


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message (gloo and Ray append long tails), else its type name."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__

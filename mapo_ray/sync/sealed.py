"""A ``torch.distributed`` store whose values only the holders of one secret can write or read.

torch's ``TCPStore`` has no access control: any client that reaches its port can list
every key (``list_keys``), read any value, and write or delete any key. ``SealedStore``
wraps one and seals each value with AES-GCM under the group's secret, bound to its key,
so a value written without the secret (or copied from another key) does not open. Such
a value is refused with a warning, and a read keeps waiting, up to the time-out, for
one a member wrote: the member that owns a key writes it, replacing a stranger's.

Not sealed: key names, ``add`` counters (gloo's connect uses ``set`` / ``get`` / ``wait``
only), and the store's availability: a stranger can still delete a key or overwrite it
after its member wrote it, and the read that waits on it then fails at its time-out.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta

import torch.distributed as dist
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mapo_ray.sync.errors import WeightSyncError

log = logging.getLogger(__name__)

_NONCE_BYTES = 12
# How often a read looks again for a member's value after refusing a stranger's.
POLL_S = 0.05


class SealedStore(dist.Store):
    """``raw`` with every value sealed under ``secret`` (16, 24 or 32 bytes); ``where`` names it in logs and errors.

    A Python ``dist.Store``, so gloo and NCCL connect through it like through the raw store.
    """

    def __init__(self, raw: dist.Store, secret: bytes, where: str, timeout: timedelta) -> None:
        super().__init__()
        self._raw = raw
        self._aead = AESGCM(secret)
        self.where = where
        self._timeout = timeout
        self._refused: set[str] = set()  # keys whose refusal was logged: one warning each

    def set(self, key: str, value: bytes | str) -> None:
        data = value.encode() if isinstance(value, str) else bytes(value)
        nonce = os.urandom(_NONCE_BYTES)
        self._raw.set(key, nonce + self._aead.encrypt(nonce, data, key.encode()))

    def peek(self, key: str) -> bytes | None:
        """``key``'s value if a holder of the secret wrote it; None if it is absent or refused."""
        if not self._raw.check([key]):
            return None
        blob = self._raw.get(key)
        try:
            return self._aead.decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], key.encode())
        except (InvalidTag, ValueError):  # ValueError: too short to hold a nonce
            if key not in self._refused:
                self._refused.add(key)
                log.warning(
                    "%s: refused the value of %r (%d bytes, starting %r): it is not sealed with this "
                    "group's secret, so a stranger or another group's member wrote it; waiting for a member's",
                    self.where,
                    key,
                    len(blob),
                    blob[:16],
                )
            return None

    def get(self, key: str) -> bytes:
        """``key``'s value as a member wrote it, waiting at most the time-out for one."""
        deadline = time.monotonic() + self._timeout.total_seconds()
        self._raw.wait([key], self._timeout)
        while (value := self.peek(key)) is None:
            if time.monotonic() >= deadline:
                raise WeightSyncError(
                    f"{self.where}: no value of {key!r} sealed with this group's secret "
                    f"within {self._timeout.total_seconds():g}s"
                )
            time.sleep(POLL_S)
        return value

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        self._raw.wait(keys, self._timeout if timeout is None else timeout)

    def check(self, keys: list[str]) -> bool:
        return self._raw.check(keys)

    def add(self, key: str, value: int) -> int:
        return self._raw.add(key, value)

    def delete_key(self, key: str) -> bool:
        return self._raw.delete_key(key)

    def num_keys(self) -> int:
        return self._raw.num_keys()

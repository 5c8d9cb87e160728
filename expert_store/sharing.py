"""Is the store directory the same directory on every host? Check before training starts.

Several hosts share one store: one database (PostgreSQL) and one objects directory that all
of them mount. A database alone is not enough: a host whose store path is a local copy
(or an unmounted mount point holding an old copy) would commit rows naming objects no
other host can read. The check is a marker object::

    token = write_share_marker(store)        # rank 0: a fresh random object; broadcast token
    check_share_marker(store, token)         # every other rank: it must be readable here

The marker is an ordinary object (a random 32-byte tensor, content-addressed like every
object, written with the same atomic write), so the check exercises the very path that
commits use. No row references it: ``gc`` removes it once its grace period has passed.
"""

from __future__ import annotations

import secrets
import socket
import time
from typing import TYPE_CHECKING

import torch

from .errors import CorruptObjectError, StoreNotSharedError

if TYPE_CHECKING:
    from .store import ExpertStore

__all__ = ["write_share_marker", "check_share_marker", "MARKER_TENSOR", "CHECK_TIMEOUT_S"]

MARKER_TENSOR = "share_marker"
CHECK_TIMEOUT_S = 10.0  # network filesystems may show a new file a few seconds late


def write_share_marker(store: ExpertStore) -> str:
    """Write a fresh random marker object into ``store``; its hash is the token to send
    to the other hosts."""
    store._require_writable()
    token = torch.frombuffer(bytearray(secrets.token_bytes(32)), dtype=torch.uint8)  # (32,)
    return store.objects.put({MARKER_TENSOR: token}).hash


def check_share_marker(store: ExpertStore, token: str, *, timeout_s: float = CHECK_TIMEOUT_S,
                       poll_s: float = 0.1) -> None:
    """Raise :class:`StoreNotSharedError` (one line) unless the marker object ``token``,
    written by another host's :func:`write_share_marker`, is readable here, intact, within
    ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not store.objects.exists(token) and time.monotonic() < deadline:
        time.sleep(poll_s)
    where = f"{store.objects.root} on {socket.gethostname()}"
    if not store.objects.exists(token):
        raise StoreNotSharedError(
            f"the store directory is not shared between hosts: the marker object {token[:12]} written by rank 0 "
            f"is not readable at {where} after {timeout_s:g} s; mount the same directory at the store path on every host"
        )
    try:
        store.objects.check(token)
    except CorruptObjectError as exc:
        raise StoreNotSharedError(
            f"the store directory is not shared correctly between hosts: the marker object {token[:12]} "
            f"at {where} does not read back intact ({exc})"
        ) from exc

"""The node's ed25519 identity, kept in its data dir so the peer id survives restarts."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from libp2p.crypto.ed25519 import Ed25519PrivateKey, create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID

IDENTITY_FILE = "identity.ed25519"
LOCK_FILE = "node.lock"


class IdentityError(Exception):
    """The identity file exists but cannot be used."""


def load_or_create_identity(data_dir: Path) -> KeyPair:
    """Read `<data_dir>/identity.ed25519`, or create it (mode 0600) on first start."""
    path = data_dir / IDENTITY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        return create_identity_file(path)
    return load_identity_file(path)


def load_identity_file(path: Path) -> KeyPair:
    """The identity in `path`: a 32-byte ed25519 seed (a client's `--identity`)."""
    try:
        seed = path.read_bytes()
    except OSError as error:
        raise IdentityError(f"cannot read identity file {path}: {error.strerror}") from None
    if len(seed) != 32:
        raise IdentityError(f"{path}: expected a 32-byte ed25519 seed, found {len(seed)} bytes")
    private = Ed25519PrivateKey.from_bytes(seed)
    return KeyPair(private, private.get_public_key())


def write_new_secret(path: Path, data: bytes) -> None:
    """Write `data` to a new file, mode 0600 from the start. FileExistsError if there is
    one (O_EXCL: two processes must not both write it); other OSErrors as they come."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def create_identity_file(path: Path) -> KeyPair:
    """A new identity written to `path` (mode 0600); an existing file is an error."""
    key_pair = create_new_key_pair()
    try:
        write_new_secret(path, key_pair.private_key.to_bytes())
    except FileExistsError:
        raise IdentityError(f"{path} exists; refusing to overwrite an identity") from None
    except OSError as error:
        raise IdentityError(f"cannot create identity file {path}: {error.strerror}") from None
    return key_pair


def peer_id_of(key_pair: KeyPair) -> str:
    return str(ID.from_pubkey(key_pair.public_key))


def lock_data_dir(data_dir: Path) -> int:
    """Hold an exclusive lock on the data dir for this process's life; returns its fd.

    Two nodes sharing a data dir would share a peer id; the second is refused.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise IdentityError(
            f"data dir {data_dir} is in use by another node; give each node its own --data-dir"
        ) from None
    return fd

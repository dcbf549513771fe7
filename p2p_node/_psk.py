"""Private network keys: the go-libp2p `swarm.key` file format, parsed and written.

A node given a pre-shared key (PSK) encrypts every connection with it before
any libp2p handshake (py-libp2p's `libp2p.security.pnet`), so a node or client
without the same key cannot connect at all. The file is the one go-libp2p and
IPFS use::

    /key/swarm/psk/1.0.0/
    /base16/
    <64 hex digits>

`/base64/` and `/bin/` encodings are read too. Parsing is pure; only
`read_psk_file` and `write_new_psk_file` touch the file system.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from ._identity import write_new_secret

logger = logging.getLogger(__name__)

PSK_HEADER = b"/key/swarm/psk/1.0.0/"
PSK_BYTES = 32
MAX_PSK_FILE_BYTES = 4096


class PskError(ValueError):
    """A private network key file is missing, unreadable or not a swarm.key."""


@dataclass(frozen=True, slots=True)
class PreSharedKey:
    """A 32-byte private network key. Its repr shows a fingerprint, never the key."""

    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if type(self.key) is not bytes or len(self.key) != PSK_BYTES:
            raise PskError(f"a private network key is {PSK_BYTES} bytes")

    @classmethod
    def generate(cls) -> PreSharedKey:
        return cls(secrets.token_bytes(PSK_BYTES))

    @property
    def fingerprint(self) -> str:
        """A short name for the network, safe to log: the key's hash, not the key."""
        return hashlib.sha256(self.key).hexdigest()[:16]

    @property
    def hex(self) -> str:
        """The form py-libp2p takes."""
        return self.key.hex()

    def __repr__(self) -> str:
        return f"PreSharedKey(fingerprint={self.fingerprint!r})"


def format_psk(psk: PreSharedKey) -> bytes:
    """The swarm.key text of `psk`, base16-encoded."""
    return PSK_HEADER + b"\n/base16/\n" + psk.key.hex().encode() + b"\n"


def parse_psk(data: bytes, source: str = "key file") -> PreSharedKey:
    """The key in swarm.key text. Raises PskError naming `source` and what is wrong."""
    header, _, rest = data.partition(b"\n")
    if header.strip() != PSK_HEADER:
        raise PskError(f"{source}: not a swarm.key file (first line must be {PSK_HEADER.decode()})")
    encoding, _, body = rest.partition(b"\n")
    encoding = encoding.strip()
    if encoding not in (b"/base16/", b"/base64/", b"/bin/"):
        expected = "expected /base16/, /base64/ or /bin/"
        raise PskError(f"{source}: unknown key encoding {encoding[:32]!r}; {expected}")
    try:
        if encoding == b"/base16/":
            key = bytes.fromhex(body.strip().decode("ascii"))
        elif encoding == b"/base64/":
            key = base64.b64decode(body.strip(), validate=True)
        else:
            key = body
    except (ValueError, binascii.Error):  # UnicodeDecodeError is a ValueError
        raise PskError(f"{source}: the key is not valid {encoding.decode()}") from None
    if len(key) != PSK_BYTES:
        raise PskError(f"{source}: the key is {len(key)} bytes; a swarm key is {PSK_BYTES}")
    return PreSharedKey(key)


def read_psk_file(path: Path) -> PreSharedKey:
    """The key in `path`; warns when others than its owner may read it."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_PSK_FILE_BYTES + 1)
            mode = os.fstat(f.fileno()).st_mode
    except OSError as error:
        raise PskError(f"cannot read key file {path}: {error.strerror}") from None
    if len(data) > MAX_PSK_FILE_BYTES:
        raise PskError(f"{path}: not a swarm.key file (over {MAX_PSK_FILE_BYTES} bytes)")
    psk = parse_psk(data, str(path))
    if mode & 0o077:
        others = mode & 0o777
        logger.warning("key file %s can be read by others (mode %o): chmod 600 it", path, others)
    return psk


def write_new_psk_file(path: Path) -> PreSharedKey:
    """Write a fresh key to `path` (mode 0600). Never overwrites: an existing file is an error."""
    psk = PreSharedKey.generate()
    try:
        write_new_secret(path, format_psk(psk))
    except FileExistsError:
        raise PskError(f"{path} exists; refusing to overwrite a key (remove it first)") from None
    except OSError as error:
        raise PskError(f"cannot create key file {path}: {error.strerror}") from None
    return psk

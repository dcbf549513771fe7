"""Network namespaces for the swarm harness (`open_swarm(..., namespaces=True)`).

Each worker process runs in a namespace of its own, with one veth pair: one end
inside (its address 10.77.x.y/16), the other on a bridge in the root namespace
that the harness creates and that carries no address, so traffic stays between
the swarm's namespaces. A partition moves each group's veth ends to a bridge of
the group's own: packets between groups go nowhere, as on a cut link (no reset,
no refusal; TCP and beats find out). `heal` moves them back.

Every name starts with a token `s<pid><n>` (the harness's pid in hex, a
counter): swarms in parallel do not collide, and `sweep_stale` removes what a
harness that died without cleaning up (SIGKILL) left behind.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from collections.abc import Sequence

import trio

SUBNET = "10.77"
_counter = itertools.count()


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "network namespaces need iproute2's `ip`"
    name = f"s{os.getpid():06x}probe"
    try:
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", name], check=True, capture_output=True, timeout=10)
    except (subprocess.SubprocessError, OSError) as error:
        return f"cannot create a network namespace: {error}"
    return None


def _ip(*args: str) -> list[str]:
    return ["ip", *args]


def _run(command: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {result.stderr.strip()}")
    return result


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _token_pid(name: str) -> int | None:
    if len(name) < 9 or name[0] != "s":
        return None
    try:
        return int(name[1:7], 16)
    except ValueError:
        return None


def leftovers(token: str = "") -> tuple[list[str], list[str]]:
    """Namespaces and links of swarms (of `token` if given) that exist now."""
    spaces = [
        line.split()[0]
        for line in _run(_ip("netns", "list"), check=False).stdout.splitlines()
        if line.strip()
    ]
    links = []
    for line in _run(_ip("-o", "link", "show"), check=False).stdout.splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            links.append(parts[1].strip().split("@")[0])
    mine = [s for s in spaces if s.startswith(token or "s") and _token_pid(s) is not None]
    ours = [n for n in links if n.startswith(token or "s") and _token_pid(n) is not None]
    return mine, ours


def sweep_stale() -> None:
    """Remove namespaces and links left by swarm harnesses that no longer run."""
    spaces, links = leftovers()
    for name in spaces:
        pid = _token_pid(name)
        if pid is not None and not _pid_alive(pid):
            _run(_ip("netns", "del", name), check=False)
    for name in links:
        pid = _token_pid(name)
        if pid is not None and not _pid_alive(pid):
            _run(_ip("link", "del", name), check=False)


class Namespaces:
    """The namespaces, veth pairs and bridges of one swarm; `close()` removes them."""

    def __init__(self, workers: int) -> None:
        if workers > 250:
            raise ValueError("at most 250 namespaced workers")
        self.token = f"s{os.getpid() & 0xFFFFFF:06x}{next(_counter) & 0xFF:02x}"
        self.workers = workers
        self.bridge = f"{self.token}b"
        self.names = [f"{self.token}-w{w}" for w in range(workers)]
        self.outer = [f"{self.token}h{w}" for w in range(workers)]
        self.inner = [f"{self.token}n{w}" for w in range(workers)]
        self.ips = [f"{SUBNET}.{(w + 1) >> 8}.{(w + 1) & 0xFF}" for w in range(workers)]
        self._group_bridges: list[str] = []

    def prefix(self, w: int) -> list[str]:
        """The command prefix that runs a program in worker w's namespace."""
        return _ip("netns", "exec", self.names[w])

    def create(self) -> None:
        sweep_stale()
        _run(_ip("link", "add", self.bridge, "type", "bridge"))
        _run(_ip("link", "set", self.bridge, "up"))
        for w in range(self.workers):
            ns, outer, inner = self.names[w], self.outer[w], self.inner[w]
            _run(_ip("netns", "add", ns))
            _run(_ip("link", "add", outer, "type", "veth", "peer", "name", inner))
            _run(_ip("link", "set", inner, "netns", ns))
            _run(_ip("-n", ns, "addr", "add", f"{self.ips[w]}/16", "dev", inner))
            _run(_ip("-n", ns, "link", "set", inner, "up"))
            _run(_ip("-n", ns, "link", "set", "lo", "up"))
            _run(_ip("link", "set", outer, "master", self.bridge))
            _run(_ip("link", "set", outer, "up"))

    async def partition(self, groups: Sequence[int | None]) -> None:
        """Worker w joins group groups[w]'s own bridge (None: stays on the main one)."""
        await trio.to_thread.run_sync(self._partition, groups)

    def _partition(self, groups: Sequence[int | None]) -> None:
        for g in sorted({g for g in groups if g is not None}):
            name = f"{self.token}g{g}"
            if name not in self._group_bridges:
                _run(_ip("link", "add", name, "type", "bridge"))
                _run(_ip("link", "set", name, "up"))
                self._group_bridges.append(name)
        for w, group in enumerate(groups):
            target = self.bridge if group is None else f"{self.token}g{group}"
            _run(_ip("link", "set", self.outer[w], "master", target))

    async def heal(self) -> None:
        await trio.to_thread.run_sync(self._heal)

    def _heal(self) -> None:
        for outer in self.outer:
            _run(_ip("link", "set", outer, "master", self.bridge))

    def close(self) -> None:
        """Remove every namespace (its veth pair goes with it) and bridge; idempotent."""
        for ns in self.names:
            _run(_ip("netns", "del", ns), check=False)
        for link in [*self.outer, *self._group_bridges, self.bridge]:
            _run(_ip("link", "del", link), check=False)

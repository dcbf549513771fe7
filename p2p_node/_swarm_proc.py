"""The swarm harness across worker processes (`open_swarm(n, processes=k)`).

Each worker is `python -m p2p_node._swarm_proc FD`: its own trio loop holding a
share of the swarm's nodes (node i in worker i mod k; with namespaces a block,
worker w holding nodes w*n/k .. (w+1)*n/k - 1, so that a partition by index
ranges matches whole workers: `testing.worker_of_node`). The test's trio loop drives
them over one socketpair per worker, outside the nodes' own libp2p traffic.

Frames on that channel are a 4-byte length and a pickle: (call id, function,
arguments) one way, (call id, ok, result or traceback) the other. Pickle, not
msgpack, because what travels is a function to run in the worker, against the
worker's state or one of its nodes (`ProcessSwarm.run`); both ends are this
harness, so nothing untrusted is unpickled. Call id 0 from a worker is its
crash report: the traceback of whatever ended its loop (a node that raised).

A worker that crashes, or exits, fails the swarm: its reader cancels the
test's body and `open_swarm` raises `SwarmWorkerError` with the traceback (or
the tail of the worker's stderr), never a hang.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.util
import inspect
import itertools
import logging
import os
import pickle
import socket
import struct
import subprocess
import sys
import traceback
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio

from gossip import PeerState, ViewSnapshot

from ._config import NodeConfig

logger = logging.getLogger(__name__)

_LENGTH = struct.Struct(">I")
MAX_FRAME = 64 << 20
STOP_GRACE_S = 10.0  # a worker told to stop is killed after this


class SwarmWorkerError(RuntimeError):
    """A worker process of the swarm crashed or exited; the message holds its traceback."""


class RemoteError(RuntimeError):
    """A function run in a worker raised; the message holds its traceback there."""


# --- frames --------------------------------------------------------------------------------


class _Channel:
    """Length-prefixed pickles over a stream socket; sends are serialised."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._buffer = bytearray()
        self._send_lock = trio.Lock()

    async def send(self, obj: object) -> None:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        async with self._send_lock:
            await self.stream.send_all(_LENGTH.pack(len(data)) + data)

    async def receive(self) -> Any:
        """The next object, or EOFError when the other side closed."""
        while True:
            if len(self._buffer) >= _LENGTH.size:
                (size,) = _LENGTH.unpack_from(self._buffer)
                if size > MAX_FRAME:
                    raise ValueError(f"control frame of {size} bytes")
                if len(self._buffer) >= _LENGTH.size + size:
                    data = bytes(self._buffer[_LENGTH.size : _LENGTH.size + size])
                    del self._buffer[: _LENGTH.size + size]
                    return pickle.loads(data)
            chunk = await self.stream.receive_some(1 << 16)
            if not chunk:
                raise EOFError
            self._buffer += chunk


# --- the worker ----------------------------------------------------------------------------


@dataclass
class WorkerState:
    """What one worker holds: its nodes by swarm index, and its nursery."""

    nursery: trio.Nursery
    nodes: dict[int, Any] = field(default_factory=dict)  # index -> Node
    scopes: dict[int, trio.CancelScope] = field(default_factory=dict)
    blocklists: dict[int, Any] = field(default_factory=dict)  # index -> Blocklist


async def _serve(state: WorkerState, channel: _Channel, call_id: int, fn: Any, args: Any) -> None:
    try:
        result = fn(state, *args)
        if inspect.isawaitable(result):
            result = await result
        reply: tuple[int, bool, Any] = (call_id, True, result)
        await channel.send(reply)
    except Exception:
        await channel.send((call_id, False, traceback.format_exc()))


async def _worker_main(fd: int) -> None:
    sock = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
    channel = _Channel(trio.SocketStream(sock))
    try:
        async with trio.open_nursery() as nursery:
            state = WorkerState(nursery)
            while True:
                try:
                    call_id, fn, args = await channel.receive()
                except EOFError:
                    break
                if fn is None:  # stop
                    break
                nursery.start_soon(_serve, state, channel, call_id, fn, args)
            nursery.cancel_scope.cancel()
    except BaseException:
        report = traceback.format_exc()
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            with contextlib.suppress(Exception):
                await channel.send((0, False, report))
        raise


def worker(argv: Sequence[str]) -> None:
    """Entry point of a worker process: argv[0] is the control socket's fd."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("p2p_node").setLevel(os.environ.get("P2P_NODE_SWARM_LOG_LEVEL", "WARNING"))
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    # Many nodes in one process make much long-lived garbage-free state: a full
    # collection walks all of it and stalls every node's loop (beats go late).
    gc.set_threshold(50_000, 50, 100)
    _load_parents_main()
    try:
        trio.run(_worker_main, int(argv[0]))
    except BaseException:
        traceback.print_exc()
        sys.exit(1)


def _parents_main() -> str:
    """How a worker finds the functions the parent defined in its __main__."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name and not spec.name.endswith("__main__"):
        return f"module:{spec.name}"
    path = getattr(main, "__file__", None)
    return f"path:{os.path.abspath(path)}" if path else ""


def _load_parents_main() -> None:
    """Load the parent's main module as this process's __main__, not run as a
    program (its `if __name__ == "__main__"` block stays out), as multiprocessing
    does: a function the parent defined there then unpickles here."""
    kind, _, where = os.environ.get("P2P_NODE_SWARM_MAIN", "").partition(":")
    try:
        if kind == "module":
            module = importlib.import_module(where)
        elif kind == "path" and where.endswith(".py"):
            spec = importlib.util.spec_from_file_location("__mp_main__", where)
            if spec is None or spec.loader is None:
                return
            module = importlib.util.module_from_spec(spec)
            sys.modules["__mp_main__"] = module
            spec.loader.exec_module(module)
        else:
            return
    except Exception:
        logger.warning("could not load the parent's main module %s", where, exc_info=True)
        return
    sys.modules["__main__"] = module


# --- functions run in a worker -------------------------------------------------------------


async def start_node(state: WorkerState, index: int, config: NodeConfig) -> tuple[str, list[str]]:
    from .testing import Blocklist, _run_node

    blocklist = Blocklist()
    scope = trio.CancelScope()
    node = await state.nursery.start(_run_node, config, scope, blocklist)
    state.nodes[index], state.scopes[index], state.blocklists[index] = node, scope, blocklist
    return node.peer_id, node.addrs


def settle_gc(state: WorkerState) -> None:
    """All nodes started: move what they hold out of the collector's way."""
    gc.collect()
    gc.freeze()


def on_node(state: WorkerState, index: int, fn: Callable[..., Any], *args: Any) -> Any:
    return fn(state.nodes[index], *args)


async def kill_node(state: WorkerState, index: int) -> None:
    from .testing import kill_node as kill

    await kill(state.nodes[index], state.scopes[index])


async def block_node(state: WorkerState, index: int, peer_ids: Collection[str]) -> None:
    from .testing import block_node as block

    await block(state.nodes[index], state.blocklists[index], peer_ids)


def partition_cuts(
    groups: Iterable[Iterable[int]], live: Iterable[int], peer_ids: Sequence[str]
) -> list[tuple[int, list[str]]]:
    """Per live node, the peers of the other groups (the nodes in no group count as
    one group more)."""
    member = {i: g for g, group in enumerate(groups) for i in group}
    live = list(live)
    return [(i, [peer_ids[j] for j in live if member.get(j) != member.get(i)]) for i in live]


async def block_nodes(state: WorkerState, cuts: Sequence[tuple[int, Collection[str]]]) -> None:
    from .testing import block_nodes as block

    await block([(state.nodes[i], state.blocklists[i], peer_ids) for i, peer_ids in cuts])


def unblock_nodes(state: WorkerState, indices: Sequence[int]) -> None:
    from .testing import unblock_node as unblock

    for i in indices:
        unblock(state.nodes[i], state.blocklists[i])


def kick_nodes(state: WorkerState, indices: Sequence[int]) -> None:
    for i in indices:
        state.nodes[i].membership.kick()


def cpu_seconds(state: WorkerState) -> float:
    return time_process()


def time_process() -> float:
    import time

    return time.process_time()


def crash(state: WorkerState, message: str) -> None:
    """For tests: end this worker's loop with an error, as a node that raised would."""

    async def boom() -> None:
        raise RuntimeError(message)

    state.nursery.start_soon(boom)


def complete_view(want: frozenset[str], view: ViewSnapshot) -> bool:
    alive = {p for p, known in view.peers.items() if known.state is PeerState.ALIVE}
    return alive == want


async def wait_complete(node: Any, want: frozenset[str]) -> None:
    await node.view.wait_until(partial(complete_view, want))


# --- the parent ----------------------------------------------------------------------------


class _Worker:
    def __init__(self, index: int, process: trio.Process, channel: _Channel, log: Path) -> None:
        self.index = index
        self.process = process
        self.channel = channel
        self.log = log
        self.pending: dict[int, tuple[trio.Event, list[Any]]] = {}
        self.ids = itertools.count(1)
        self.failure: str | None = None
        self.stopping = False
        self.posted: trio.MemorySendChannel[tuple[int, Any, tuple[Any, ...]]]

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.failure is not None:
            raise SwarmWorkerError(self.failure)
        call_id = next(self.ids)
        done = trio.Event()
        box: list[Any] = []
        self.pending[call_id] = (done, box)
        try:
            await self.channel.send((call_id, fn, args))
            await done.wait()
        finally:
            self.pending.pop(call_id, None)
        if self.failure is not None and not box:
            raise SwarmWorkerError(self.failure)
        ok, result = box
        if not ok:
            raise RemoteError(f"in swarm worker {self.index}:\n{result}")
        return result

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Send without waiting for the reply (in order with the calls after it)."""
        self.posted.send_nowait((next(self.ids), fn, args))

    async def send_posted(self, posted: trio.MemoryReceiveChannel[Any]) -> None:
        async for frame in posted:
            await self.channel.send(frame)

    async def read(self, on_failure: Callable[[], None]) -> None:
        """Route replies to their callers until the worker ends; a crash or an
        unexpected exit fails every call and the swarm."""
        try:
            while True:
                call_id, ok, result = await self.channel.receive()
                if call_id == 0:
                    self.failure = f"swarm worker {self.index} crashed:\n{result}"
                    break
                waiting = self.pending.get(call_id)
                if waiting is not None:
                    waiting[1][:] = [ok, result]
                    waiting[0].set()
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            if self.stopping:
                return
            with trio.move_on_after(2):
                await self.process.wait()
            self.failure = (
                f"swarm worker {self.index} exited (code {self.process.returncode}); "
                f"its stderr ends:\n{_tail(self.log)}"
            )
        if self.stopping and self.failure is None:
            return
        for done, _ in list(self.pending.values()):
            done.set()
        on_failure()


def _tail(path: Path, size: int = 4000) -> str:
    try:
        return path.read_bytes()[-size:].decode(errors="replace")
    except OSError:
        return "(no stderr)"


async def spawn_worker(
    index: int, log: Path, prefix: Sequence[str] = ()
) -> tuple[_Worker, trio.MemoryReceiveChannel[Any]]:
    """Start worker `index`, its stderr into `log`; `prefix` runs it in a netns."""
    parent_sock, child_sock = socket.socketpair()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env["P2P_NODE_SWARM_MAIN"] = _parents_main()
    command = [*prefix, sys.executable, "-m", "p2p_node._swarm_proc", str(child_sock.fileno())]
    with open(log, "wb") as err:  # noqa: ASYNC230 (a local file, opened once)
        try:
            process = await trio.lowlevel.open_process(
                command,
                pass_fds=(child_sock.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                env=env,
            )
        finally:
            child_sock.close()
    channel = _Channel(trio.SocketStream(trio.socket.from_stdlib_socket(parent_sock)))
    worker_ = _Worker(index, process, channel, log)
    send, receive = trio.open_memory_channel[Any](float("inf"))
    worker_.posted = send
    return worker_, receive


async def stop_worker(worker_: _Worker) -> None:
    """Ask the worker to stop; kill it if it has not within the grace."""
    worker_.stopping = True
    with trio.CancelScope(shield=True):
        if worker_.process.returncode is None and worker_.failure is None:
            with trio.move_on_after(1):
                with contextlib.suppress(
                    trio.BrokenResourceError, trio.ClosedResourceError, OSError
                ):
                    await worker_.channel.send((0, None, ()))
        with trio.move_on_after(STOP_GRACE_S):
            await worker_.process.wait()
        if worker_.process.returncode is None:
            worker_.process.kill()
            await worker_.process.wait()
        await worker_.channel.stream.aclose()


@dataclass
class NodeHandle:
    """A node in a worker process: its identity here, the node itself there."""

    swarm: ProcessSwarm
    index: int
    peer_id: str
    addrs: list[str]

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(node, *args)` in the node's worker (awaited if it returns an awaitable)."""
        return await self.swarm.run(self.index, fn, *args)


class ProcessSwarm:
    """The `Swarm` API over worker processes. Each node is a `NodeHandle`; reach
    the node itself with `await swarm.run(i, fn, *args)`, fn a picklable function
    of (node, *args)."""

    def __init__(self, workers: list[_Worker], owner: list[int], netns: Any = None) -> None:
        self.workers = workers
        self.owner = owner  # node index -> worker index
        self.nodes: list[NodeHandle] = []
        self.dead: set[int] = set()
        self.netns = netns  # a Namespaces when the workers each have one

    def __len__(self) -> int:
        return len(self.nodes)

    def __getitem__(self, i: int) -> NodeHandle:
        return self.nodes[i]

    @property
    def live(self) -> list[int]:
        return [i for i in range(len(self.nodes)) if i not in self.dead]

    def worker_of(self, i: int) -> _Worker:
        return self.workers[self.owner[i]]

    async def run(self, i: int, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.worker_of(i).call(on_node, i, fn, *args)

    async def kill(self, i: int) -> None:
        self.dead.add(i)
        await self.worker_of(i).call(kill_node, i)

    def stall(self, i: int, seconds: float) -> None:
        self.worker_of(i).post(on_node, i, _silence, seconds)

    async def block(self, i: int, peer_ids: Collection[str]) -> None:
        await self.worker_of(i).call(block_node, i, peer_ids)

    async def partition(self, groups: Iterable[Iterable[int]]) -> None:
        """Cut every link between groups until `heal()`: with namespaces, each
        group's workers move to a bridge of their own (the other group's packets
        no longer reach them); without, every node blocks the other groups' peers."""
        groups = [list(group) for group in groups]
        member = {i: g for g, group in enumerate(groups) for i in group}
        if self.netns is not None:
            by_worker: dict[int, int | None] = {}
            for i in self.live:
                w = self.owner[i]
                if by_worker.setdefault(w, member.get(i)) != member.get(i):
                    raise ValueError(
                        f"with namespaces a partition cuts whole workers: worker {w} "
                        "holds nodes of two groups"
                    )
            await self.netns.partition([by_worker[w] for w in range(len(self.workers))])
            return
        # One call per worker, each blocking all of its nodes' peers before cutting a
        # connection: a call per node reached busy workers one by one, and records
        # crossed by links not yet cut.
        cuts = partition_cuts(groups, self.live, [node.peer_id for node in self.nodes])
        async with trio.open_nursery() as nursery:
            for w, worker in enumerate(self.workers):
                mine = [(i, cut) for i, cut in cuts if self.owner[i] == w]
                nursery.start_soon(worker.call, block_nodes, mine)

    async def heal(self) -> None:
        """Restore every link; every node then redials its kept peers at once.

        One call per worker: a call per node took 21 s to reach 200 nodes over 2
        workers busy redialing for the nodes healed first (which the others still
        refused), longer than the views took to be whole once all were healed."""
        if self.netns is not None:
            await self.netns.heal()
        fn = kick_nodes if self.netns is not None else unblock_nodes
        async with trio.open_nursery() as nursery:
            for w, worker in enumerate(self.workers):
                nursery.start_soon(worker.call, fn, [i for i in self.live if self.owner[i] == w])

    async def wait_converged(self) -> None:
        """Until every live node sees every other live node alive, and no dead one."""
        ids = {i: self.nodes[i].peer_id for i in self.live}
        async with trio.open_nursery() as nursery:
            for i in self.live:
                want = frozenset(p for j, p in ids.items() if j != i)
                nursery.start_soon(self.run, i, wait_complete, want)

    async def cpu_seconds(self) -> float:
        """CPU time so far of every worker process and this one."""
        total = [time_process()]

        async def one(w: _Worker) -> None:
            total.append(await w.call(cpu_seconds))

        async with trio.open_nursery() as nursery:
            for w in self.workers:
                nursery.start_soon(one, w)
        return sum(total)


def _silence(node: Any, seconds: float) -> None:
    node.gossip.silence(seconds)


if __name__ == "__main__":
    worker(sys.argv[1:])

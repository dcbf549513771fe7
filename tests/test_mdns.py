"""System: two nodes started with --mdns and no bootstrap find each other on a LAN.

The LAN is made here: two network namespaces (the two hosts) wired by veth pairs
to a bridge in a third, all in 10.231.0.0/24. Nothing is attached to this
machine's own network, so the multicast stays on links this test made. It needs
root (or CAP_NET_ADMIN) and `ip`; without them it skips, saying why. Every
namespace it made is deleted on the way out, whatever happened (deleting a
namespace deletes its links).
"""

from __future__ import annotations

import json
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

SEE_EACH_OTHER_S = 15.0  # the bound, from the moment both nodes listen
START_S = 60.0
SUBNET = "10.231.0"

# Run inside a host's namespace: ask its node for its view until `other` is alive in
# it; print the seconds since `t0` (CLOCK_MONOTONIC is not namespaced).
WATCH = """
import json, sys, time, trio
from p2p_node import Client
addr, other, t0, deadline = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
async def main():
    while time.monotonic() - t0 < deadline:
        async with Client.connect(addr) as client:
            peers = await client.peers()
        if any(p.record.peer_id == other and p.state == "alive" for p in peers):
            print(json.dumps({"seen_after_s": time.monotonic() - t0}))
            return
        await trio.sleep(0.2)
    print(json.dumps({"seen_after_s": None, "view": [p.record.peer_id for p in peers]}))
trio.run(main)
"""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def in_ns(ns: str, *args: str) -> None:
    ip("netns", "exec", ns, *args)


@contextmanager
def namespace(name: str) -> Iterator[str]:
    ip("netns", "add", name)
    try:
        in_ns(name, "ip", "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


@contextmanager
def lan(hosts: int) -> Iterator[list[str]]:
    """`hosts` namespaces on one bridge; host i has address 10.231.0.(i + 1)."""
    tag = secrets.token_hex(3)
    with ExitStack() as stack:
        bridge = stack.enter_context(namespace(f"p2pm-{tag}-br"))
        in_ns(bridge, "ip", "link", "add", "br0", "type", "bridge")
        in_ns(bridge, "ip", "link", "set", "br0", "up")
        names = []
        for i in range(hosts):
            host = stack.enter_context(namespace(f"p2pm-{tag}-{i}"))
            # Both ends are created inside the namespaces: none ever exists out here.
            ip(
                "link",
                "add",
                "eth0",
                "netns",
                host,
                "type",
                "veth",
                "peer",
                "name",
                f"port{i}",
                "netns",
                bridge,
            )
            in_ns(bridge, "ip", "link", "set", f"port{i}", "master", "br0")
            in_ns(bridge, "ip", "link", "set", f"port{i}", "up")
            in_ns(host, "ip", "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", "eth0")
            in_ns(host, "ip", "link", "set", "eth0", "up")
            # A LAN host's default route (no gateway answers on it): py-libp2p's mDNS
            # asks the routing table for the host's address.
            in_ns(host, "ip", "route", "add", "default", "dev", "eth0")
            names.append(host)
        yield names


def _namespaces_unavailable() -> str | None:
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    probe = f"p2pm-probe-{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot make network namespaces here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@contextmanager
def node_in(ns: str, data_dir: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`p2p-node start --mdns` on 0.0.0.0 in namespace `ns`, as the README starts one,
    and its address on the LAN; SIGTERM on exit."""
    proc = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            ns,
            sys.executable,
            "-m",
            "p2p_node",
            "start",
            "--mdns",
            "--listen",
            "/ip4/0.0.0.0/tcp/4001",
            "--data-dir",
            str(data_dir),
        ],
        cwd=data_dir.parent,  # no bootstrap_peers.toml there: no bootstrap at all
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc, _lan_address(proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _lan_address(proc: subprocess.Popen[str]) -> str:
    """The node prints all its addresses at once when it runs: wait for the first line,
    then read on (later lines may already sit in the pipe's buffer, unseen by select)."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        ready = selector.select(timeout=START_S)
    for line in iter(proc.stdout.readline, "") if ready else ():
        if line.startswith(f"listening on /ip4/{SUBNET}."):
            return line.removeprefix("listening on ").strip()
    proc.kill()
    _, stderr = proc.communicate()
    raise AssertionError(f"the node printed no LAN address in time:\n{stderr[-3000:]}")


@pytest.mark.system
def test_two_nodes_with_mdns_and_no_bootstrap_see_each_other(tmp_path: Path) -> None:
    reason = _namespaces_unavailable()
    if reason is not None:
        pytest.skip(reason)
    with lan(2) as (ns_a, ns_b):
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        with node_in(ns_a, tmp_path / "a" / "node") as (a, addr_a):
            with node_in(ns_b, tmp_path / "b" / "node") as (b, addr_b):
                t0 = time.monotonic()  # both listen
                ids = [addr_a.rsplit("/p2p/", 1)[1], addr_b.rsplit("/p2p/", 1)[1]]
                watchers = [
                    subprocess.Popen(
                        [
                            "ip",
                            "netns",
                            "exec",
                            ns,
                            sys.executable,
                            "-c",
                            WATCH,
                            addr,
                            other,
                            str(t0),
                            str(SEE_EACH_OTHER_S + 30),
                        ],
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                    )
                    for ns, addr, other in ((ns_a, addr_a, ids[1]), (ns_b, addr_b, ids[0]))
                ]
                try:
                    outcomes = [_outcome(w) for w in watchers]
                finally:
                    for watcher in watchers:
                        if watcher.poll() is None:
                            watcher.kill()
                            watcher.wait()
    assert (a.returncode, b.returncode) == (0, 0)  # SIGTERM is a clean shutdown
    seen = [o["seen_after_s"] for o in outcomes]
    assert None not in seen, outcomes
    assert max(seen) <= SEE_EACH_OTHER_S, seen


def _outcome(watcher: subprocess.Popen[str]) -> dict[str, object]:
    out, err = watcher.communicate(timeout=SEE_EACH_OTHER_S + 90)
    assert watcher.returncode == 0, err[-3000:]
    return dict(json.loads(out))

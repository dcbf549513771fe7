"""`p2p-node top`: frames drawn from values, the stats message, and the command run
against a real swarm, without a terminal and on a pseudo-terminal."""

from __future__ import annotations

import dataclasses
import os
import pty
import signal
import termios

import numpy as np
import pytest
import trio
from test_cli import CLI
from test_record import BARE, REALISTIC

from p2p_node import Client
from p2p_node._codec import decode_reply, decode_request, encode
from p2p_node._messages import InvalidMessage, ModelStats, PeerReport, StatsReply, StatsRequest
from p2p_node._top import ModelRow, Sample, frame_of, frame_text, short_id
from p2p_node.testing import open_swarm

NODE = "12D3KooWMgBawwNoAtxb9FuYT4E1bDZyZfE4EK1H3pzfU6f3vTdM"
OTHER_PEER = "12D3KooWANguz1fnVvsm92NFqtdocT7j9tYe8ykqY5tixKLEVGwo"
MLP = "digits-mlp"


def sample(at: float, jobs: int, *, errors: int = 0, peers: tuple[PeerReport, ...] = ()) -> Sample:
    stats = StatsReply(NODE, 2, 3, (ModelStats(MLP, jobs, errors, 1.234, 9.876),))
    return Sample(at, stats, peers)


def models_part(text: str) -> str:
    return text.split("jobs coordinated by this node", 1)[1]


def row_of(text: str, first_cell: str) -> list[str]:
    """The cells of the table row whose first cell is `first_cell`."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row for {first_cell!r} in\n{text}")


# --- frames from values ---------------------------------------------------------------


def test_a_frame_shows_the_view_the_load_and_per_model_rates_and_latency() -> None:
    suspect = dataclasses.replace(BARE, peer_id=OTHER_PEER)
    peers = (PeerReport(REALISTIC, 1.25, "alive"), PeerReport(suspect, 30.0, "suspect"))
    before, now = sample(10.0, 10, peers=peers), sample(12.0, 30, errors=1, peers=peers)
    frame = frame_of(now, before, ("digits-mlp", "digits-svm"), taken_at=0.0)
    text = frame_text(frame, width=140)
    assert NODE in text  # the node itself, in full, in the header
    assert "this node: 2 running, 3 queued; serves digits-mlp, digits-svm" in text
    assert "2 peers (1 alive, 1 suspect); 10.0 jobs/s coordinated here" in text
    busy = row_of(text, short_id(REALISTIC.peer_id))
    load = REALISTIC.load
    assert busy[1:6] == [
        "alive",
        f"{1.25:.1f}s",
        str(load.in_flight),
        str(load.queue_length),
        f"{load.cpu_percent:.0f}%",
    ]
    loaded = [m.descriptor.id + ("" if m.loaded else "*") for m in REALISTIC.models]
    assert ", ".join(loaded).startswith(busy[6].rstrip(",…"))  # the cell may wrap
    assert row_of(text, short_id(OTHER_PEER))[1:3] == ["suspect", "30.0s"]
    assert row_of(models_part(text), MLP) == [MLP, "30", "1", "10.0", "1.23", "9.88"]


def test_the_first_frame_has_no_rates_and_an_empty_network_says_so() -> None:
    empty = Sample(5.0, StatsReply(NODE, 0, 0, ()), ())
    text = frame_text(frame_of(empty, None, (), taken_at=0.0))
    assert "0 peers (0 alive, 0 suspect); - jobs/s" in text and "serves nothing" in text
    assert "(no peers known)" in text and "(no jobs yet)" in text
    first = frame_of(sample(5.0, 7), None, (MLP,), taken_at=0.0)
    assert first.jobs_per_s is None and first.models[0].jobs_per_s is None
    assert row_of(models_part(frame_text(first)), MLP)[1:4] == ["7", "0", "-"]
    # A model first seen in the later sample ran all its jobs in between.
    later = frame_of(sample(7.0, 7), empty, (MLP,), taken_at=0.0)
    assert later.models == (ModelRow(MLP, 7, 0, 3.5, 1.234, 9.876),)
    assert later.jobs_per_s == 3.5


def test_a_frame_shows_the_fetches_when_there_are_some() -> None:
    from p2p_node._manifest import Progress

    going = Progress("minilm-l6-v2", "fetching", 9 << 20, 22 << 20, 2)
    now = dataclasses.replace(sample(5.0, 7), fetches=(going,))
    text = frame_text(frame_of(now, None, (MLP,), taken_at=0.0), width=140)
    assert row_of(text, "minilm-l6-v2") == ["minilm-l6-v2", "fetching", "9.0", "22.0", "2"]
    assert "fetches" not in frame_text(frame_of(sample(5.0, 7), None, (MLP,), taken_at=0.0))


def test_short_ids_keep_both_ends() -> None:
    shown = short_id(NODE)
    assert len(shown) < 20 and shown.startswith(NODE[:8]) and shown.endswith(NODE[-6:])
    assert short_id(NODE[:-1] + "x") != shown  # ids that differ at the end stay apart
    assert short_id("short") == "short"


# --- the message ---------------------------------------------------------------------


def test_stats_messages_round_trip_and_refuse_what_cannot_be() -> None:
    reply = StatsReply(NODE, 1, 2, (ModelStats(MLP, 5, 1, 0.5, 2.0), ModelStats("x", 0, 0)))
    assert decode_reply(encode(reply)) == reply
    assert decode_request(encode(StatsRequest())) == StatsRequest()
    with pytest.raises(InvalidMessage, match="2 errors of 1 jobs"):
        ModelStats(MLP, 1, 2)
    with pytest.raises(InvalidMessage, match="p99_ms"):
        ModelStats(MLP, 1, 0, 1.0, float("nan"))
    with pytest.raises(InvalidMessage, match="in_flight"):
        StatsReply(NODE, -1, 0, ())


# --- the command against a real swarm --------------------------------------------------


async def test_top_without_a_terminal_prints_one_frame_of_a_real_network(
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    x, _ = digits
    with trio.fail_after(90):
        async with open_swarm(3) as swarm:
            await swarm.wait_converged()
            async with Client.connect(swarm[0].addrs[0]) as client:
                for i in range(4):
                    await client.submit(MLP, {"input": x[i : i + 1]})
                stats = await client.stats()
            done = await trio.run_process(
                [*CLI, "top", "--peer", swarm[0].addrs[0], "--interval", "0.2"],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env={**os.environ, "COLUMNS": "160", "PYTHONIOENCODING": "utf-8"},
            )
    text = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()
    assert swarm[0].metrics_addr is None  # no endpoint unless asked: top needs none
    assert swarm[0].peer_id in text
    assert "2 peers (2 alive, 0 suspect)" in text
    for peer in (swarm[1], swarm[2]):
        assert row_of(text, short_id(peer.peer_id))[1] == "alive"
    assert row_of(models_part(text), MLP)[1:3] == ["4", "0"]
    assert [(m.model_id, m.jobs, m.errors) for m in stats.models] == [(MLP, 4, 0)]
    assert text.count("p2p-node top") == 1  # one frame


async def test_top_on_a_terminal_quits_on_q_and_on_ctrl_c_and_restores_the_terminal() -> None:
    with trio.fail_after(90):
        async with open_swarm(1) as swarm:
            for quit_by in ("q", "SIGINT"):
                master, slave = pty.openpty()
                try:
                    before = termios.tcgetattr(slave)
                    proc = await trio.lowlevel.open_process(
                        [*CLI, "top", "--peer", swarm[0].addrs[0], "--interval", "0.2"],
                        stdin=slave,
                        stdout=slave,
                        stderr=slave,
                    )
                    screen = await _read_until(master, b"jobs coordinated by this node")
                    assert swarm[0].peer_id.encode() in screen
                    if quit_by == "q":
                        os.write(master, b"q")
                    else:
                        proc.send_signal(signal.SIGINT)
                    assert await proc.wait() == 0
                    assert termios.tcgetattr(slave) == before  # echo and lines are back
                finally:
                    os.close(master)
                    os.close(slave)


async def _read_until(fd: int, wanted: bytes) -> bytes:
    seen = b""
    while wanted not in seen:
        await trio.lowlevel.wait_readable(fd)
        seen += os.read(fd, 65536)
    return seen

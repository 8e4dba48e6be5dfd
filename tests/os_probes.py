"""What the OS says about processes, read from /proc: listening TCP sockets, a process's tree, the process
that owns a socket. For tests that check what a session started, as another local user would see it."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

LISTEN = "0A"  # the TCP state LISTEN in /proc/net/tcp


def tcp_listeners() -> dict[int, set[str]]:
    """The OS's socket table: port -> the local addresses something listens on (IPv4 and IPv6)."""
    found: dict[int, set[str]] = {}
    for _, address, port in listening_sockets():
        found.setdefault(port, set()).add(address)
    return found


def listening_sockets() -> list[tuple[int, str, int]]:
    """(socket inode, local address, port) of every listening TCP socket, from /proc/net/tcp{,6}."""
    sockets = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if state == LISTEN:
                address, port = local.split(":")
                sockets.append((inode, _address(address, width), int(port, 16)))
    return sockets


def process_tree(root: int) -> set[int]:
    """root and every process it started, transitively."""
    parent_of = {}
    for status in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            parent_of[int(status.parent.name)] = int(status.read_text().rsplit(")", 1)[1].split()[1])
    tree, grew = {root}, True
    while grew:
        children = {pid for pid, parent in parent_of.items() if parent in tree} - tree
        tree |= children
        grew = bool(children)
    return tree


def socket_owners(pids: set[int]) -> dict[int, int]:
    """socket inode -> the pid (of `pids`) holding it open."""
    owner = {}
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            with contextlib.suppress(OSError):
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    owner[int(link[8:-1])] = pid
    return owner


def listeners_of_this_process_tree() -> dict[str, set[str]]:
    """'name(pid):port' -> local addresses, for every socket that this process or any process it started
    (Ray's gcs_server, raylet, workers and agents; Redis) listens on."""
    owner = socket_owners(process_tree(os.getpid()))
    found: dict[str, set[str]] = {}
    for inode, address, port in listening_sockets():
        if inode in owner:
            found.setdefault(f"{command_name(owner[inode])}({owner[inode]}):{port}", set()).add(address)
    return found


def pid_listening_on(port: int) -> int:
    """The process of this process's tree that listens on `port`."""
    owner = socket_owners(process_tree(os.getpid()))
    pids = {owner[inode] for inode, _, p in listening_sockets() if p == port and inode in owner}
    if len(pids) != 1:
        raise LookupError(f"port {port}: listened on by {sorted(pids) or 'no process'} of this process's tree")
    return pids.pop()


def command_name(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/comm").read_text().strip()
    return "?"


def niceness(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def environment(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    return dict(entry.split("=", 1) for entry in entries if "=" in entry)


def _address(hexed: str, width: int) -> str:
    raw = bytes.fromhex(hexed)
    if width == 8:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))  # four little-endian words
    return socket.inet_ntop(socket.AF_INET6, words)

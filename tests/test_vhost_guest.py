"""The test guest does block I/O through memory it has just plugged, served by
a real ``qemu-storage-daemon`` over vhost-user-blk (issue 15, point 6).

The guest (``kvmmem.blk=N``, tests/guest/virtio_blk.c) plugs two blocks of
the virtio-mem device per round, writes a sector from a buffer in the first
and reads it back into a buffer in the second, checks it and unplugs both;
the back-end can only do that if the memslots of those blocks were mirrored
to it after they were plugged. The host then checks the raw image file: each
sector the guest reports holds the pattern, and nothing else was written.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [pytest.mark.kvm, pytest.mark.vhost]

MiB, GiB = 1 << 20, 1 << 30
ROUNDS = 3
IMAGE_SIZE = MiB
BLK_KEY = 0x6B766D6D626C6B00          # the guest's pattern: word at disk offset o is o ^ BLK_KEY
IO_SIZE = 4096                        # bytes per guest transfer
ROUND = re.compile(r"blk round (\d+): sector (\d+) written from (0x[0-9a-f]+) "
                   r"read into (0x[0-9a-f]+) ok")


def pattern(offset: int, size: int = IO_SIZE) -> bytes:
    """What the guest writes at byte ``offset`` of the disk."""
    return b"".join(((offset + i) ^ BLK_KEY).to_bytes(8, "little") for i in range(0, size, 8))


@dataclass
class StorageDaemon:
    image: Path
    socket: Path
    process: subprocess.Popen[bytes]


@pytest.fixture
def storage_daemon(tmp_path: Path) -> Iterator[StorageDaemon]:
    """qemu-storage-daemon exporting a zeroed raw image as vhost-user-blk."""
    qsd = shutil.which("qemu-storage-daemon")
    if qsd is None:
        pytest.skip("qemu-storage-daemon is missing (Debian 12: apt-get install qemu-system-common)")
    image, sock, log = tmp_path / "disk.img", tmp_path / "vhost-blk.sock", tmp_path / "qsd.log"
    with open(image, "wb") as f:
        f.truncate(IMAGE_SIZE)
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [qsd, "--blockdev", f"driver=file,node-name=file0,filename={image}",
             "--blockdev", "driver=raw,node-name=disk0,file=file0",
             "--export", (f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
                          f"addr.path={sock},writable=on")],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"qemu-storage-daemon did not listen on {sock}: {log.read_text()}")
            time.sleep(0.05)
        yield StorageDaemon(image, sock, process)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def check_image(image: Path, sectors: list[int]) -> None:
    """Each reported sector holds the pattern; every other byte is still zero."""
    data = image.read_bytes()
    assert len(data) == IMAGE_SIZE
    written = bytearray(IMAGE_SIZE)
    for sector in sectors:
        start = sector * 512
        assert data[start:start + IO_SIZE] == pattern(start), f"sector {sector}"
        written[start:start + IO_SIZE] = data[start:start + IO_SIZE]
    assert data == bytes(written)


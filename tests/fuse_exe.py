"""A minimal FUSE server for tests: serves one executable file, and can stop
answering GETATTR for it (a peer that leaves the broker's stat of its
/proc/PID/exe hanging).  Speaks the kernel's FUSE protocol on /dev/fuse
directly, so the tests need no libfuse.

    python tests/fuse_exe.py MOUNTPOINT SOURCE NAME HANG_FLAG

mounts MOUNTPOINT (root only), serves SOURCE's bytes as MOUNTPOINT/NAME, and
while the file HANG_FLAG exists leaves every GETATTR of NAME unanswered,
counting them in HANG_FLAG + ".count".  Prints "ready" once mounted; exits
(the mount is then detached by the caller) when killed.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
import sys

FUSE_LOOKUP, FUSE_FORGET, FUSE_GETATTR = 1, 2, 3
FUSE_OPEN, FUSE_READ, FUSE_RELEASE, FUSE_FLUSH = 14, 15, 18, 25
FUSE_INIT, FUSE_INTERRUPT, FUSE_BATCH_FORGET = 26, 36, 42
NO_REPLY = {FUSE_FORGET, FUSE_INTERRUPT, FUSE_BATCH_FORGET}
ROOT_ID, FILE_ID = 1, 2

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, extlen, pad
OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr (88 bytes)
MAX_WRITE = 128 * 1024


def attr(nodeid: int, size: int) -> bytes:
    mode = (stat.S_IFDIR | 0o755) if nodeid == ROOT_ID else (stat.S_IFREG | 0o755)
    return ATTR.pack(nodeid, size, (size + 511) // 512, 0, 0, 0, 0, 0, 0, mode, 1, 0, 0, 0, 4096, 0)


def serve(mountpoint: str, source: str, name: str, hang_flag: str) -> None:
    with open(source, "rb") as f:
        content = f.read()
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    libc = ctypes.CDLL(None, use_errno=True)
    opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
    if libc.mount(b"shmbroker-test", mountpoint.encode(), b"fuse", 0, opts) != 0:
        # On stdout, where the test reads it as the reason to skip (e.g. a
        # container without CAP_SYS_ADMIN).
        print(f"cannot mount FUSE: {os.strerror(ctypes.get_errno())}", flush=True)
        return
    print("ready", flush=True)
    hung = 0
    while True:
        try:
            req = os.read(fd, MAX_WRITE + 4096)
        except OSError as exc:
            if exc.errno in (errno.ENODEV, errno.EBADF):
                return  # unmounted
            if exc.errno == errno.EINTR:
                continue
            raise
        _, opcode, unique, nodeid, *_ = IN_HEADER.unpack_from(req)
        body = req[IN_HEADER.size :]
        if opcode in NO_REPLY:
            continue
        error, out = 0, b""
        if opcode == FUSE_INIT:
            major, minor, readahead, _flags = struct.unpack_from("<IIII", body)
            out = struct.pack("<IIIIHHIIHHII", 7, min(minor, 31), readahead, 0, 16, 12, MAX_WRITE, 1, 32, 0, 0, 0) + bytes(24)
        elif opcode == FUSE_LOOKUP:
            if nodeid == ROOT_ID and body.rstrip(b"\0") == name.encode():
                # Valid for 0 s: every stat of the file asks us again.
                out = struct.pack("<QQQQII", FILE_ID, 0, 0, 0, 0, 0) + attr(FILE_ID, len(content))
            else:
                error = -errno.ENOENT
        elif opcode == FUSE_GETATTR:
            if nodeid == FILE_ID and os.path.exists(hang_flag):
                hung += 1
                with open(hang_flag + ".count", "w") as f:
                    f.write(str(hung))
                continue  # never answered: whoever stats the file waits
            out = struct.pack("<QII", 0, 0, 0) + attr(nodeid, len(content))
        elif opcode == FUSE_OPEN:
            out = struct.pack("<QII", 0, 0, 0)
        elif opcode == FUSE_READ:
            _fh, offset, size = struct.unpack_from("<QQI", body)
            out = content[offset : offset + size]
        elif opcode in (FUSE_RELEASE, FUSE_FLUSH):
            pass
        else:
            error = -errno.ENOSYS  # GETXATTR, ACCESS, STATX...: the kernel falls back or remembers
        try:
            os.write(fd, OUT_HEADER.pack(OUT_HEADER.size + len(out), error, unique) + out)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # the request was interrupted meanwhile
                raise


if __name__ == "__main__":
    serve(*sys.argv[1:5])

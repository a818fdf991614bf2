"""A dedupe breaker: open the sealed file (breaking the lease), copy its first
64 KiB to a new file, then FIDEDUPERANGE that copy back over it, so the
sealed file's first extent becomes shared.

    python tests/lab/dedupe_breaker.py SEALED_FILE
"""
import fcntl
import os
import struct
import sys

FIDEDUPERANGE = 0xC0189436
LENGTH = 65536

victim = sys.argv[1]
dst = os.open(victim, os.O_RDWR)          # blocks until rdax revoked and let go
data = os.pread(dst, LENGTH, 0)           # stable now: no grant can write any more
src_path = victim + ".dedupe-src"
src = os.open(src_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
os.pwrite(src, data, 0)
os.fsync(src)
request = bytearray(struct.pack("=QQHHI", 0, LENGTH, 1, 0, 0) + struct.pack("=qQQiI", dst, 0, 0, 0, 0))
fcntl.ioctl(src, FIDEDUPERANGE, request)
_, _, deduped, status, _ = struct.unpack_from("=qQQiI", request, 24)
if status != 0 or deduped != LENGTH:
    sys.exit(f"FIDEDUPERANGE: status {status}, {deduped} bytes deduplicated")

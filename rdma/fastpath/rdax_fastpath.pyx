# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""rdax's native post-and-poll: the hot loops of rdma/connection.py in C, on the very QP and CQ that pyverbs made.

Posting through pyverbs costs a Python call per attribute of every work request, and waiting spins in Python
holding the GIL; under the lab's emulation that is most of a 4 KiB write+FLUSH. Here a whole batch is built
with libibverbs' ibv_wr_* calls and the completion queue is polled with the GIL released. `Connection` uses
this module when it is importable and agrees with the pyverbs it was built against (`usable`), and keeps its
pure-pyverbs path otherwise; both are tested (tests/lab/test_fastpath.py).

Built against rdma-core v56.1's pyverbs declarations (pxd/, as Debian 13 ships pyverbs without them): the
types' sizes are checked when this module is imported, and `usable` checks a field through the raw pointers.
"""

from libc.errno cimport ENOENT
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, nanosleep, timespec

import weakref

from pyverbs.cq cimport CQEX
from pyverbs.qp cimport QPEx
cimport pyverbs.libibverbs as v


cdef extern from "<sched.h>" nogil:
    int sched_yield()


# write_flush's answer when no completion came within its budget: both requests are still in flight.
PENDING = -1
# While spinning, sched_yield() once every YIELD_MASK + 1 polls (a power of two); tests/bench/hotpath.py A/Bs it.
cdef unsigned int YIELD_MASK_C = 0xF
YIELD_MASK = YIELD_MASK_C
# Napping between polls once the spin is over: from NAP_MIN_NS doubling to NAP_MAX_NS (connection.py's NAP_*).
cdef int64_t NAP_MIN_NS = 100000
cdef int64_t NAP_MAX_NS = 1000000


cdef inline int64_t _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef int _wait(v.ibv_cq_ex *cq, int64_t spin_ns, int64_t budget_ns, unsigned int yield_mask) noexcept nogil:
    """ibv_start_poll until a completion is there (0: the poll batch is open), `budget_ns` ran out (ENOENT), or
    an error (its errno). Spins for `spin_ns` (yielding the CPU every yield_mask + 1 polls: soft-RoCE's own work
    runs on these CPUs), then naps between polls: a long wait must not take the CPU from the peer and the
    kernel."""
    cdef v.ibv_poll_cq_attr attr
    attr.comp_mask = 0
    cdef int rc = v.ibv_start_poll(cq, &attr)
    if rc != ENOENT:
        return rc
    cdef int64_t start = _now(), elapsed, nap = 0
    cdef unsigned int spins = 0
    cdef timespec ts
    while True:
        spins += 1
        if not (spins & yield_mask):
            sched_yield()
        if nap or not (spins & 0x3F):   # the clock only now and then while spinning: it costs as much as a poll
            elapsed = _now() - start
            if elapsed >= budget_ns:
                return ENOENT
            if elapsed >= spin_ns:
                nap = NAP_MIN_NS if nap == 0 else min(nap * 2, NAP_MAX_NS)
                ts.tv_sec = 0
                ts.tv_nsec = nap
                nanosleep(&ts, NULL)
        rc = v.ibv_start_poll(cq, &attr)
        if rc != ENOENT:
            return rc


def usable(QPEx qp not None, CQEX cq not None):
    """Whether this build sees pyverbs' objects as they are: the QP number read through the raw ibv_qp_ex
    pointer must be the one pyverbs reports, and both pointers must be set."""
    if qp.qp_ex == NULL or cq.cq == NULL:
        return False
    return qp.qp_ex.qp_base.qp_num == qp.qp_num


def poll(CQEX cq not None, int64_t spin_ns, int64_t budget_ns, unsigned int yield_mask=YIELD_MASK):
    """Wait for completions (GIL released) and read them all: (rc, retired, status). rc is ENOENT if none came
    within `budget_ns`, an errno if polling failed, else 0; `retired` adds up the wr_id of every successful
    completion read (the requests each retires, at least 1); `status` is the first failed completion's status
    (reading stops there; 0 if none failed)."""
    cdef v.ibv_cq_ex *c = cq.cq
    cdef int rc, status = 0
    cdef uint64_t retired = 0, wr_id
    with nogil:
        rc = _wait(c, spin_ns, budget_ns, yield_mask)
        if rc == 0:
            while True:
                if c.status != 0:
                    status = c.status
                    break
                wr_id = c.wr_id
                retired += wr_id if wr_id > 0 else 1
                if v.ibv_next_poll(c) != 0:
                    break
            v.ibv_end_poll(c)
    return rc, retired, status


def post(QPEx qp not None, chunks, Py_ssize_t start, Py_ssize_t end, int unsignalled, int every,
         Py_ssize_t last, bint read, uint32_t flush_rkey, uint64_t flush_addr, uint64_t flush_len):
    """Post requests start..end-1 of `chunks` (RDMA WRITE, or READ if `read`), request len(chunks) being a
    FLUSH(persistent, range) of [flush_addr, +flush_len) with flush_rkey, in one ibv_wr_start/ibv_wr_complete.
    `chunks` holds (laddr, lkey, length, rkey, raddr) tuples. A request is signalled once `every` went
    unsignalled, and request `last`; a signalled request's wr_id counts the requests its completion retires.
    Returns how many went unsignalled since the last signalled one; raises OSError if ibv_wr_complete failed
    (then nothing of the batch was posted)."""
    cdef v.ibv_qp_ex *q = qp.qp_ex
    cdef Py_ssize_t nchunks = len(chunks), k
    cdef tuple c
    cdef object item
    cdef int rc
    v.ibv_wr_start(q)
    q.wr_flags = 0
    q.wr_id = 0
    try:
        for k in range(start, end):
            unsignalled += 1
            if unsignalled >= every or k == last:
                q.wr_id = unsignalled
                q.wr_flags = v.IBV_SEND_SIGNALED
                unsignalled = 0
            elif q.wr_flags:
                q.wr_id = 0
                q.wr_flags = 0
            if k < nchunks:
                item = chunks[k]
                # Chunk is a named tuple: a tuple subclass, which <tuple?> would refuse (it wants exactly tuple).
                if not isinstance(item, tuple) or len(<tuple>item) != 5:
                    raise TypeError(f"chunk {k} is not (laddr, lkey, length, rkey, raddr): {item!r:.80}")
                c = <tuple>item
                if read:
                    v.ibv_wr_rdma_read(q, <uint32_t>c[3], <uint64_t>c[4])
                else:
                    v.ibv_wr_rdma_write(q, <uint32_t>c[3], <uint64_t>c[4])
                v.ibv_wr_set_sge(q, <uint32_t>c[1], <uint64_t>c[0], <uint32_t>c[2])
            else:
                v.ibv_wr_flush(q, flush_rkey, flush_addr, flush_len, v.IBV_FLUSH_PERSISTENT, v.IBV_FLUSH_RANGE)
    except BaseException:
        v.ibv_wr_abort(q)   # a chunk that is not (int, int, int, int, int): nothing of the batch goes out
        raise
    rc = v.ibv_wr_complete(q)
    if rc:
        raise OSError(rc, "ibv_wr_complete")
    return unsignalled


cdef int _write_flush(v.ibv_qp_ex *q, v.ibv_cq_ex *c, uint64_t laddr, uint32_t lkey, uint32_t length,
                      uint32_t rkey, uint64_t raddr, uint32_t flush_rkey, uint64_t flush_addr, uint64_t flush_len,
                      int64_t spin_ns, int64_t budget_ns, unsigned int yield_mask, int *status,
                      bint *posted, bint split=False) noexcept nogil:
    """Post the WRITE and the signalled FLUSH behind it, wait for the FLUSH's completion: 0 (its status in
    *status), ENOENT (none within budget_ns), or an errno (*posted: whether the requests went out). `split`
    rings the doorbell for each (as librpma's rpma_write + rpma_flush do; hotpath.py A/Bs it)."""
    cdef int rc
    v.ibv_wr_start(q)
    q.wr_flags = 0
    q.wr_id = 0
    v.ibv_wr_rdma_write(q, rkey, raddr)
    v.ibv_wr_set_sge(q, lkey, laddr, length)
    if split:
        rc = v.ibv_wr_complete(q)
        if rc:
            return rc
        v.ibv_wr_start(q)
    q.wr_id = 2
    q.wr_flags = v.IBV_SEND_SIGNALED
    v.ibv_wr_flush(q, flush_rkey, flush_addr, flush_len, v.IBV_FLUSH_PERSISTENT, v.IBV_FLUSH_RANGE)
    rc = v.ibv_wr_complete(q)
    if rc:
        return rc   # (split: the WRITE went out, unsignalled; the caller sees nothing in flight to wait for)
    posted[0] = True
    rc = _wait(c, spin_ns, budget_ns, yield_mask)
    if rc == 0:
        status[0] = c.status
        v.ibv_end_poll(c)
    return rc


def write_flush(QPEx qp not None, CQEX cq not None, uint64_t laddr, uint32_t lkey, uint32_t length,
                uint32_t rkey, uint64_t raddr, uint32_t flush_rkey, uint64_t flush_addr, uint64_t flush_len,
                int64_t spin_ns, int64_t budget_ns, unsigned int yield_mask=YIELD_MASK, bint split=False,
                bint keep_gil=False):
    """The latency case: one RDMA WRITE (unsignalled) and a signalled FLUSH(persistent, range) behind it, with
    nothing else in flight, then wait for the FLUSH's completion (or the first error), GIL released. Returns
    its status (0: the bytes are durable), or PENDING if none came within `budget_ns` (both requests are
    then in flight, the FLUSH's wr_id 2: poll() goes on); raises OSError if posting (strerror
    "ibv_wr_complete": nothing went out) or polling ("ibv_start_poll": both are in flight) failed."""
    cdef int rc, status = 0
    cdef bint posted = False
    if keep_gil:   # (hotpath.py's A/B: what releasing the GIL around the wait costs)
        rc = _write_flush(qp.qp_ex, cq.cq, laddr, lkey, length, rkey, raddr, flush_rkey, flush_addr, flush_len,
                          spin_ns, budget_ns, yield_mask, &status, &posted, split)
    else:
        with nogil:
            rc = _write_flush(qp.qp_ex, cq.cq, laddr, lkey, length, rkey, raddr, flush_rkey, flush_addr,
                              flush_len, spin_ns, budget_ns, yield_mask, &status, &posted, split)
    if rc == ENOENT:
        return PENDING
    if rc:
        raise OSError(rc, "ibv_start_poll" if posted else "ibv_wr_complete")
    return status


def write_flush_timed(QPEx qp not None, CQEX cq not None, uint64_t laddr, uint32_t lkey, uint32_t length,
                      uint32_t rkey, uint64_t raddr, uint64_t span, Py_ssize_t count,
                      unsigned int yield_mask=YIELD_MASK):
    """A benchmark's loop, not the library's: `count` write_flush of `length` bytes, page after page over `span`
    bytes from raddr (as librpma's rpma_bench does), all in C with the GIL released, each timed around its post
    and wait; the list of nanoseconds. tests/bench/hotpath.py sets it beside librpma: what is left between them
    is the verbs, not Python."""
    cdef Py_ssize_t i, done = 0
    cdef uint64_t off
    cdef int64_t t0
    cdef int rc = 0, status = 0
    cdef bint posted = False
    cdef int64_t *ns = <int64_t *>malloc(max(count, 1) * sizeof(int64_t))
    if ns == NULL:
        raise MemoryError()
    try:
        with nogil:
            for i in range(count):
                off = raddr + (<uint64_t>i * length) % span
                t0 = _now()
                rc = _write_flush(qp.qp_ex, cq.cq, laddr, lkey, length, rkey, off, rkey, off, length,
                                  10000000000, 10000000000, yield_mask, &status, &posted)
                ns[i] = _now() - t0
                if rc or status:
                    break
                done += 1
        if rc or status:
            raise OSError(rc, f"write_flush_timed: request {done}: rc {rc}, completion status {status}")
        return [ns[i] for i in range(count)]
    finally:
        free(ns)


cdef class WriteFlush:
    """A native Connection's `write_flush`: the latency case (one chunk in a list, nothing in flight) in this
    one C call, every other case handed to Connection's own method (`method`, called with the connection).

    Under the lab's emulation each Python step costs about a microsecond, and the Python method's checks,
    unpacking, close-lock and argument passing came to some 50 us of a ~300 us write+FLUSH (hotpath.py).
    Here they are C. Errors and a wait past the spin go back to the connection's Python (rare paths).

    close() safety without a lock: the connection's `_closed` is read and `busy` raised with the GIL held, and
    released only after the call; Connection.close() sets `_closed`, then waits for `busy` to reach 0 before it
    destroys the QP and CQ (a call spins for at most the connection's spin time, then returns)."""
    cdef QPEx qp
    cdef CQEX cq
    cdef object conn_ref, method
    cdef readonly int busy

    def __cinit__(self, conn, QPEx qp not None, CQEX cq not None, method):
        # (A weak reference: the connection holds this object as an attribute; no cycle for the GC to find.)
        self.conn_ref = weakref.ref(conn)
        self.qp, self.cq, self.method = qp, cq, method

    def __call__(self, chunks, rkey, raddr, length, timeout=60.0):
        cdef object conn = self.conn_ref()
        cdef object item
        cdef tuple c
        cdef uint64_t laddr, waddr, flush_addr, flush_len
        cdef uint32_t lkey, n, wkey, flush_rkey
        cdef int64_t spin_ns
        cdef int rc, status = 0
        cdef bint posted = False
        if (type(chunks) is not list or len(<list>chunks) != 1 or not conn._native or conn._in_flight
                or conn._closed):
            return self.method(conn, chunks, rkey, raddr, length, timeout)
        item = (<list>chunks)[0]
        if not isinstance(item, tuple) or len(<tuple>item) != 5:
            return self.method(conn, chunks, rkey, raddr, length, timeout)
        c = <tuple>item
        laddr, lkey, n, wkey, waddr = c[0], c[1], c[2], c[3], c[4]
        flush_rkey, flush_addr, flush_len = rkey, raddr, length
        spin_ns = conn._spin_ns
        self.busy += 1
        with nogil:
            rc = _write_flush(self.qp.qp_ex, self.cq.cq, laddr, lkey, n, wkey, waddr, flush_rkey, flush_addr,
                              flush_len, spin_ns, spin_ns, YIELD_MASK_C, &status, &posted)
        self.busy -= 1
        if rc == ENOENT:
            status = PENDING
        elif rc:
            exc = OSError(rc, "ibv_start_poll" if posted else "ibv_wr_complete")
            raise conn._native_post_failed(exc, n) from exc
        if status:   # an error, or past the spin (a slow peer, a page fault on the node)
            conn._write_flush_native_wait(status, n, raddr, length, timeout)
        return n

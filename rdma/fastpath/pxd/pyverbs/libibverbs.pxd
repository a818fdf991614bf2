# The part of rdma-core's pyverbs/libibverbs.pxd (v56.1) that rdax_fastpath needs: the structs that pyverbs'
# extension types hold, opaque except for the fields read here (their size comes from <infiniband/verbs.h>
# itself, so the layout of those types matches the compiled pyverbs), and the inline post/poll verbs.
# Written for rdax; the .pxd files beside it are rdma-core's, unchanged (GPL-2.0 OR Linux-OpenIB).

#cython: language_level=3

from libc.stdint cimport uint8_t, uint32_t, uint64_t

cdef extern from 'infiniband/verbs.h':
    cdef struct ibv_qp_cap:
        pass
    cdef struct ibv_qp_init_attr:
        pass
    cdef struct ibv_qp_init_attr_ex:
        pass
    cdef struct ibv_qp_attr:
        pass
    cdef struct ibv_data_buf:
        pass
    cdef struct ibv_ece:
        pass
    cdef struct ibv_comp_channel:
        pass
    cdef struct ibv_cq:
        pass
    cdef struct ibv_cq_init_attr_ex:
        pass
    cdef struct ibv_wc:
        pass
    cdef struct ibv_poll_cq_attr:
        uint32_t comp_mask
    cdef struct ibv_wc_tm_info:
        pass

    cdef struct ibv_qp:
        uint32_t qp_num
    cdef struct ibv_qp_ex:
        ibv_qp qp_base
        uint64_t wr_id
        unsigned int wr_flags
    cdef struct ibv_cq_ex:
        int status          # enum ibv_wc_status
        uint64_t wr_id

    enum:
        IBV_SEND_SIGNALED
        IBV_FLUSH_PERSISTENT
        IBV_FLUSH_RANGE

    void ibv_wr_start(ibv_qp_ex *qp) nogil
    int ibv_wr_complete(ibv_qp_ex *qp) nogil
    void ibv_wr_abort(ibv_qp_ex *qp) nogil
    void ibv_wr_rdma_write(ibv_qp_ex *qp, uint32_t rkey, uint64_t remote_addr) nogil
    void ibv_wr_rdma_read(ibv_qp_ex *qp, uint32_t rkey, uint64_t remote_addr) nogil
    void ibv_wr_set_sge(ibv_qp_ex *qp, uint32_t lkey, uint64_t addr, uint32_t length) nogil
    void ibv_wr_flush(ibv_qp_ex *qp, uint32_t rkey, uint64_t remote_addr, size_t len, uint8_t type,
                      uint8_t level) nogil
    int ibv_start_poll(ibv_cq_ex *cq, ibv_poll_cq_attr *attr) nogil
    int ibv_next_poll(ibv_cq_ex *cq) nogil
    void ibv_end_poll(ibv_cq_ex *cq) nogil

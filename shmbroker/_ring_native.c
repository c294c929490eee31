/*
 * shmbroker._ring_native: the ring's hot path in C (private).
 *
 * The same shared layout and algorithm as shmbroker/_ring/ring.py (the
 * reference implementation, see docs/ring.md), with the memory model stated
 * in C11 terms instead of leaning on x86-64's TSO:
 *
 *   producer: reserve (relaxed store), release fence, record bytes,
 *             write index (release store), seq_cst fence, sleeping flags.
 *   consumer: write index (acquire load), record bytes, acquire fence,
 *             revoked word and reserve index, cursor (release store),
 *             seq_cst fence, producer-waiting flag.
 *
 * Shared words are naturally aligned uint64_t in mmap'd memory accessed
 * through `_Atomic uint64_t *` casts: with lock-free 64-bit atomics (checked
 * below) _Atomic uint64_t has the size and alignment of uint64_t, and
 * lock-free atomics are address-free (C11 7.17.5), which is what makes them
 * work between processes mapping the same page at different addresses.
 *
 * Every value read from shared memory (indices, record headers) is read once
 * into a local and bounds-checked before it is used: peers may be hostile.
 * Whatever this code cannot decide on its own (waiting, errors with their
 * messages, a rescan of the consumers' cursors) goes back to Python through
 * callables the wrapper classes in ring.py set.
 *
 * A copy inside this file may fault if a peer truncates a posix segment:
 * the SIGBUS guard (_guard.c) maps zero pages over the mapping and returns,
 * so the copy completes on zeros and the revoked word, checked after every
 * copy, reports it.  The buffers stay exported (Py_buffer) while a call may
 * use them, even with the GIL released, so the address range is never
 * unmapped under a copy (_sys/mapping.py unmaps when the last export dies).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <math.h>
#include <poll.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#ifndef RWF_NOWAIT
#define RWF_NOWAIT 0x00000008
#endif

#if ATOMIC_LLONG_LOCK_FREE != 2
#error "shmbroker._ring_native needs lock-free 64-bit atomics (address-free, usable across processes)"
#endif
_Static_assert(sizeof(_Atomic uint64_t) == sizeof(uint64_t), "_Atomic uint64_t must be a plain u64");
_Static_assert(_Alignof(_Atomic uint64_t) == _Alignof(uint64_t), "_Atomic uint64_t must align like u64");

/* Layout (_ring/layout.py; the module exports these and ring.py checks
 * them against its own at import). */
#define OFF_DATA_SIZE 24
#define OFF_WRITE 64
#define OFF_PRODUCER_WAITING 80
#define OFF_RESERVE 88
#define OFF_LOW 72
#define OFF_MEMBERS 128
#define OFF_MEMBER_GEN 136
#define OFF_SLOT_INFO 192
#define SLOT_INFO_STRIDE 16
#define OFF_SLEEPING 0
#define OFF_CURSOR 0
#define OFF_REVOKED 32
#define PAGE 4096
#define RECORD_HEADER 8
#define KIND_MSG 1
#define KIND_PAD 2
#define MAX_CONSUMERS 8
#define MAX_INDEX (UINT64_C(1) << 62)
/* Publish (and release the cursor) at least every SPAN bytes of a batch, as
 * ring.py's _SPAN: the other side works on one span while we fill the next. */
#define SPAN (32 * 1024)
/* Copies of at least this many bytes run with the GIL released.  Releasing
 * and taking it back costs two atomic operations and a possible hand-over
 * to a waiting thread; CPython's hashlib releases it from 2 KiB of input
 * (HASHLIB_GIL_MINSIZE), about a microsecond of SHA-256.  memcpy is one to
 * two orders of magnitude faster than hashing, so the copy that costs a few
 * microseconds, and so dwarfs the hand-over, starts at tens of KiB. */
#define GIL_COPY_MIN (64 * 1024)

/* A blocking send or receive that finds the ring full or empty first polls
 * it this long in C before going back to Python to wait (which spins with
 * sched_yield, then sleeps: waiting.py).  About the time the Python wait
 * path itself costs before its first re-check, so a peer a few messages
 * behind is caught without it; bounded, so an idle channel still sleeps. */
#ifndef SPIN_NS
#define SPIN_NS 10000
#endif

#define ALIGN8(n) (((uint64_t)(n) + 7) & ~(uint64_t)7)

/* Between polls of a spin: give the CPU away, as waiting.py's spin does.
 * When the scheduler puts both peers on one CPU, a pause-only spin burns
 * the slice the other side needs; with a CPU each sched_yield returns at
 * once. */
static inline void
cpu_relax(void)
{
    sched_yield();
}

static inline int64_t
now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static inline _Atomic uint64_t *
word(const Py_buffer *b, size_t off)
{
    return (_Atomic uint64_t *)((char *)b->buf + off);
}

static inline uint64_t
load_acquire(const Py_buffer *b, size_t off)
{
    return atomic_load_explicit(word(b, off), memory_order_acquire);
}

static inline uint64_t
load_relaxed(const Py_buffer *b, size_t off)
{
    return atomic_load_explicit(word(b, off), memory_order_relaxed);
}

static inline void
store_release(const Py_buffer *b, size_t off, uint64_t v)
{
    atomic_store_explicit(word(b, off), v, memory_order_release);
}

static inline void
store_relaxed(const Py_buffer *b, size_t off, uint64_t v)
{
    atomic_store_explicit(word(b, off), v, memory_order_relaxed);
}

/* A record header, each field read once.  Relaxed 32-bit atomic loads: the
 * compiler may not read a field twice (a hostile producer could change it
 * between a bounds check and its use) nor tear it. */
static inline void
read_header(const char *p, uint32_t *n, uint32_t *kind)
{
    *n = __atomic_load_n((const uint32_t *)p, __ATOMIC_RELAXED);
    *kind = __atomic_load_n((const uint32_t *)(p + 4), __ATOMIC_RELAXED);
}

static inline void
write_header(char *p, uint32_t n, uint32_t kind)
{
    uint32_t h[2] = {n, kind};
    memcpy(p, h, sizeof h);
}

/* ------------------------------------------------------------------ */
/* eventfd wake-ups, the same semantics as _sys/eventfd.py (signal, wait,
 * drain) without the interpreter around each system call: the wake-up
 * latency target is a small multiple of a bare eventfd ping-pong. */

/* Add one to the counter unless it is full: any holder can clear
 * O_NONBLOCK on the shared open file description, and a write to a full
 * counter would then block; a full counter already means "wake up".  A
 * peer racing the check can still block the write, as in Python: so it
 * runs without the GIL, and stalls this thread only.  Called with the GIL. */
static void
eventfd_signal(int fd)
{
    struct pollfd p = {.fd = fd, .events = POLLOUT};
    if (poll(&p, 1, 0) != 1 || !(p.revents & POLLOUT))
        return;
    uint64_t one = 1;
    ssize_t ignored;
    Py_BEGIN_ALLOW_THREADS
    ignored = write(fd, &one, sizeof one);
    Py_END_ALLOW_THREADS
    (void)ignored;  /* EAGAIN: full after all, which is a wake-up too */
}

/* Sleep until readable or timeout_ms passes (-1: forever), then reset the
 * counter with a read that never blocks whatever O_NONBLOCK says.  Returns
 * poll's errno when a signal interrupted it (0 otherwise): the caller lets
 * Python's handlers run (Ctrl-C), and the wait loop re-checks the ring. */
static int
eventfd_sleep(int fd, int timeout_ms)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    int interrupted = poll(&p, 1, timeout_ms) < 0 && errno == EINTR;
    uint64_t value;
    struct iovec v = {.iov_base = &value, .iov_len = sizeof value};
    ssize_t ignored = preadv2(fd, &v, 1, -1, RWF_NOWAIT);
    (void)ignored;
    return interrupted ? EINTR : 0;
}

/* ------------------------------------------------------------------ */
/* Buffers shared by both cores. */

enum { B_INDEX, B_CONTROL, B_DATA, B_HEADER, B_CURSOR, NBUF };

typedef struct {
    PyObject_HEAD
    Py_buffer buf[NBUF];
    int held;      /* bitmask of acquired buffers */
    int busy;      /* a call is running (maybe with the GIL released) */
    int closed;    /* release() was called: give the buffers back once idle */
    uint64_t data_size;
    uint64_t max_message;
} Core;

static void
core_drop_buffers(Core *c)
{
    for (int i = 0; i < NBUF; i++) {
        if (c->held & (1 << i))
            PyBuffer_Release(&c->buf[i]);
    }
    c->held = 0;
}

static int
core_get(Core *c, int which, PyObject *obj, int writable, Py_ssize_t min_len, const char *what)
{
    if (PyObject_GetBuffer(obj, &c->buf[which], writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0)
        return -1;
    c->held |= 1 << which;
    if (c->buf[which].len < min_len || ((uintptr_t)c->buf[which].buf & 7) != 0) {
        PyErr_Format(PyExc_ValueError, "the ring's %s is too small or misaligned", what);
        return -1;
    }
    return 0;
}

/* A callback into the Python side, or an error: NULL before __init__ wired
 * it (an object made with __new__ alone) or once deleted, None where unset.
 * CB for functions returning an object, CBI for those returning -1. */
#define CB_CHECK(f, fail) ({ PyObject *cb_ = (f); \
    if (cb_ == NULL || cb_ == Py_None) { \
        PyErr_SetString(PyExc_RuntimeError, "ring endpoint is not set up: its Python side is missing"); \
        return fail; \
    } \
    cb_; })
#define CB(f) CB_CHECK(f, NULL)
#define CBI(f) CB_CHECK(f, -1)

/* Closed by another thread while this call copied without the GIL: its
 * wake-up fds may already be closed, and their numbers reused for other
 * files, so nothing more is published or signalled; the call fails as a
 * call on a closed attachment does. */
static int
closed_under_us(void)
{
    PyErr_SetString(PyExc_ValueError, "the attachment was closed during the call");
    return -1;
}

/* Called at the start of every operation: 0 to go on, 1 if the core is
 * closed (the Python path then says so), -1 with an exception. */
static int
core_enter(Core *c)
{
    if (c->busy) {
        PyErr_SetString(PyExc_RuntimeError,
                        "a ring endpoint is used by two threads at once; use one attachment per thread");
        return -1;
    }
    if (c->closed || c->held == 0)
        return 1;
    c->busy = 1;
    return 0;
}

static void
core_leave(Core *c)
{
    c->busy = 0;
    if (c->closed)
        core_drop_buffers(c);
}

static void
copy(void *dst, const void *src, size_t n)
{
    if (n >= GIL_COPY_MIN) {
        Py_BEGIN_ALLOW_THREADS
        memcpy(dst, src, n);
        Py_END_ALLOW_THREADS
    } else {
        memcpy(dst, src, n);
    }
}

static int
core_check_geometry(Core *c, unsigned long long data_size, unsigned long long max_message)
{
    /* data_size at most 2^32, as layout.MAX_DATA_SIZE: a PAD's 32-bit length must hold the rest of the area. */
    if (data_size < PAGE || data_size % 8 || data_size > (uint64_t)c->buf[B_DATA].len || data_size > (UINT64_C(1) << 32) ||
        max_message == 0 || max_message > (UINT64_C(1) << 31) ||
        RECORD_HEADER + ALIGN8(max_message) > data_size) {
        PyErr_SetString(PyExc_ValueError, "ring geometry does not fit its data area");
        return -1;
    }
    c->data_size = data_size;
    c->max_message = max_message;
    return 0;
}

/* What both __init__s take: the four buffers, each with the access its
 * side needs (the producer writes the index page and the data area, a
 * consumer only its word of the control page), and a geometry that fits. */
static int
core_init(Core *c, PyObject *args, PyObject *kwds, int producer)
{
    PyObject *index, *control, *data, *header;
    unsigned long long data_size, max_message;
    static char *kwlist[] = {"index", "control", "data", "header", "data_size", "max_message", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, producer ? "OOOOKK:Producer" : "OOOOKK:Consumer", kwlist,
                                     &index, &control, &data, &header, &data_size, &max_message))
        return -1;
    if (c->held) {
        PyErr_Format(PyExc_RuntimeError, "%s already initialised", producer ? "Producer" : "Consumer");
        return -1;
    }
    if (core_get(c, B_INDEX, index, producer, PAGE, "index page") < 0 ||
        core_get(c, B_CONTROL, control, !producer, 8, "control page") < 0 ||
        core_get(c, B_DATA, data, producer, 0, "data area") < 0 ||
        core_get(c, B_HEADER, header, 0, OFF_REVOKED + 8, "segment header") < 0 ||
        core_check_geometry(c, data_size, max_message) < 0) {
        core_drop_buffers(c);
        return -1;
    }
    return 0;
}

static PyObject *
core_release(Core *c, PyObject *Py_UNUSED(ignored))
{
    c->closed = 1;
    if (!c->busy)
        core_drop_buffers(c);
    Py_RETURN_NONE;
}

/* Parse (x, timeout=None) or (timeout=None) from a vectorcall. */
static int
parse_timeout(const char *name, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
              Py_ssize_t npositional, PyObject **timeout)
{
    *timeout = Py_None;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs < npositional || nargs > npositional + 1 || nargs + nkw > npositional + 1) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd positional argument(s) and an optional timeout",
                     name, npositional);
        return -1;
    }
    if (nargs == npositional + 1)
        *timeout = args[npositional];
    if (nkw) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, 0);
        if (!PyUnicode_Check(key) || PyUnicode_CompareWithASCIIString(key, "timeout") != 0) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument %R", name, key);
            return -1;
        }
        *timeout = args[nargs];
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* Words: shared u64 words for the Python slow paths (rescans, views,
 * waiting flags), with acquire loads and release stores.  ring.py's
 * native classes use it where the reference uses a 'Q' memoryview. */

typedef struct {
    PyObject_HEAD
    Py_buffer buf;
    int held;
    int writable;
} Words;

static int
words_init(Words *self, PyObject *args, PyObject *kwds)
{
    PyObject *obj;
    static char *kwlist[] = {"buffer", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:Words", kwlist, &obj))
        return -1;
    if (self->held) {
        PyBuffer_Release(&self->buf);
        self->held = 0;
    }
    if (PyObject_GetBuffer(obj, &self->buf, PyBUF_SIMPLE) < 0)
        return -1;
    self->held = 1;
    if (((uintptr_t)self->buf.buf & 7) != 0 || self->buf.len % 8) {
        PyErr_SetString(PyExc_ValueError, "Words needs an 8-byte aligned buffer of whole words");
        return -1;
    }
    self->writable = !self->buf.readonly;
    return 0;
}

static void
words_dealloc(Words *self)
{
    if (self->held)
        PyBuffer_Release(&self->buf);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static Py_ssize_t
words_index(Words *self, PyObject *key)
{
    if (!self->held) {
        PyErr_SetString(PyExc_ValueError, "operation forbidden on released shared words");
        return -1;
    }
    Py_ssize_t i = PyNumber_AsSsize_t(key, PyExc_IndexError);
    if (i == -1 && PyErr_Occurred())
        return -1;
    Py_ssize_t count = self->buf.len / 8;
    if (i < 0)
        i += count;
    if (i < 0 || i >= count) {
        PyErr_SetString(PyExc_IndexError, "word index out of range");
        return -1;
    }
    return i;
}

static Py_ssize_t
words_len(Words *self)
{
    return self->held ? self->buf.len / 8 : 0;
}

static PyObject *
words_get(Words *self, PyObject *key)
{
    Py_ssize_t i = words_index(self, key);
    if (i < 0)
        return NULL;
    /* Acquire fence first: whatever the caller read before (a record it
     * copied) is ordered before this load, as the seqlock-style "copy, then
     * check the reserve index" needs; the load itself is acquire so what the
     * caller reads next is ordered after it. */
    atomic_thread_fence(memory_order_acquire);
    return PyLong_FromUnsignedLongLong(load_acquire(&self->buf, (size_t)i * 8));
}

static int
words_set(Words *self, PyObject *key, PyObject *value)
{
    Py_ssize_t i = words_index(self, key);
    if (i < 0)
        return -1;
    if (value == NULL) {
        PyErr_SetString(PyExc_TypeError, "shared words cannot be deleted");
        return -1;
    }
    if (!self->writable) {
        PyErr_SetString(PyExc_TypeError, "these shared words are read-only");
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(value);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    /* Release store: everything written before is visible first.  Then a
     * release fence: a store made before writing data (the reserve index)
     * is visible before that data. */
    store_release(&self->buf, (size_t)i * 8, v);
    atomic_thread_fence(memory_order_release);
    return 0;
}

static PyObject *
words_release(Words *self, PyObject *Py_UNUSED(ignored))
{
    if (self->held) {
        PyBuffer_Release(&self->buf);
        self->held = 0;
    }
    Py_RETURN_NONE;
}

static PyMappingMethods words_mapping = {
    .mp_length = (lenfunc)words_len,
    .mp_subscript = (binaryfunc)words_get,
    .mp_ass_subscript = (objobjargproc)words_set,
};

static PyMethodDef words_methods[] = {
    {"release", (PyCFunction)words_release, METH_NOARGS, "Give the buffer back."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject WordsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmbroker._ring_native.Words",
    .tp_basicsize = sizeof(Words),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Aligned shared u64 words: acquire loads, release stores.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)words_init,
    .tp_dealloc = (destructor)words_dealloc,
    .tp_as_mapping = &words_mapping,
    .tp_methods = words_methods,
};

/* ------------------------------------------------------------------ */
/* Producer */

typedef struct {
    Core core;
    unsigned long long w, limit, reserve, low;
    unsigned long long early_wrap, early_wrap_records;
    /* Each slot's cursor page, once Python fetched it, with its attach
     * serial: what rescan reads. */
    Py_buffer cursor[MAX_CONSUMERS];
    uint64_t cursor_serial[MAX_CONSUMERS];
    int cursors_held;
    PyObject *wake;              /* wake(slot) or None */
    int wake_fd[MAX_CONSUMERS];  /* each slot's eventfd when given (set_wake_fds), else -1 */
    int have_wake_fds;
    PyObject *rescan;            /* rescan() -> new limit */
    PyObject *slow_try_send;     /* the reference try_send: raises what we do not word */
    PyObject *slow_send;         /* Sender.send: waits while full */
    PyObject *slow_try_send_many;
    PyObject *slow_send_many;    /* (batch, done, timeout) -> total */
} Producer;

#define P_OBJECTS(X) X(wake) X(rescan) X(slow_try_send) X(slow_send) X(slow_try_send_many) X(slow_send_many)

static int
producer_traverse(Producer *self, visitproc visit, void *arg)
{
#define VISIT(f) Py_VISIT(self->f);
    P_OBJECTS(VISIT)
#undef VISIT
    return 0;
}

static int
producer_clear(Producer *self)
{
#define CLEAR(f) Py_CLEAR(self->f);
    P_OBJECTS(CLEAR)
#undef CLEAR
    return 0;
}

static void
producer_drop_cursor(Producer *self, int slot)
{
    if (self->cursors_held & (1 << slot)) {
        PyBuffer_Release(&self->cursor[slot]);
        self->cursors_held &= ~(1 << slot);
    }
    self->cursor_serial[slot] = 0;
}

static void
producer_drop_cursors(Producer *self)
{
    for (int slot = 0; slot < MAX_CONSUMERS; slot++)
        producer_drop_cursor(self, slot);
}

static void
producer_dealloc(Producer *self)
{
    PyObject_GC_UnTrack(self);
    producer_clear(self);
    producer_drop_cursors(self);
    core_drop_buffers(&self->core);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
producer_init(Producer *self, PyObject *args, PyObject *kwds)
{
    if (core_init(&self->core, args, kwds, 1) < 0)
        return -1;
    self->early_wrap = UINT64_MAX;
    self->early_wrap_records = 4;
#define NONE(f) Py_INCREF(Py_None); Py_XSETREF(self->f, Py_None);
    P_OBJECTS(NONE)
#undef NONE
    return 0;
}

/* After the write index moved: wake the consumers that sleep.  The
 * seq_cst fence is the producer's half of the Dekker handshake (waiting.py):
 * our write-index store must be visible before we load their flags, and a
 * store-load order is exactly what acquire/release does not give. */
static int
producer_after_publish(Producer *p)
{
    atomic_thread_fence(memory_order_seq_cst);
    uint64_t sleeping = load_relaxed(&p->core.buf[B_CONTROL], OFF_SLEEPING);
    if (sleeping == 0)
        return 0;
    if (p->have_wake_fds) {
        for (int slot = 0; slot < MAX_CONSUMERS; slot++) {
            if ((sleeping >> (8 * slot)) & 0xFF)
                eventfd_signal(p->wake_fd[slot]);
        }
        return 0;
    }
    if (p->wake == NULL || p->wake == Py_None)
        return 0;
    for (int slot = 0; slot < MAX_CONSUMERS; slot++) {
        if ((sleeping >> (8 * slot)) & 0xFF) {
            PyObject *r = PyObject_CallFunction(CBI(p->wake), "i", slot);
            if (r == NULL)
                return -1;
            Py_DECREF(r);
        }
    }
    return 0;
}

static inline void
producer_reserve_to(Producer *p, uint64_t end)
{
    if (end > p->reserve) {
        store_relaxed(&p->core.buf[B_INDEX], OFF_RESERVE, end);
        /* The reserve index must be visible before any byte we write
         * under it (a consumer checks it after copying). */
        atomic_thread_fence(memory_order_release);
        p->reserve = end;
    }
}

static int
producer_publish(Producer *p, uint64_t w)
{
    if (p->core.closed)
        return closed_under_us();
    if (w < p->w) {  /* consumers treat a shrinking index as corruption */
        PyErr_Format(PyExc_AssertionError, "write index would go back from %llu to %llu", p->w,
                     (unsigned long long)w);
        return -1;
    }
    store_release(&p->core.buf[B_INDEX], OFF_WRITE, w);
    p->w = w;
    return producer_after_publish(p);
}

/* ring.py's rescan when every member's cursor page is at hand: 1 with
 * p->limit updated, 0 when Python must do it (a page to fetch, a start
 * index to use, membership changing under us again and again). */
static int
producer_rescan(Producer *p)
{
    const Py_buffer *ix = &p->core.buf[B_INDEX];
    uint64_t w = p->w, size = p->core.data_size, floor = w > size ? w - size : 0;
    for (int attempt = 0; attempt < 4; attempt++) {
        uint64_t generation = load_acquire(ix, OFF_MEMBER_GEN);
        uint64_t members = load_acquire(ix, OFF_MEMBERS);
        int any = 0;
        uint64_t low = 0;
        for (int slot = 0; slot < MAX_CONSUMERS; slot++) {
            if (!((members >> (8 * slot)) & 0xFF))
                continue;
            if (!(p->cursors_held & (1 << slot)) ||
                load_acquire(ix, OFF_SLOT_INFO + (size_t)slot * SLOT_INFO_STRIDE) != p->cursor_serial[slot])
                return 0;
            /* Untrusted: clamped into [w - size, w], never used as an offset. */
            uint64_t r = load_acquire(&p->cursor[slot], OFF_CURSOR);
            r = r < floor ? floor : (r > w ? w : r);
            if (!any || r < low)
                low = r;
            any = 1;
        }
        if (any && low > p->low) {
            p->low = low;
            store_release(ix, OFF_LOW, low);
        }
        /* Store LOW, then re-load the generation (the broker does the
         * mirror image when a consumer attaches): a store-load order. */
        atomic_thread_fence(memory_order_seq_cst);
        if (load_acquire(ix, OFF_MEMBER_GEN) != generation)
            continue;
        p->limit = (any ? low : p->low) + size;
        return 1;
    }
    return 0;
}

/* 1 if a record ending at `end` fits, after a rescan if needed; 0 if not,
 * -1 on error. */
static int
producer_fits(Producer *p, uint64_t end)
{
    if (end <= p->limit)
        return 1;
    if (producer_rescan(p))
        return end <= p->limit;
    PyObject *r = PyObject_CallNoArgs(CBI(p->rescan));
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return end <= p->limit;
}

static int
producer_pad(Producer *p)
{
    uint64_t w = p->w, pos = w % p->core.data_size, pad = p->core.data_size - pos;
    /* A PAD's header must fit before the end, as producer_write checks for
     * records: w is ours and kept aligned, but a bad one must not write past
     * the data area. */
    if (pad < RECORD_HEADER || pad - RECORD_HEADER > UINT32_MAX) {
        PyErr_SetString(PyExc_RuntimeError, "ring producer index out of step with the data area");
        return -1;
    }
    producer_reserve_to(p, w + pad);
    write_header((char *)p->core.buf[B_DATA].buf + pos, (uint32_t)(pad - RECORD_HEADER), KIND_PAD);
    return producer_publish(p, w + pad);
}

/* Where a record of `rec` bytes goes: its offset, -1 when full, -2 on error.
 * Publishes a PAD first when the record would cross the end (ring.py's _room). */
static int64_t
producer_room(Producer *p, uint64_t rec)
{
    uint64_t size = p->core.data_size, w = p->w, pos = w % size;
    int ok;
    if (pos + rec > size) {
        if ((ok = producer_fits(p, w + (size - pos))) <= 0)
            return ok - 1;
        if (producer_pad(p) < 0)
            return -2;
        w = p->w;
        pos = 0;
    }
    if ((ok = producer_fits(p, w + rec)) <= 0)
        return ok - 1;
    return (int64_t)pos;
}

enum { SENT = 1, FULL = 0, ASK_PYTHON = 2, FAILED = -1 };

static int
producer_write(Producer *p, const char *src, uint64_t n)
{
    Core *c = &p->core;
    if (load_relaxed(&c->buf[B_HEADER], OFF_REVOKED) || n > c->max_message)
        return ASK_PYTHON;
    uint64_t size = c->data_size, rec = RECORD_HEADER + ALIGN8(n);
    if (n >= p->early_wrap) {
        /* ring.py's _wrap_early: large records go back to the start of the
         * area once the ring holds early_wrap_records of them. */
        uint64_t w = p->w, pos = w % size;
        if (pos >= p->early_wrap_records * rec && pos != 0) {
            int ok = producer_fits(p, w + (size - pos) + rec);
            if (ok < 0)
                return FAILED;
            if (ok && producer_pad(p) < 0)
                return FAILED;
        }
    }
    int64_t at = producer_room(p, rec);
    if (at == -2)
        return FAILED;
    if (at < 0)
        return FULL;
    uint64_t pos = (uint64_t)at, end = p->w + rec;
    if (pos + rec > size)  /* cannot happen; never write past the area */
        return ASK_PYTHON;
    producer_reserve_to(p, end);
    char *dst = (char *)c->buf[B_DATA].buf + pos;
    write_header(dst, (uint32_t)n, KIND_MSG);
    copy(dst + RECORD_HEADER, src, n);
    return producer_publish(p, end) < 0 ? FAILED : SENT;
}

/* One message from a Python object: SENT, FULL, ASK_PYTHON or FAILED. */
static int
producer_send_object(Producer *p, PyObject *data)
{
    if (PyBytes_CheckExact(data))
        return producer_write(p, PyBytes_AS_STRING(data), (uint64_t)PyBytes_GET_SIZE(data));
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
        return FAILED;
    int r = producer_write(p, view.buf, (uint64_t)view.len);
    PyBuffer_Release(&view);
    return r;
}

static int
producer_enter(Producer *p)
{
    return core_enter(&p->core);
}

PyDoc_STRVAR(producer_try_send_doc, "try_send(data) -> bool: copy one message in; False if the ring is full.");

static PyObject *
producer_try_send(Producer *p, PyObject *data)
{
    int e = producer_enter(p);
    if (e < 0)
        return NULL;
    if (e > 0)
        return PyObject_CallOneArg(CB(p->slow_try_send), data);
    int r = producer_send_object(p, data);
    core_leave(&p->core);
    switch (r) {
    case SENT: Py_RETURN_TRUE;
    case FULL: Py_RETURN_FALSE;
    case ASK_PYTHON: return PyObject_CallOneArg(CB(p->slow_try_send), data);
    default: return NULL;
    }
}

PyDoc_STRVAR(producer_send_doc,
             "Copy ``data`` into the ring as one message; block while full.\n\n"
             "        ``timeout=0`` never blocks.  Raises Full on timeout, MessageTooLarge,\n"
             "        ChannelRevoked.");

static PyObject *
producer_send(Producer *p, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *timeout;
    if (parse_timeout("send", args, nargs, kwnames, 1, &timeout) < 0)
        return NULL;
    int e = producer_enter(p);
    if (e < 0)
        return NULL;
    int r = ASK_PYTHON;
    if (e == 0) {
        r = producer_send_object(p, args[0]);
        if (r == FULL) {
            /* Poll the consumers' cursors for a moment before Python
             * waits; stop as soon as a rescan needs Python. */
            int64_t end = now_ns() + SPIN_NS;
            uint64_t limit = p->limit;
            for (unsigned i = 1; r == FULL; i++) {
                cpu_relax();
                if (!producer_rescan(p) || ((i & 3) == 0 && now_ns() > end))
                    break;
                if (p->limit != limit) {
                    limit = p->limit;
                    r = producer_send_object(p, args[0]);
                }
            }
        }
        core_leave(&p->core);
    }
    if (r == SENT)
        Py_RETURN_NONE;
    if (r == FAILED)
        return NULL;
    return PyObject_CallFunctionObjArgs(CB(p->slow_send), args[0], timeout, NULL);
}

/* As many of items[start:] as fit; sets *stop to ASK_PYTHON when an item
 * needs the reference path (too large, revoked), FULL when full. */
static Py_ssize_t
producer_many(Producer *p, PyObject *items, Py_ssize_t start, int *stop)
{
    Core *c = &p->core;
    uint64_t size = c->data_size, max_message = c->max_message;
    uint64_t w = p->w, pos = w % size, publish_at = w + SPAN, reserved = p->reserve;
    Py_ssize_t count = 0;
    *stop = SENT;
    if (load_relaxed(&c->buf[B_HEADER], OFF_REVOKED)) {
        *stop = ASK_PYTHON;
        return 0;
    }
    char *area = c->buf[B_DATA].buf;
    for (Py_ssize_t i = start; i < PyList_GET_SIZE(items); i++) {
        PyObject *item = PyList_GET_ITEM(items, i);
        Py_buffer view;
        const char *src;
        uint64_t n;
        int have_view = 0;
        Py_INCREF(item);
        if (PyBytes_CheckExact(item)) {
            src = PyBytes_AS_STRING(item);
            n = (uint64_t)PyBytes_GET_SIZE(item);
        } else {
            if (PyObject_GetBuffer(item, &view, PyBUF_SIMPLE) < 0) {
                Py_DECREF(item);
                *stop = FAILED;
                break;
            }
            have_view = 1;
            src = view.buf;
            n = (uint64_t)view.len;
        }
        uint64_t rec = RECORD_HEADER + ALIGN8(n);
        int again = 0;
        if (n > max_message) {
            *stop = ASK_PYTHON;
        } else if (w + rec > p->limit || pos + rec > size) {
            /* Publish what we have, then the slow part of _room: a PAD, a
             * rescan, maybe "full". */
            if (w != p->w && producer_publish(p, w) < 0) {
                *stop = FAILED;
            } else {
                int64_t at = producer_room(p, rec);
                w = p->w;  /* a PAD may have been published: never go back before it */
                if (at == -2)
                    *stop = FAILED;
                else if (at < 0)
                    *stop = FULL;
                else {
                    pos = (uint64_t)at;
                    reserved = p->reserve;
                    again = 1;
                }
            }
        } else {
            again = 1;
        }
        if (again && pos + rec <= size) {
            if (w + rec > reserved) {
                /* One reserve store per span, never past what we may write. */
                uint64_t upto = publish_at < p->limit ? publish_at : p->limit;
                reserved = w + rec > upto ? w + rec : upto;
                producer_reserve_to(p, reserved);
            }
            write_header(area + pos, (uint32_t)n, KIND_MSG);
            copy(area + pos + RECORD_HEADER, src, n);
            pos += rec;
            w += rec;
            count++;
        } else if (again) {
            *stop = ASK_PYTHON;  /* cannot happen: never write past the area */
        }
        if (have_view)
            PyBuffer_Release(&view);
        Py_DECREF(item);
        if (*stop != SENT)
            break;
        if (w >= publish_at) {
            if (producer_publish(p, w) < 0) {
                *stop = FAILED;
                break;
            }
            publish_at = w + SPAN;
        }
    }
    /* Every item before the one that stopped us is delivered. */
    if (w != p->w) {
        PyObject *exc_type, *exc, *tb;
        PyErr_Fetch(&exc_type, &exc, &tb);
        if (producer_publish(p, w) < 0) {
            Py_XDECREF(exc_type);
            Py_XDECREF(exc);
            Py_XDECREF(tb);
            *stop = FAILED;
        } else {
            PyErr_Restore(exc_type, exc, tb);
        }
    }
    return count;
}

PyDoc_STRVAR(producer_try_send_many_doc, "try_send_many(items: list, start) -> count sent (from start) before the ring filled.");

static PyObject *
producer_try_send_many(Producer *p, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyList_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "try_send_many(items: list, start: int)");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    if (start == -1 && PyErr_Occurred())
        return NULL;
    int e = producer_enter(p);
    if (e < 0)
        return NULL;
    if (e > 0)
        return PyObject_CallFunctionObjArgs(CB(p->slow_try_send_many), args[0], args[1], NULL);
    int stop;
    Py_ssize_t count = start < 0 ? 0 : producer_many(p, args[0], start, &stop);
    core_leave(&p->core);
    if (start < 0 || stop == ASK_PYTHON) {
        PyObject *slow = CB(p->slow_try_send_many);
        PyObject *next = PyLong_FromSsize_t((start < 0 ? start : start + count));
        if (next == NULL)
            return NULL;
        PyObject *more = PyObject_CallFunctionObjArgs(slow, args[0], next, NULL);
        Py_DECREF(next);
        if (more == NULL)
            return NULL;
        Py_ssize_t m = PyLong_AsSsize_t(more);
        Py_DECREF(more);
        if (m == -1 && PyErr_Occurred())
            return NULL;
        count += m;
    } else if (stop == FAILED) {
        return NULL;
    }
    return PyLong_FromSsize_t(count);
}

PyDoc_STRVAR(producer_send_many_doc, "Send every item in order, publishing in batches; returns the count.");

static PyObject *
producer_send_many(Producer *p, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *timeout;
    if (parse_timeout("send_many", args, nargs, kwnames, 1, &timeout) < 0)
        return NULL;
    PyObject *slow = CB(p->slow_send_many);  /* checked before anything needs releasing */
    PyObject *batch = PyList_Check(args[0]) ? Py_NewRef(args[0]) : PySequence_List(args[0]);
    if (batch == NULL)
        return NULL;
    int e = producer_enter(p);
    Py_ssize_t count = 0;
    int stop = ASK_PYTHON;
    if (e < 0) {
        Py_DECREF(batch);
        return NULL;
    }
    if (e == 0) {
        count = producer_many(p, batch, 0, &stop);
        core_leave(&p->core);
    }
    PyObject *out;
    if (stop == FAILED)
        out = NULL;
    else if (stop == SENT)
        out = PyLong_FromSsize_t(count);
    else {
        PyObject *done = PyLong_FromSsize_t(count);
        out = done ? PyObject_CallFunctionObjArgs(slow, batch, done, timeout, NULL) : NULL;
        Py_XDECREF(done);
    }
    Py_DECREF(batch);
    return out;
}

static PyMemberDef producer_members[] = {
    {"w", T_ULONGLONG, offsetof(Producer, w), 0, "write index (private state)"},
    {"limit", T_ULONGLONG, offsetof(Producer, limit), 0, "cached bound from the last rescan"},
    {"reserve", T_ULONGLONG, offsetof(Producer, reserve), 0, "last reserve index stored"},
    {"low", T_ULONGLONG, offsetof(Producer, low), 0, "last LOW stored"},
    {"early_wrap", T_ULONGLONG, offsetof(Producer, early_wrap), 0, "see RingProducer.early_wrap"},
    {"early_wrap_records", T_ULONGLONG, offsetof(Producer, early_wrap_records), 0, ""},
    {"data_size", T_ULONGLONG, offsetof(Producer, core.data_size), READONLY, ""},
    {"max_message", T_ULONGLONG, offsetof(Producer, core.max_message), READONLY, ""},
    {"wake", T_OBJECT_EX, offsetof(Producer, wake), 0, ""},
    {"rescan", T_OBJECT_EX, offsetof(Producer, rescan), 0, ""},
    {"slow_try_send", T_OBJECT_EX, offsetof(Producer, slow_try_send), 0, ""},
    {"slow_send", T_OBJECT_EX, offsetof(Producer, slow_send), 0, ""},
    {"slow_try_send_many", T_OBJECT_EX, offsetof(Producer, slow_try_send_many), 0, ""},
    {"slow_send_many", T_OBJECT_EX, offsetof(Producer, slow_send_many), 0, ""},
    {NULL, 0, 0, 0, NULL},
};

static PyObject *
producer_after_publish_py(Producer *p, PyObject *Py_UNUSED(ignored))
{
    if (!(p->core.held & (1 << B_CONTROL)))
        Py_RETURN_NONE;
    if (producer_after_publish(p) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
producer_set_cursor(Producer *p, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "set_cursor(slot, serial, page or None)");
        return NULL;
    }
    long slot = PyLong_AsLong(args[0]);
    if (slot == -1 && PyErr_Occurred())
        return NULL;
    unsigned long long serial = PyLong_AsUnsignedLongLong(args[1]);
    if (serial == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (slot < 0 || slot >= MAX_CONSUMERS) {
        PyErr_SetString(PyExc_ValueError, "consumer slot out of range");
        return NULL;
    }
    /* Under the GIL, like every rescan, which checks cursors_held. */
    producer_drop_cursor(p, (int)slot);
    if (args[2] == Py_None)
        Py_RETURN_NONE;
    Py_buffer *b = &p->cursor[slot];
    if (PyObject_GetBuffer(args[2], b, PyBUF_SIMPLE) < 0)
        return NULL;
    if (b->len < 8 || ((uintptr_t)b->buf & 7) != 0) {
        PyBuffer_Release(b);
        PyErr_SetString(PyExc_ValueError, "a cursor page must hold an aligned word");
        return NULL;
    }
    p->cursors_held |= 1 << slot;
    p->cursor_serial[slot] = serial;
    Py_RETURN_NONE;
}

static PyObject *
producer_set_wake_fds(Producer *p, PyObject *fds)
{
    PyObject *seq = PySequence_Fast(fds, "set_wake_fds() takes a sequence of fds");
    if (seq == NULL)
        return NULL;
    if (PySequence_Fast_GET_SIZE(seq) != MAX_CONSUMERS) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "set_wake_fds() takes one fd per consumer slot");
        return NULL;
    }
    int fd[MAX_CONSUMERS];
    for (int i = 0; i < MAX_CONSUMERS; i++) {
        long v = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        if (v == -1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return NULL;
        }
        if (v < 0 || v > INT32_MAX) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_ValueError, "not a file descriptor");
            return NULL;
        }
        fd[i] = (int)v;
    }
    Py_DECREF(seq);
    memcpy(p->wake_fd, fd, sizeof fd);
    p->have_wake_fds = 1;
    Py_RETURN_NONE;
}

/* The waiting producer's sleep (waiting.py's wait does the flag and the
 * re-check around it): one call instead of poll object, poll and drain. */
static int
as_fd(PyObject *obj)
{
    long v = PyLong_AsLong(obj);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < 0 || v > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "not a file descriptor");
        return -1;
    }
    return (int)v;
}

static PyObject *
py_sleep(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "sleep(fd, timeout)");
        return NULL;
    }
    int fd = as_fd(args[0]);
    if (fd < 0)
        return NULL;
    int ms = -1;
    if (args[1] != Py_None) {
        double t = PyFloat_AsDouble(args[1]);
        if (t == -1.0 && PyErr_Occurred())
            return NULL;
        if (isnan(t)) {
            /* (int)NaN is undefined (INT_MIN here): poll() would wait forever. */
            PyErr_SetString(PyExc_ValueError, "timeout must be a number of seconds, not NaN");
            return NULL;
        }
        /* Rounded up, as _sys/eventfd.wait: never wake before the deadline. */
        double m = t * 1000.0 + 0.999;
        ms = m <= 0 ? 0 : (m >= (double)INT32_MAX ? INT32_MAX : (int)m);
    }
    int interrupted;
    Py_BEGIN_ALLOW_THREADS
    interrupted = eventfd_sleep(fd, ms);
    Py_END_ALLOW_THREADS
    if (interrupted && PyErr_CheckSignals() < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
producer_release(Producer *p, PyObject *Py_UNUSED(ignored))
{
    producer_drop_cursors(p);
    return core_release(&p->core, NULL);
}

static PyMethodDef producer_methods[] = {
    {"set_wake_fds", (PyCFunction)producer_set_wake_fds, METH_O,
     "set_wake_fds(fds): signal slot k's eventfd fds[k] directly instead of calling wake(k)."},
    {"set_cursor", (PyCFunction)(void (*)(void))producer_set_cursor, METH_FASTCALL,
     "set_cursor(slot, serial, page): the cursor page rescans read for slot (None: none)."},
    {"try_send", (PyCFunction)producer_try_send, METH_O, producer_try_send_doc},
    {"send", (PyCFunction)(void (*)(void))producer_send, METH_FASTCALL | METH_KEYWORDS, producer_send_doc},
    {"try_send_many", (PyCFunction)(void (*)(void))producer_try_send_many, METH_FASTCALL, producer_try_send_many_doc},
    {"send_many", (PyCFunction)(void (*)(void))producer_send_many, METH_FASTCALL | METH_KEYWORDS, producer_send_many_doc},
    {"after_publish", (PyCFunction)producer_after_publish_py, METH_NOARGS, "Fence, then wake sleeping consumers."},
    {"release", (PyCFunction)producer_release, METH_NOARGS, "Give the buffers back (once no call uses them)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ProducerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmbroker._ring_native.Producer",
    .tp_basicsize = sizeof(Producer),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A ring producer's hot path (see _ring_native.c).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)producer_init,
    .tp_dealloc = (destructor)producer_dealloc,
    .tp_traverse = (traverseproc)producer_traverse,
    .tp_clear = (inquiry)producer_clear,
    .tp_members = producer_members,
    .tp_methods = producer_methods,
};

/* ------------------------------------------------------------------ */
/* Consumer */

typedef struct {
    Core core;
    unsigned long long r, wc;
    int slot;
    PyObject *wake_producer;
    int wake_fd;                  /* the producer's eventfd when given, else -1 */
    PyObject *slow_take;          /* the reference take(into): errors, "nothing" */
    PyObject *slow_recv;          /* Receiver.recv(timeout): waits */
    PyObject *slow_recv_into;
    PyObject *slow_try_recv_many;
    PyObject *slow_recv_many;
    PyObject *slow_has_data;      /* the reference has_data: raises for a bad write index */
} Consumer;

#define C_OBJECTS(X) X(wake_producer) X(slow_take) X(slow_recv) X(slow_recv_into) \
    X(slow_try_recv_many) X(slow_recv_many) X(slow_has_data)

static int
consumer_traverse(Consumer *self, visitproc visit, void *arg)
{
#define VISIT(f) Py_VISIT(self->f);
    C_OBJECTS(VISIT)
#undef VISIT
    return 0;
}

static int
consumer_clear(Consumer *self)
{
#define CLEAR(f) Py_CLEAR(self->f);
    C_OBJECTS(CLEAR)
#undef CLEAR
    return 0;
}

static void
consumer_dealloc(Consumer *self)
{
    PyObject_GC_UnTrack(self);
    consumer_clear(self);
    core_drop_buffers(&self->core);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
consumer_init(Consumer *self, PyObject *args, PyObject *kwds)
{
    if (core_init(&self->core, args, kwds, 0) < 0)
        return -1;
    self->slot = -1;
    self->wake_fd = -1;
#define NONE(f) Py_INCREF(Py_None); Py_XSETREF(self->f, Py_None);
    C_OBJECTS(NONE)
#undef NONE
    return 0;
}

/* The cursor page and slot come second: RingConsumer checks them after the
 * shared pages.  Until then every call takes the reference path. */
static PyObject *
consumer_attach_cursor(Consumer *self, PyObject *const *args, Py_ssize_t nargs)
{
    Core *c = &self->core;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "attach_cursor(cursor, slot)");
        return NULL;
    }
    long slot = PyLong_AsLong(args[1]);
    if (slot == -1 && PyErr_Occurred())
        return NULL;
    if (slot < 0 || slot >= MAX_CONSUMERS) {
        PyErr_SetString(PyExc_ValueError, "consumer slot out of range");
        return NULL;
    }
    if (c->closed || !(c->held & (1 << B_INDEX)) || (c->held & (1 << B_CURSOR))) {
        PyErr_SetString(PyExc_RuntimeError, "attach_cursor() once, on an open consumer");
        return NULL;
    }
    if (core_get(c, B_CURSOR, args[0], 1, 8, "cursor page") < 0) {
        if (c->held & (1 << B_CURSOR)) {
            PyBuffer_Release(&c->buf[B_CURSOR]);
            c->held &= ~(1 << B_CURSOR);
        }
        return NULL;
    }
    self->slot = (int)slot;
    Py_RETURN_NONE;
}

/* Our cursor moved to c->r: publish it (release: the copies we made are
 * done before the producer may reuse the space), then the consumer's half
 * of the producer's Dekker handshake. */
static int
consumer_publish(Consumer *c)
{
    if (c->core.closed)
        return closed_under_us();
    store_release(&c->core.buf[B_CURSOR], OFF_CURSOR, c->r);
    atomic_thread_fence(memory_order_seq_cst);
    if (!load_relaxed(&c->core.buf[B_INDEX], OFF_PRODUCER_WAITING))  /* a peer's word: read once */
        return 0;
    if (c->wake_fd >= 0) {
        eventfd_signal(c->wake_fd);
    } else if (c->wake_producer != Py_None) {
        PyObject *r = PyObject_CallNoArgs(CBI(c->wake_producer));
        if (r == NULL)
            return -1;
        Py_DECREF(r);
    }
    return 0;
}

/* Was everything we copied since index `from` intact?  The acquire fence
 * orders the copy's loads before the loads of the revoked word and the
 * reserve index (a seqlock's read side). */
static inline int
consumer_intact(Consumer *c, uint64_t from)
{
    atomic_thread_fence(memory_order_acquire);
    /* Closed by another thread while a large copy ran without the GIL: the
     * mapping is now private zero pages, under which the revoked word and
     * the reserve index read as zeros too, so they cannot tell; this can. */
    if (c->core.closed)
        return 0;
    if (load_relaxed(&c->core.buf[B_HEADER], OFF_REVOKED))
        return 0;
    return load_relaxed(&c->core.buf[B_INDEX], OFF_RESERVE) <= from + c->core.data_size;
}

enum { REC_MSG = 1, REC_NONE = 0, REC_ASK = 2, REC_FAILED = -1 };

/* The next message record at c->r: its offset in the area and its length.
 * Refreshes the write index when we caught up, steps over PADs.  REC_ASK
 * when the reference path must decide (an error with its message).
 * *from is the oldest index whose copy is not yet checked: stepping over a
 * PAD publishes the cursor, so it checks everything copied since *from
 * first, and moves *from past the PAD. */
static int
consumer_next(Consumer *c, uint64_t *from, uint64_t *pos_out, uint64_t *n_out)
{
    Core *k = &c->core;
    uint64_t size = k->data_size;
    const char *area = k->buf[B_DATA].buf;
    for (;;) {
        uint64_t r = c->r;
        if (r == c->wc) {
            uint64_t w = load_acquire(&k->buf[B_INDEX], OFF_WRITE);
            if (w < r || w % 8 || w - r > size)
                return REC_ASK;
            c->wc = w;
            if (w == r)
                return REC_NONE;
        }
        uint64_t pos = r % size;
        if (pos + RECORD_HEADER > size)
            return REC_ASK;
        uint32_t n, kind;
        read_header(area + pos, &n, &kind);
        uint64_t rec = RECORD_HEADER + ALIGN8(n);
        if (kind == KIND_MSG) {
            if (n > k->max_message || pos + rec > size || r + rec > c->wc)
                return REC_ASK;
            *pos_out = pos + RECORD_HEADER;
            *n_out = n;
            return REC_MSG;
        }
        if (kind == KIND_PAD && n == size - pos - RECORD_HEADER && r + (size - pos) <= c->wc) {
            /* A PAD of a later lap sits exactly where ours did: only step
             * over it if the producer cannot have lapped us. */
            if (!consumer_intact(c, *from))
                return REC_ASK;
            c->r = r + (size - pos);
            if (consumer_publish(c) < 0)
                return REC_FAILED;
            *from = c->r;
            continue;
        }
        return REC_ASK;
    }
}

/* Nothing queued (and, once checked by the caller, not revoked). */
#define ASK_EMPTY 2

/* Poll the write index (and the revoked word) for up to SPIN_NS; 1 if
 * either moved. */
static int
consumer_spin(Consumer *c)
{
    const Core *k = &c->core;
    int64_t end = now_ns() + SPIN_NS;
    for (unsigned i = 1;; i++) {
        if (load_acquire(&k->buf[B_INDEX], OFF_WRITE) != c->r || load_relaxed(&k->buf[B_HEADER], OFF_REVOKED))
            return 1;
        cpu_relax();
        if ((i & 3) == 0 && now_ns() > end)
            return 0;
    }
}

/* take(): a new bytes, or with `into` the length copied there.  NULL and
 * *ask set when the reference path must handle it (errors: 1) or nothing
 * is queued (ASK_EMPTY). */
static PyObject *
consumer_take(Consumer *c, Py_buffer *into, int *ask)
{
    uint64_t pos, n, from = c->r;
    *ask = 0;
    int found = consumer_next(c, &from, &pos, &n);
    if (found == REC_FAILED)
        return NULL;
    if (found == REC_NONE) {
        /* Revoked: the reference path says so. */
        *ask = load_relaxed(&c->core.buf[B_HEADER], OFF_REVOKED) ? 1 : ASK_EMPTY;
        return NULL;
    }
    if (found != REC_MSG || (into != NULL && (uint64_t)into->len < n)) {
        *ask = 1;
        return NULL;
    }
    const char *src = (const char *)c->core.buf[B_DATA].buf + pos;
    uint64_t r = c->r;  /* the record's index, as it was when we chose it */
    PyObject *out;
    if (into == NULL) {
        out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n);
        if (out == NULL)
            return NULL;
        copy(PyBytes_AS_STRING(out), src, n);
    } else {
        copy(into->buf, src, n);
        out = NULL;
    }
    /* Copy first, then check: a record that raced with a wipe or an
     * overwrite is never returned (the reference path then raises). */
    if (!consumer_intact(c, r)) {
        Py_XDECREF(out);
        *ask = 1;
        return NULL;
    }
    if (out == NULL && (out = PyLong_FromUnsignedLongLong(n)) == NULL)
        return NULL;
    c->r = r + RECORD_HEADER + ALIGN8(n);
    if (consumer_publish(c) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

static PyObject *
consumer_take_obj(Consumer *c, PyObject *into_obj, int *ask, int spin)
{
    int e = (c->core.held & (1 << B_CURSOR)) ? core_enter(&c->core) : 1;
    *ask = 0;
    if (e < 0)
        return NULL;
    if (e > 0) {
        *ask = 1;
        return NULL;
    }
    PyObject *out;
    if (into_obj == Py_None) {
        out = consumer_take(c, NULL, ask);
        if (out == NULL && *ask == ASK_EMPTY && spin && consumer_spin(c))
            out = consumer_take(c, NULL, ask);
    } else {
        Py_buffer into;
        if (PyObject_GetBuffer(into_obj, &into, PyBUF_WRITABLE) < 0) {
            /* The reference path raises what it raises for such a buffer. */
            PyErr_Clear();
            *ask = 1;
            core_leave(&c->core);
            return NULL;
        }
        out = consumer_take(c, &into, ask);
        if (out == NULL && *ask == ASK_EMPTY && spin && consumer_spin(c))
            out = consumer_take(c, &into, ask);
        PyBuffer_Release(&into);
    }
    core_leave(&c->core);
    return out;
}

PyDoc_STRVAR(consumer_take_doc, "take(into=None): the next message (bytes), or its length copied into `into`; None if none.");

static PyObject *
consumer_take_py(Consumer *c, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "take(into=None)");
        return NULL;
    }
    PyObject *into = nargs ? args[0] : Py_None;
    int ask;
    PyObject *out = consumer_take_obj(c, into, &ask, 0);
    if (out == NULL && ask == ASK_EMPTY)
        Py_RETURN_NONE;  /* what the reference returns, without asking it */
    if (out == NULL && ask)
        return PyObject_CallOneArg(CB(c->slow_take), into);
    return out;
}

PyDoc_STRVAR(consumer_recv_doc, "The next message; raises Empty after ``timeout`` seconds (None waits forever).");

static PyObject *
consumer_recv(Consumer *c, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *timeout;
    if (parse_timeout("recv", args, nargs, kwnames, 0, &timeout) < 0)
        return NULL;
    int ask;
    PyObject *out = consumer_take_obj(c, Py_None, &ask, 1);
    if (out == NULL && ask)
        return PyObject_CallOneArg(CB(c->slow_recv), timeout);
    return out;
}

PyDoc_STRVAR(consumer_recv_into_doc, "Copy the next message into ``buffer``; returns its length.");

static PyObject *
consumer_recv_into(Consumer *c, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *timeout;
    if (parse_timeout("recv_into", args, nargs, kwnames, 1, &timeout) < 0)
        return NULL;
    int ask;
    PyObject *out = consumer_take_obj(c, args[0], &ask, 1);
    if (out == NULL && ask)
        return PyObject_CallFunctionObjArgs(CB(c->slow_recv_into), args[0], timeout, NULL);
    return out;
}

/* Up to max_count messages; an empty list when the reference path must
 * decide (nothing queued, errors), or NULL on error. */
static PyObject *
consumer_many(Consumer *c, Py_ssize_t max_count, int *empty)
{
    *empty = 0;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    uint64_t from = c->r;   /* the first index not yet checked and published */
    const char *area = c->core.buf[B_DATA].buf;
    while (PyList_GET_SIZE(out) < max_count) {
        uint64_t pos, n;
        int found = consumer_next(c, &from, &pos, &n);  /* may step over (and publish) a PAD */
        if (found == REC_FAILED)
            goto fail;
        if (found != REC_MSG) {
            *empty = found == REC_NONE && PyList_GET_SIZE(out) == 0 &&
                     !load_relaxed(&c->core.buf[B_HEADER], OFF_REVOKED);
            break;
        }
        PyObject *msg = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n);
        if (msg == NULL)
            goto fail;
        copy(PyBytes_AS_STRING(msg), area + pos, n);
        if (PyList_Append(out, msg) < 0) {
            Py_DECREF(msg);
            goto fail;
        }
        Py_DECREF(msg);
        c->r += RECORD_HEADER + ALIGN8(n);
        if (c->r - from >= SPAN) {
            /* Hand each span back to the producer while we copy on (a big
             * record at once); check it first. */
            if (!consumer_intact(c, from))
                goto lapped;
            if (consumer_publish(c) < 0)
                goto fail;
            from = c->r;
        }
    }
    if (c->r != from) {
        if (!consumer_intact(c, from))
            goto lapped;
        if (consumer_publish(c) < 0)
            goto fail;
    }
    return out;
lapped:
    /* What we copied since `from` may be torn: return nothing of it, and
     * let the reference path, which re-reads at the same cursor, raise. */
    c->r = from;
    Py_SETREF(out, PyList_New(0));
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

static PyObject *
consumer_many_obj(Consumer *c, PyObject *count_obj, Py_ssize_t *max_count, int *empty, int spin)
{
    *empty = 0;
    *max_count = PyLong_AsSsize_t(count_obj);
    if (*max_count == -1 && PyErr_Occurred())
        return NULL;
    /* Before core_enter: returning between it and core_leave would leave
     * the endpoint marked busy for good. */
    if (*max_count < 1)
        return PyList_New(0);
    int e = (c->core.held & (1 << B_CURSOR)) ? core_enter(&c->core) : 1;
    if (e < 0)
        return NULL;
    if (e > 0)
        return PyList_New(0);
    PyObject *out = consumer_many(c, *max_count, empty);
    if (out != NULL && *empty && spin && consumer_spin(c)) {
        Py_DECREF(out);
        out = consumer_many(c, *max_count, empty);
    }
    core_leave(&c->core);
    return out;
}

PyDoc_STRVAR(consumer_try_recv_many_doc, "try_recv_many(max_count) -> up to max_count messages (maybe none).");

static PyObject *
consumer_try_recv_many(Consumer *c, PyObject *count)
{
    Py_ssize_t max_count;
    int empty;
    PyObject *out = consumer_many_obj(c, count, &max_count, &empty, 0);
    if (out == NULL || PyList_GET_SIZE(out) > 0)
        return out;
    if (empty)
        return out;  /* what the reference returns, without asking it */
    Py_DECREF(out);
    return PyObject_CallOneArg(CB(c->slow_try_recv_many), count);
}

PyDoc_STRVAR(consumer_recv_many_doc,
             "Between 1 and ``max_count`` messages; waits (up to timeout) only for the first.");

static PyObject *
consumer_recv_many(Consumer *c, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *timeout;
    if (parse_timeout("recv_many", args, nargs, kwnames, 1, &timeout) < 0)
        return NULL;
    Py_ssize_t max_count;
    int empty;
    PyObject *out = consumer_many_obj(c, args[0], &max_count, &empty, 1);
    if (out == NULL || PyList_GET_SIZE(out) > 0)
        return out;
    Py_DECREF(out);
    return PyObject_CallFunctionObjArgs(CB(c->slow_recv_many), args[0], timeout, NULL);
}

PyDoc_STRVAR(consumer_has_data_doc, "True if a record (or a revocation) is waiting; raises on a corrupt write index.");

static PyObject *
consumer_has_data(Consumer *c, PyObject *Py_UNUSED(ignored))
{
    Core *k = &c->core;
    if (k->closed || !(k->held & (1 << B_CURSOR)))
        Py_RETURN_TRUE;  /* let the caller's next call say what happened */
    if (c->r != c->wc)
        Py_RETURN_TRUE;
    uint64_t w = load_acquire(&k->buf[B_INDEX], OFF_WRITE);
    if (w < c->r || w % 8 || w - c->r > k->data_size)
        return PyObject_CallNoArgs(CB(c->slow_has_data));
    c->wc = w;
    if (w != c->r || load_relaxed(&k->buf[B_HEADER], OFF_REVOKED))
        Py_RETURN_TRUE;
    Py_RETURN_FALSE;
}

static PyObject *
consumer_set_sleeping(Consumer *c, PyObject *value)
{
    long v = PyLong_AsLong(value);
    if (v == -1 && PyErr_Occurred())
        return NULL;
    if (!(c->core.held & (1 << B_CURSOR)))
        Py_RETURN_NONE;
    /* Our own byte of the sleeping word; the producer loads the whole word.
     * The seq_cst fence that must follow is the waiter's (waiting.py). */
    __atomic_store_n((uint8_t *)c->core.buf[B_CONTROL].buf + OFF_SLEEPING + c->slot, (uint8_t)(v != 0),
                     __ATOMIC_RELAXED);
    Py_RETURN_NONE;
}

static PyObject *
consumer_publish_py(Consumer *c, PyObject *Py_UNUSED(ignored))
{
    if (!(c->core.held & (1 << B_CURSOR)))
        Py_RETURN_NONE;
    if (consumer_publish(c) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyMemberDef consumer_members[] = {
    {"r", T_ULONGLONG, offsetof(Consumer, r), 0, "read index (private state)"},
    {"wc", T_ULONGLONG, offsetof(Consumer, wc), 0, "last write index seen"},
    {"data_size", T_ULONGLONG, offsetof(Consumer, core.data_size), READONLY, ""},
    {"max_message", T_ULONGLONG, offsetof(Consumer, core.max_message), READONLY, ""},
    {"wake_producer", T_OBJECT_EX, offsetof(Consumer, wake_producer), 0, ""},
    {"wake_fd", T_INT, offsetof(Consumer, wake_fd), 0, "the producer's eventfd, signalled directly (-1: call wake_producer)"},
    {"slow_take", T_OBJECT_EX, offsetof(Consumer, slow_take), 0, ""},
    {"slow_recv", T_OBJECT_EX, offsetof(Consumer, slow_recv), 0, ""},
    {"slow_recv_into", T_OBJECT_EX, offsetof(Consumer, slow_recv_into), 0, ""},
    {"slow_try_recv_many", T_OBJECT_EX, offsetof(Consumer, slow_try_recv_many), 0, ""},
    {"slow_recv_many", T_OBJECT_EX, offsetof(Consumer, slow_recv_many), 0, ""},
    {"slow_has_data", T_OBJECT_EX, offsetof(Consumer, slow_has_data), 0, ""},
    {NULL, 0, 0, 0, NULL},
};

static PyMethodDef consumer_methods[] = {
    {"attach_cursor", (PyCFunction)(void (*)(void))consumer_attach_cursor, METH_FASTCALL, "attach_cursor(cursor, slot)"},
    {"take", (PyCFunction)(void (*)(void))consumer_take_py, METH_FASTCALL, consumer_take_doc},
    {"recv", (PyCFunction)(void (*)(void))consumer_recv, METH_FASTCALL | METH_KEYWORDS, consumer_recv_doc},
    {"recv_into", (PyCFunction)(void (*)(void))consumer_recv_into, METH_FASTCALL | METH_KEYWORDS, consumer_recv_into_doc},
    {"try_recv_many", (PyCFunction)consumer_try_recv_many, METH_O, consumer_try_recv_many_doc},
    {"recv_many", (PyCFunction)(void (*)(void))consumer_recv_many, METH_FASTCALL | METH_KEYWORDS, consumer_recv_many_doc},
    {"has_data", (PyCFunction)consumer_has_data, METH_NOARGS, consumer_has_data_doc},
    {"set_sleeping", (PyCFunction)consumer_set_sleeping, METH_O, "Store this consumer's sleeping byte."},
    {"publish_cursor", (PyCFunction)consumer_publish_py, METH_NOARGS, "Store the cursor, fence, wake a waiting producer."},
    {"release", (PyCFunction)core_release, METH_NOARGS, "Give the buffers back (once no call uses them)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ConsumerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmbroker._ring_native.Consumer",
    .tp_basicsize = sizeof(Consumer),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A ring consumer's hot path (see _ring_native.c).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)consumer_init,
    .tp_dealloc = (destructor)consumer_dealloc,
    .tp_traverse = (traverseproc)consumer_traverse,
    .tp_clear = (inquiry)consumer_clear,
    .tp_members = consumer_members,
    .tp_methods = consumer_methods,
};

/* ------------------------------------------------------------------ */

static PyObject *
fence(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    /* The store-then-load handshakes (waiting.py, rescan) need a full
     * barrier: acquire/release never orders a store before a later load. */
    atomic_thread_fence(memory_order_seq_cst);
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"fence", fence, METH_NOARGS, "atomic_thread_fence(memory_order_seq_cst)"},
    {"sleep", (PyCFunction)(void (*)(void))py_sleep, METH_FASTCALL,
     "sleep(fd, timeout): poll(2) an eventfd for POLLIN (None: forever), then drain it"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "shmbroker._ring_native",
    .m_doc = "The ring's hot path with C11 atomics (private; see _ring_native.c and docs/ring.md).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__ring_native(void)
{
    if (PyType_Ready(&WordsType) < 0 || PyType_Ready(&ProducerType) < 0 || PyType_Ready(&ConsumerType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL)
        return NULL;
    if (PyModule_AddType(module, &WordsType) < 0 || PyModule_AddType(module, &ProducerType) < 0 ||
        PyModule_AddType(module, &ConsumerType) < 0)
        goto fail;
    struct { const char *name; long value; } constants[] = {
        {"OFF_WRITE", OFF_WRITE}, {"OFF_PRODUCER_WAITING", OFF_PRODUCER_WAITING},
        {"OFF_RESERVE", OFF_RESERVE}, {"OFF_SLEEPING", OFF_SLEEPING}, {"OFF_CURSOR", OFF_CURSOR},
        {"OFF_REVOKED", OFF_REVOKED}, {"RECORD_HEADER", RECORD_HEADER}, {"KIND_MSG", KIND_MSG},
        {"KIND_PAD", KIND_PAD}, {"MAX_CONSUMERS", MAX_CONSUMERS}, {"SPAN", SPAN},
        {"GIL_COPY_MIN", GIL_COPY_MIN},
    };
    for (size_t i = 0; i < sizeof constants / sizeof constants[0]; i++) {
        if (PyModule_AddIntConstant(module, constants[i].name, constants[i].value) < 0)
            goto fail;
    }
    return module;
fail:
    Py_DECREF(module);
    return NULL;
}

/*
 * shmbroker._guard: survive a shared-memory segment truncated under our feet.
 *
 * A posix (shm_open) segment cannot be sealed, and every peer of a posix
 * channel holds a read-write fd of it, so any peer can ftruncate() it.  The
 * next access of ours past the new end raises SIGBUS, usually inside a C
 * memcpy, where Python cannot catch anything: the process dies.
 *
 * The client registers each segment mapping here.  On a SIGBUS whose fault
 * address lies in a registered range, the handler maps private anonymous
 * zero pages over the whole range (MAP_FIXED), stores a non-zero word at the
 * segment header's revoked offset, restores read-only protection for a
 * read-only mapping and returns: the faulting instruction runs again on the
 * zero pages, and every later check of the revoked word reports the segment
 * as revoked.  libwayland-server defends its wl_shm pools the same way.
 *
 * Everything the handler touches is async-signal-safe: a fixed table of
 * slots read with C11 atomics (no locks a faulting thread might hold, no
 * malloc, no Python) and raw system calls.  Faults outside registered ranges
 * go to the handler that was installed before ours, or to the default action
 * (death by SIGBUS, as without us).
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

/* A lock-based atomic could be held by the very thread the signal
 * interrupted: refuse to build rather than deadlock in the handler. */
#if ATOMIC_LLONG_LOCK_FREE != 2 || ATOMIC_POINTER_LOCK_FREE != 2 || ATOMIC_INT_LOCK_FREE != 2
#error "shmbroker._guard needs lock-free 64-bit, pointer and int atomics"
#endif

#ifndef MADV_DONTDUMP
#define MADV_DONTDUMP 16
#endif
#ifndef MLOCK_ONFAULT
#define MLOCK_ONFAULT 1
#endif

/* One slot per mapping.  A process maps one segment per attachment; the
 * client refuses an attachment beyond this rather than map it unguarded. */
#define SLOTS 4096

/* A slot's state word: generation << 2 | status.  The generation grows each
 * time the slot is claimed, so a handler that read a slot's range while it
 * was being recycled notices (its compare-and-swap fails), and a token from
 * an earlier registration never matches a later one. */
enum { FREE = 0, SETUP = 1, ACTIVE = 2, BUSY = 3 };
#define STATUS(s) ((unsigned)((s) & 3u))
#define GEN(s) ((s) >> 2)
#define STATE(gen, status) (((gen) << 2) | (uint64_t)(status))

struct slot {
    _Atomic uint64_t state;
    /* Written only while the slot is SETUP; read by the handler, which
     * re-checks the state word afterwards (a seqlock without a lock). */
    _Atomic uintptr_t start;
    _Atomic size_t length;
    _Atomic size_t revoked_offset;
    _Atomic int writable;
    /* Set once the handler replaced the range; cleared when claimed. */
    _Atomic int faulted;
};

static struct slot slots[SLOTS];

/* The action that was in place when we installed ours.  Written before the
 * sigaction(2) call that makes our handler reachable, read by the handler. */
static struct sigaction previous;
static int installed_once;
static int atfork_registered;

static PyObject *TableFull;

/* Replace [start, start + length) by private zero pages and mark it revoked.
 * Returns 0 if the kernel refused the new mapping (then nothing changed). */
static int
repair(uintptr_t start, size_t length, size_t revoked_offset, int writable)
{
    void *p = mmap((void *)start, length, PROT_READ | PROT_WRITE,
                   MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return 0;
    /* Until it notices the revocation, the application may keep writing
     * secrets into these pages: keep them out of core dumps and swap like
     * the segment they replace (best effort, as for the segment). */
    (void)madvise(p, length, MADV_DONTDUMP);
#ifdef SYS_mlock2
    (void)syscall(SYS_mlock2, p, length, MLOCK_ONFAULT);
#endif
    /* The word every revoked check of the library reads. */
    __atomic_store_n((uint64_t *)(start + revoked_offset), (uint64_t)1, __ATOMIC_RELEASE);
    if (!writable)
        (void)mprotect(p, length, PROT_READ);
    return 1;
}

enum outcome { NOT_HERE, REPAIRED, FAILED };

static enum outcome
handle_in_slot(struct slot *slot, uintptr_t address)
{
    for (;;) {
        uint64_t s = atomic_load_explicit(&slot->state, memory_order_acquire);
        unsigned status = STATUS(s);
        if (status != ACTIVE && status != BUSY)
            return NOT_HERE;
        uintptr_t start = atomic_load_explicit(&slot->start, memory_order_relaxed);
        size_t length = atomic_load_explicit(&slot->length, memory_order_relaxed);
        size_t revoked_offset = atomic_load_explicit(&slot->revoked_offset, memory_order_relaxed);
        int writable = atomic_load_explicit(&slot->writable, memory_order_relaxed);
        int faulted = atomic_load_explicit(&slot->faulted, memory_order_relaxed);
        atomic_thread_fence(memory_order_acquire);
        if (atomic_load_explicit(&slot->state, memory_order_relaxed) != s)
            continue; /* recycled or changed while we read it */
        if (address - start >= length)
            return NOT_HERE;
        if (status == BUSY) {
            /* Another thread faulted in the same range and is replacing it. */
            sched_yield();
            continue;
        }
        if (faulted)
            return REPAIRED; /* already zero pages: the access succeeds when retried */
        uint64_t busy = STATE(GEN(s), BUSY);
        if (!atomic_compare_exchange_strong_explicit(&slot->state, &s, busy, memory_order_acq_rel,
                                                     memory_order_relaxed))
            continue;
        int ok = repair(start, length, revoked_offset, writable);
        if (ok)
            atomic_store_explicit(&slot->faulted, 1, memory_order_relaxed);
        atomic_store_explicit(&slot->state, STATE(GEN(s), ACTIVE), memory_order_release);
        return ok ? REPAIRED : FAILED;
    }
}

static void
chain(int sig, siginfo_t *info, void *context)
{
    void (*plain)(int) = previous.sa_handler;
    /* Signals that do not come back by themselves when we return. */
    int sent = info == NULL || info->si_code <= 0;
#ifdef BUS_MCEERR_AO
    sent = sent || info->si_code == BUS_MCEERR_AO; /* an early warning of a memory error, not a fault */
#endif
    if (plain == SIG_IGN && sent)
        return; /* ignored before us, ignored now */
    if (plain == SIG_DFL || plain == SIG_IGN) {
        /* The default action, as if we had never been here: a fault repeats
         * when we return (the kernel does not let a fault be ignored), a
         * signal someone sent is sent again; SIGBUS stays blocked until we
         * return, so either way the process dies of SIGBUS right after. */
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        sigemptyset(&dfl.sa_mask);
        (void)sigaction(sig, &dfl, NULL);
        if (sent)
            (void)raise(sig);
        return;
    }
    if (previous.sa_flags & SA_SIGINFO)
        previous.sa_sigaction(sig, info, context);
    else
        plain(sig);
}

static void
handler(int sig, siginfo_t *info, void *context)
{
    int saved_errno = errno;
    /* si_code > 0: raised by the kernel for a fault, so si_addr is the
     * faulting address.  kill(), raise() and sigqueue() leave si_code <= 0
     * and the pid and uid of the sender where si_addr would be. */
    if (info != NULL && info->si_code > 0) {
        uintptr_t address = (uintptr_t)info->si_addr;
        for (size_t i = 0; i < SLOTS; i++) {
            enum outcome outcome = handle_in_slot(&slots[i], address);
            if (outcome == REPAIRED) {
                errno = saved_errno;
                return;
            }
            if (outcome == FAILED)
                break; /* could not replace the range: fail as before */
        }
    }
    chain(sig, info, context);
    errno = saved_errno;
}

/* fork() copies the table: a slot whose handler was half-way in another
 * thread stays BUSY in the child, where that thread does not exist.  The
 * fault was real, so finish the repair in the child (it also repeats steps
 * the parent's thread had already done, which is harmless). */
static void
after_fork_in_child(void)
{
    for (size_t i = 0; i < SLOTS; i++) {
        struct slot *slot = &slots[i];
        uint64_t s = atomic_load_explicit(&slot->state, memory_order_acquire);
        if (STATUS(s) != BUSY)
            continue;
        if (repair(atomic_load(&slot->start), atomic_load(&slot->length), atomic_load(&slot->revoked_offset),
                   atomic_load(&slot->writable)))
            atomic_store(&slot->faulted, 1);
        atomic_store_explicit(&slot->state, STATE(GEN(s), ACTIVE), memory_order_release);
    }
}

static int
current_is_ours(int *ours)
{
    struct sigaction current;
    if (sigaction(SIGBUS, NULL, &current) != 0)
        return -1;
    *ours = (current.sa_flags & SA_SIGINFO) != 0 && current.sa_sigaction == handler;
    return 0;
}

PyDoc_STRVAR(install_doc,
"install() -> bool\n\n"
"Make our SIGBUS handler the active one; True if it is.\n\n"
"The first call installs it over whatever is there, which it then chains to for\n"
"faults outside registered ranges.  Later calls install it again only if SIGBUS\n"
"was reset to SIG_DFL or SIG_IGN meanwhile (signal.signal, faulthandler.disable);\n"
"a handler someone else installed over ours is left alone and False returned:\n"
"it may chain back to ours, and chaining to it in turn could loop.");

static PyObject *
guard_install(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(unused))
{
    struct sigaction current;
    if (sigaction(SIGBUS, NULL, &current) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    if ((current.sa_flags & SA_SIGINFO) && current.sa_sigaction == handler)
        Py_RETURN_TRUE;
    if (installed_once && current.sa_handler != SIG_DFL && current.sa_handler != SIG_IGN)
        Py_RETURN_FALSE;
    if (!atfork_registered) {
        int err = pthread_atfork(NULL, NULL, after_fork_in_child);
        if (err != 0) {
            errno = err;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        atfork_registered = 1;
    }
    struct sigaction ours;
    memset(&ours, 0, sizeof ours);
    ours.sa_sigaction = handler;
    sigemptyset(&ours.sa_mask);
    /* SA_ONSTACK: run on an alternate stack where one exists (faulthandler
     * sets one up), as the handler we chain to may expect. */
    ours.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
    previous = current;
    if (sigaction(SIGBUS, &ours, NULL) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    installed_once = 1;
    Py_RETURN_TRUE;
}

PyDoc_STRVAR(active_doc, "active() -> bool\n\nTrue if our handler is the process's SIGBUS handler now.");

static PyObject *
guard_active(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(unused))
{
    int ours;
    if (current_is_ours(&ours) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyBool_FromLong(ours);
}

static int
overlaps(uintptr_t start, size_t length)
{
    for (size_t i = 0; i < SLOTS; i++) {
        uint64_t s = atomic_load_explicit(&slots[i].state, memory_order_acquire);
        if (STATUS(s) != ACTIVE && STATUS(s) != BUSY)
            continue;
        uintptr_t other = atomic_load_explicit(&slots[i].start, memory_order_relaxed);
        size_t other_length = atomic_load_explicit(&slots[i].length, memory_order_relaxed);
        if (start < other + other_length && other < start + length)
            return 1;
    }
    return 0;
}

PyDoc_STRVAR(register_doc,
"register(address, length, revoked_offset, writable) -> int\n\n"
"Guard a shared mapping of whole pages; return a token for unregister().\n"
"On a SIGBUS inside it, the range becomes private zero pages (read-only again\n"
"unless writable) with a non-zero 8-byte word at revoked_offset.\n"
"Raises TableFull when every slot is taken.");

static PyObject *
guard_register(PyObject *Py_UNUSED(module), PyObject *args)
{
    Py_ssize_t address, length, revoked_offset;
    int writable;
    if (!PyArg_ParseTuple(args, "nnnp:register", &address, &length, &revoked_offset, &writable))
        return NULL;
    long page = sysconf(_SC_PAGESIZE);
    if (address <= 0 || length <= 0 || address % page != 0 || length % page != 0
        || (size_t)address + (size_t)length < (size_t)address) {
        PyErr_SetString(PyExc_ValueError, "register() needs a non-empty range of whole pages");
        return NULL;
    }
    if (revoked_offset < 0 || revoked_offset % 8 != 0 || revoked_offset > length - 8) {
        PyErr_SetString(PyExc_ValueError, "the revoked word must be an aligned 8-byte word inside the range");
        return NULL;
    }
    if (overlaps((uintptr_t)address, (size_t)length)) {
        PyErr_SetString(PyExc_ValueError, "this range overlaps one already registered");
        return NULL;
    }
    for (size_t i = 0; i < SLOTS; i++) {
        struct slot *slot = &slots[i];
        uint64_t s = atomic_load_explicit(&slot->state, memory_order_acquire);
        if (STATUS(s) != FREE)
            continue;
        uint64_t gen = GEN(s) + 1;
        if (!atomic_compare_exchange_strong(&slot->state, &s, STATE(gen, SETUP)))
            continue;
        /* A handler that sees any of the stores below must also see SETUP
         * when it re-reads the state word (its acquire fence pairs with this). */
        atomic_thread_fence(memory_order_release);
        atomic_store_explicit(&slot->start, (uintptr_t)address, memory_order_relaxed);
        atomic_store_explicit(&slot->length, (size_t)length, memory_order_relaxed);
        atomic_store_explicit(&slot->revoked_offset, (size_t)revoked_offset, memory_order_relaxed);
        atomic_store_explicit(&slot->writable, writable, memory_order_relaxed);
        atomic_store_explicit(&slot->faulted, 0, memory_order_relaxed);
        atomic_store_explicit(&slot->state, STATE(gen, ACTIVE), memory_order_release);
        /* Tokens fit 64 bits for 2**52 registrations of one slot. */
        return PyLong_FromUnsignedLongLong((unsigned long long)gen * SLOTS + i);
    }
    PyErr_Format(TableFull,
                 "this process already has %d guarded mappings, the most the SIGBUS guard can watch",
                 SLOTS);
    return NULL;
}

/* The slot a token names, or NULL (ValueError set) if it was unregistered. */
static struct slot *
slot_of(PyObject *token, uint64_t *state)
{
    unsigned long long value = PyLong_AsUnsignedLongLong(token);
    if (value == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    struct slot *slot = &slots[value % SLOTS];
    uint64_t gen = value / SLOTS;
    uint64_t s = atomic_load_explicit(&slot->state, memory_order_acquire);
    if (GEN(s) != gen || (STATUS(s) != ACTIVE && STATUS(s) != BUSY)) {
        PyErr_SetString(PyExc_ValueError, "no mapping is registered under this token (unregistered already?)");
        return NULL;
    }
    *state = s;
    return slot;
}

PyDoc_STRVAR(unregister_doc,
"unregister(token) -> bool\n\n"
"Stop guarding a mapping; return whether a fault replaced it.  Call it before\n"
"the range is unmapped (its address may then be reused), after replacing the\n"
"shared pages with private memory: in between, a fault would find no guard.");

static PyObject *
guard_unregister(PyObject *Py_UNUSED(module), PyObject *token)
{
    for (;;) {
        uint64_t s;
        struct slot *slot = slot_of(token, &s);
        if (slot == NULL)
            return NULL;
        if (STATUS(s) == BUSY) {
            /* A handler is replacing the range in another thread; it makes
             * no call that could wait for us, and finishes in a few syscalls. */
            sched_yield();
            continue;
        }
        int faulted = atomic_load_explicit(&slot->faulted, memory_order_relaxed);
        if (atomic_compare_exchange_strong(&slot->state, &s, STATE(GEN(s), FREE)))
            return PyBool_FromLong(faulted);
    }
}

PyDoc_STRVAR(faulted_doc, "faulted(token) -> bool\n\nWhether a SIGBUS replaced this mapping with zero pages.");

static PyObject *
guard_faulted(PyObject *Py_UNUSED(module), PyObject *token)
{
    uint64_t s;
    struct slot *slot = slot_of(token, &s);
    if (slot == NULL)
        return NULL;
    return PyBool_FromLong(atomic_load_explicit(&slot->faulted, memory_order_relaxed));
}

static PyMethodDef methods[] = {
    {"install", guard_install, METH_NOARGS, install_doc},
    {"active", guard_active, METH_NOARGS, active_doc},
    {"register", guard_register, METH_VARARGS, register_doc},
    {"unregister", guard_unregister, METH_O, unregister_doc},
    {"faulted", guard_faulted, METH_O, faulted_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "shmbroker._guard",
    .m_doc = "A SIGBUS handler that turns a truncated segment into revoked zero pages (see _guard.c).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__guard(void)
{
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL)
        return NULL;
    if (TableFull == NULL) {
        TableFull = PyErr_NewExceptionWithDoc("shmbroker._guard.TableFull",
                                              "Every slot of the SIGBUS guard is in use.",
                                              PyExc_RuntimeError, NULL);
        if (TableFull == NULL)
            goto fail;
    }
    Py_INCREF(TableFull);
    if (PyModule_AddObject(module, "TableFull", TableFull) < 0) {
        Py_DECREF(TableFull);
        goto fail;
    }
    if (PyModule_AddIntConstant(module, "SLOTS", SLOTS) < 0)
        goto fail;
    return module;
fail:
    Py_DECREF(module);
    return NULL;
}

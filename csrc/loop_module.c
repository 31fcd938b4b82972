/* kvmgate.engine._engine, part two: the C vCPU run loop (runloop.c) and the audit drain
 * (auditfmt.c) for Python.
 *
 * Loop(engine, fd, run_addr, vcpu, ring=None, keep=None, flags=0, owner=None): one vCPU's
 *   struct kg_loop.  run() calls kg_loop_run with the GIL released (KVM_RUN; MSR exits the
 *   engine answers stay in C) and returns its result (KG_LOOP_EXIT 0, KG_LOOP_DRAIN 1,
 *   KG_LOOP_TICK 2, or -errno of KVM_RUN; on -EINTR and on a tick pending signal handlers run
 *   first, so Ctrl-C raises KeyboardInterrupt as the ioctl would).  run(tick_us=0): the main
 *   thread passes a tick, because a signal that lands between two KVM_RUNs interrupts no ioctl
 *   and only the main thread runs Python's signal handlers.  `answered` is the total of MSR exits answered in C
 *   so far, readable from any thread while run() is in progress (a relaxed atomic counter).
 *   configure(engine, flags, intercept, ring) swaps the engine, KG_LOOP_* flags, the intercepted
 *   MSR indices and the audit ring (only between run() calls, on the thread that calls run()).  `owner` (the
 *   kvm.Vcpu) is kept alive with the loop: run_addr is its kvm_run mapping.
 * Rules(seq of bytes): the JSON-escaped rule descriptions of one engine table.
 * Audit(rate, burst): struct kg_audit, the ring consumer that counts, rate-limits and formats
 *   records (drain with the GIL released); see kvmgate/engine/auditsink.py.
 * format_record(), format_time(): one line / one time as the drain formats them (tests). */
#include "pymodule.h"

#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

#include "auditfmt.h"
#include "kvmi_event.h"
#include "runloop.h"

/* ---------------------------------------------------------------- Loop */

typedef struct {
    PyObject_HEAD
    struct kg_loop l;
    PyObject *engine;               /* EngineObject: table and state */
    PyObject *owner;
    Py_buffer ring_v, keep_v;
    int has_ring, has_keep;
    uint32_t *intercept;
    uint64_t live;
} LoopObject;

static int ring_arg(PyObject *obj, Py_buffer *v, int *has, struct kg_ring **out)
{
    *has = 0;
    *out = NULL;
    if (obj == NULL || obj == Py_None)
        return 0;
    if (PyObject_GetBuffer(obj, v, PyBUF_WRITABLE) < 0)
        return -1;
    if (kg_py_get_ring(v, out) < 0) {
        PyBuffer_Release(v);
        return -1;
    }
    *has = 1;
    return 0;
}

static int set_engine(LoopObject *self, PyObject *engine)
{
    if (!PyObject_TypeCheck(engine, &EngineType)) {
        PyErr_SetString(PyExc_TypeError, "engine must be an _engine.Engine");
        return -1;
    }
    EngineObject *e = (EngineObject *)engine;
    if (e->table == NULL) {
        PyErr_SetString(PyExc_ValueError, "engine has no table");
        return -1;
    }
    Py_INCREF(engine);
    Py_XSETREF(self->engine, engine);
    self->l.table = e->table;
    self->l.state = e->has_state ? e->state_view.buf : NULL;
    return 0;
}

static int set_flags(LoopObject *self, PyObject *flags, PyObject *intercept)
{
    unsigned long f = PyLong_AsUnsignedLong(flags);
    if (f == (unsigned long)-1 && PyErr_Occurred())
        return -1;
    if (f & ~(unsigned long)KG_LOOP_FLAGS) {
        PyErr_SetString(PyExc_ValueError, "unknown loop flags");
        return -1;
    }
    PyObject *seq = PySequence_Fast(intercept, "intercept must be a sequence of MSR indices");
    if (seq == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    uint32_t *arr = NULL;
    if (n > 0) {
        arr = PyMem_Malloc((size_t)n * sizeof *arr);
        if (arr == NULL) {
            Py_DECREF(seq);
            PyErr_NoMemory();
            return -1;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            unsigned long v = PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(seq, i));
            if ((v == (unsigned long)-1 && PyErr_Occurred()) || v > 0xFFFFFFFFul ||
                (i && v <= arr[i - 1])) {
                if (!PyErr_Occurred())
                    PyErr_SetString(PyExc_ValueError,
                                    "intercept: u32 MSR indices in ascending order");
                PyMem_Free(arr);
                Py_DECREF(seq);
                return -1;
            }
            arr[i] = (uint32_t)v;
        }
    }
    Py_DECREF(seq);
    PyMem_Free(self->intercept);
    self->intercept = arr;
    self->l.intercept = arr;
    self->l.nintercept = (uint32_t)n;
    self->l.flags = (uint32_t)f;
    return 0;
}

static int Loop_init(LoopObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"engine", "fd", "run_addr", "vcpu", "ring", "keep", "flags",
                             "owner", NULL};
    PyObject *engine, *addr, *ring = Py_None, *keep = Py_None, *owner = Py_None, *flags = NULL;
    int fd;
    unsigned int vcpu;
    if (self->l.run != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Loop already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OiOI|OOOO", kwlist, &engine, &fd, &addr, &vcpu,
                                     &ring, &keep, &flags, &owner))
        return -1;
    if (fd < 0) {
        PyErr_SetString(PyExc_ValueError, "fd out of range");
        return -1;
    }
    void *run = PyLong_AsVoidPtr(addr);
    if (run == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "run_addr is NULL");
        return -1;
    }
    if (set_engine(self, engine) < 0)
        return -1;
    struct kg_ring *r, *k;
    if (ring_arg(ring, &self->ring_v, &self->has_ring, &r) < 0)
        return -1;
    if (ring_arg(keep, &self->keep_v, &self->has_keep, &k) < 0)
        return -1;
    PyObject *zero = PyLong_FromLong(0), *empty = PyTuple_New(0);
    int rc = (zero && empty) ? set_flags(self, flags ? flags : zero, empty) : -1;
    Py_XDECREF(zero);
    Py_XDECREF(empty);
    if (rc < 0)
        return -1;
    Py_INCREF(owner);
    Py_XSETREF(self->owner, owner);
    self->l.fd = fd;
    self->l.run = run;
    self->l.ring = r;
    self->l.keep = k;
    self->l.vcpu = vcpu;
    self->l.live = &self->live;
    return 0;
}

static void Loop_dealloc(LoopObject *self)
{
    if (self->has_ring)
        PyBuffer_Release(&self->ring_v);
    if (self->has_keep)
        PyBuffer_Release(&self->keep_v);
    PyMem_Free(self->intercept);
    Py_XDECREF(self->engine);
    Py_XDECREF(self->owner);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Loop_run(LoopObject *self, PyObject *args)
{
    int rc;
    unsigned int tick_us = 0;
    if (!PyArg_ParseTuple(args, "|I:run", &tick_us))
        return NULL;
    if (self->l.run == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Loop not initialised");
        return NULL;
    }
    self->l.tick_us = tick_us;
    Py_BEGIN_ALLOW_THREADS
    rc = kg_loop_run(&self->l);
    Py_END_ALLOW_THREADS
    if ((rc == -EINTR || rc == KG_LOOP_TICK) && PyErr_CheckSignals() < 0)  /* Ctrl-C: now */
        return NULL;
    return PyLong_FromLong(rc);
}

static PyObject *Loop_configure(LoopObject *self, PyObject *args)
{
    PyObject *engine, *flags, *intercept, *ring;
    if (!PyArg_ParseTuple(args, "OOOO", &engine, &flags, &intercept, &ring))
        return NULL;
    Py_buffer v;
    int has;
    struct kg_ring *r;
    if (ring_arg(ring, &v, &has, &r) < 0)
        return NULL;
    if (set_engine(self, engine) < 0 || set_flags(self, flags, intercept) < 0) {
        if (has)
            PyBuffer_Release(&v);
        return NULL;
    }
    if (self->has_ring)
        PyBuffer_Release(&self->ring_v);
    self->ring_v = v;
    self->has_ring = has;
    self->l.ring = r;
    Py_RETURN_NONE;
}

static PyObject *Loop_answered(LoopObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLongLong(__atomic_load_n(&self->live, __ATOMIC_RELAXED));
}

static PyObject *Loop_last(LoopObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLongLong(self->l.answered);
}

static PyMethodDef Loop_methods[] = {
    {"run", (PyCFunction)Loop_run, METH_VARARGS,
     "run(tick_us=0) -> rc: KVM_RUN until an exit needs the caller (GIL released)"},
    {"configure", (PyCFunction)Loop_configure, METH_VARARGS,
     "configure(engine, flags, intercept, ring): between run() calls"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Loop_getset[] = {
    {"answered", (getter)Loop_answered, NULL, "MSR exits answered in C so far (any thread)", NULL},
    {"last", (getter)Loop_last, NULL, "MSR exits answered by the last run()", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject LoopType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvmgate.engine._engine.Loop",
    .tp_basicsize = sizeof(LoopObject),
    .tp_dealloc = (destructor)Loop_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Loop(engine, fd, run_addr, vcpu, ring=None, keep=None, flags=0, owner=None)",
    .tp_methods = Loop_methods,
    .tp_getset = Loop_getset,
    .tp_init = (initproc)Loop_init,
    .tp_new = PyType_GenericNew,
};

/* ---------------------------------------------------------------- HandlerLoop */

/* HandlerLoop(fd, run_addr, gate, exit_type, inject_gp, vcpu_index, owner, keep): the Python exit
 * loop's MSR branch (kvmgate/vm/loop.py run_vcpu) in C, for handlers written in Python: KVM_RUN
 * with the GIL released; per MSR exit exit_type(index, is_write, data, reason, vcpu_index, None,
 * owner) (an MsrExit), appended to `keep` (a list, or None), handed to gate.handler (read at each
 * exit, as the Python loop does); its answer applied in kvm_run: InjectGP (returned or raised)
 * or None for a read -> #GP (reply "gp"); a read's value & 2**64-1 -> data (reply = value).
 * Any other exception ends run() with it.  run() returns as Loop.run() does (0: an exit that is
 * no MSR exit is in kvm_run; -errno of KVM_RUN).
 * configure_events(port, msrs): guest writes of `msrs` (sorted) with reason FILTER go to the
 * EventPort's C MSR event path first (csrc/kvmi_event.h), with the GIL released; what it
 * answers never calls the handler (the exit is still counted and kept, reply None or "gp");
 * what it leaves goes to the handler as above.  configure_events(None, ()) turns it off.  Only
 * between run() calls, on the thread that calls run(). */
typedef struct {
    PyObject_HEAD
    int fd;
    struct kvm_run *run;
    PyObject *gate, *exit_type, *inject_gp, *vid, *owner, *keep;
    uint64_t live;
    PyObject *port_obj;             /* EventPort or NULL */
    struct kg_ev_port *port;
    uint32_t *ev_msrs, ev_n;
    uint32_t vcpu;
} HandlerLoopObject;

static PyObject *S_HANDLER, *S_REPLY, *S_GP, *U64_MASK;

static int HandlerLoop_init(HandlerLoopObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "run_addr", "gate", "exit_type", "inject_gp", "vcpu", "owner",
                             "keep", NULL};
    PyObject *addr, *gate, *exit_type, *inject_gp, *vid, *owner, *keep = Py_None;
    int fd;
    if (self->run != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "HandlerLoop already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iOOOOO!O|O", kwlist, &fd, &addr, &gate,
                                     &exit_type, &inject_gp, &PyLong_Type, &vid, &owner, &keep))
        return -1;
    if (keep != Py_None && !PyList_Check(keep)) {
        PyErr_SetString(PyExc_TypeError, "keep must be a list or None");
        return -1;
    }
    void *run = PyLong_AsVoidPtr(addr);
    if (run == NULL || fd < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "bad fd or run_addr");
        return -1;
    }
    self->fd = fd;
    self->run = run;
    self->vcpu = (uint32_t)PyLong_AsUnsignedLong(vid);
    if (PyErr_Occurred())
        return -1;
    PyObject *objs[] = {gate, exit_type, inject_gp, vid, owner, keep};
    PyObject **slots[] = {&self->gate, &self->exit_type, &self->inject_gp, &self->vid,
                          &self->owner, &self->keep};
    for (int i = 0; i < 6; i++) {
        Py_INCREF(objs[i]);
        Py_XSETREF(*slots[i], objs[i]);
    }
    return 0;
}

static void HandlerLoop_dealloc(HandlerLoopObject *self)
{
    Py_XDECREF(self->gate);
    Py_XDECREF(self->exit_type);
    Py_XDECREF(self->inject_gp);
    Py_XDECREF(self->vid);
    Py_XDECREF(self->owner);
    Py_XDECREF(self->keep);
    Py_XDECREF(self->port_obj);
    free(self->ev_msrs);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *HandlerLoop_configure_events(HandlerLoopObject *self, PyObject *args)
{
    PyObject *port_obj, *msrs;
    if (!PyArg_ParseTuple(args, "OO", &port_obj, &msrs))
        return NULL;
    struct kg_ev_port *p = NULL;
    if (port_obj != Py_None && (p = kg_py_event_port(port_obj)) == NULL)
        return NULL;
    PyObject *seq = PySequence_Fast(msrs, "msrs must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    uint32_t *v = n ? malloc((size_t)n * sizeof *v) : NULL;
    if (n && v == NULL) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long x = PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(seq, i));
        if (PyErr_Occurred() || x > 0xFFFFFFFFul || (i && x <= v[i - 1])) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "msrs must be sorted u32 indices");
            Py_DECREF(seq);
            free(v);
            return NULL;
        }
        v[i] = (uint32_t)x;
    }
    Py_DECREF(seq);
    free(self->ev_msrs);
    self->ev_msrs = v;
    self->ev_n = (uint32_t)n;
    Py_XINCREF(p != NULL ? port_obj : NULL);
    Py_XSETREF(self->port_obj, p != NULL ? port_obj : NULL);
    self->port = p;
    Py_RETURN_NONE;
}

/* exit_type(index, is_write, data, reason, vcpu, reply, owner) for the MSR exit in kvm_run
 * (an MsrExit); NULL with an exception set. */
static PyObject *msr_record(HandlerLoopObject *self, struct kvm_run *run, int is_write,
                            PyObject *reply)
{
    PyObject *a[7];
    a[0] = PyLong_FromUnsignedLong(run->msr.index);
    a[1] = is_write ? Py_True : Py_False;
    a[2] = PyLong_FromUnsignedLongLong(run->msr.data);
    a[3] = PyLong_FromUnsignedLong(run->msr.reason);
    a[4] = self->vid;
    a[5] = reply;
    a[6] = self->owner;
    PyObject *rec = (a[0] && a[2] && a[3]) ? PyObject_Vectorcall(self->exit_type, a, 7, NULL)
                                           : NULL;
    Py_XDECREF(a[0]);
    Py_XDECREF(a[2]);
    Py_XDECREF(a[3]);
    return rec;
}

/* An exit the C event path answered: counted, and kept as an MsrExit when exits are kept. */
static int ev_answered(HandlerLoopObject *self, struct kvm_run *run)
{
    __atomic_store_n(&self->live, self->live + 1, __ATOMIC_RELAXED);
    if (self->keep == Py_None)
        return 0;
    PyObject *rec = msr_record(self, run, 1, run->msr.error ? S_GP : Py_None);
    if (rec == NULL)
        return -1;
    int rc = PyList_Append(self->keep, rec);
    Py_DECREF(rec);
    return rc;
}

/* One MSR exit through the handler: 0, or -1 with an exception set. */
static int handle_msr(HandlerLoopObject *self, struct kvm_run *run, int is_write)
{
    PyObject *rec = msr_record(self, run, is_write, Py_None);
    if (rec == NULL)
        return -1;
    __atomic_store_n(&self->live, self->live + 1, __ATOMIC_RELAXED);
    int rc = -1;
    PyObject *handler = NULL, *value = NULL;
    if (self->keep != Py_None && PyList_Append(self->keep, rec) < 0)
        goto out;
    handler = PyObject_GetAttr(self->gate, S_HANDLER);
    if (handler == NULL)
        goto out;
    if (handler == Py_None) {
        value = Py_NewRef(self->inject_gp);
    } else {
        value = PyObject_CallOneArg(handler, rec);
        if (value == NULL) {
            if (!PyErr_ExceptionMatches(self->inject_gp))
                goto out;
            PyErr_Clear();
            value = Py_NewRef(self->inject_gp);
        }
    }
    if (value == self->inject_gp || (value == Py_None && !is_write)) {
        if (PyObject_SetAttr(rec, S_REPLY, S_GP) < 0)
            goto out;
        run->msr.error = 1;
    } else if (is_write) {
        run->msr.error = 0;
    } else {
        PyObject *masked = PyNumber_And(value, U64_MASK);
        if (masked == NULL)
            goto out;
        unsigned long long v = PyLong_AsUnsignedLongLong(masked);
        Py_DECREF(masked);
        if (v == (unsigned long long)-1 && PyErr_Occurred())
            goto out;
        run->msr.data = v;
        run->msr.error = 0;
        if (PyObject_SetAttr(rec, S_REPLY, value) < 0)
            goto out;
    }
    rc = 0;
out:
    Py_XDECREF(value);
    Py_XDECREF(handler);
    Py_DECREF(rec);
    return rc;
}

static PyObject *HandlerLoop_run(HandlerLoopObject *self, PyObject *unused)
{
    (void)unused;
    struct kvm_run *run = self->run;
    if (run == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "HandlerLoop not initialised");
        return NULL;
    }
    for (;;) {
        int rc, err = 0, ev = KG_EV_PYTHON;
        Py_BEGIN_ALLOW_THREADS
        rc = ioctl(self->fd, KVM_RUN, 0);
        if (rc < 0)
            err = errno;
        else if (self->port != NULL && run->exit_reason == KVM_EXIT_X86_WRMSR &&
                 run->msr.reason == KVM_MSR_EXIT_REASON_FILTER && kg_sorted_has(self->ev_msrs, self->ev_n, run->msr.index))
            ev = kg_ev_msr_write(self->port, self->vcpu, self->fd, run);
        Py_END_ALLOW_THREADS
        if (rc < 0) {
            if (err == EINTR && PyErr_CheckSignals() < 0)
                return NULL;
            return PyLong_FromLong(-err);
        }
        if (ev == KG_EV_DONE) {
            /* answered in C; signal handlers run here as they would in the handler */
            if (ev_answered(self, run) < 0 || PyErr_CheckSignals() < 0)
                return NULL;
            continue;
        }
        uint32_t reason = run->exit_reason;
        if (reason != KVM_EXIT_X86_RDMSR && reason != KVM_EXIT_X86_WRMSR)
            return PyLong_FromLong(KG_LOOP_EXIT);
        if (handle_msr(self, run, reason == KVM_EXIT_X86_WRMSR) < 0)
            return NULL;
    }
}

static PyObject *HandlerLoop_answered(HandlerLoopObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLongLong(__atomic_load_n(&self->live, __ATOMIC_RELAXED));
}

static PyMethodDef HandlerLoop_methods[] = {
    {"run", (PyCFunction)HandlerLoop_run, METH_NOARGS,
     "run() -> rc: KVM_RUN, MSR exits through gate.handler, until another exit"},
    {"configure_events", (PyCFunction)HandlerLoop_configure_events, METH_VARARGS,
     "configure_events(port, msrs): routed writes to the C MSR event path first"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef HandlerLoop_getset[] = {
    {"answered", (getter)HandlerLoop_answered, NULL, "MSR exits handled so far (any thread)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject HandlerLoopType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvmgate.engine._engine.HandlerLoop",
    .tp_basicsize = sizeof(HandlerLoopObject),
    .tp_dealloc = (destructor)HandlerLoop_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "HandlerLoop(fd, run_addr, gate, exit_type, inject_gp, vcpu, owner, keep=None)",
    .tp_methods = HandlerLoop_methods,
    .tp_getset = HandlerLoop_getset,
    .tp_init = (initproc)HandlerLoop_init,
    .tp_new = PyType_GenericNew,
};

/* ---------------------------------------------------------------- Rules */

typedef struct {
    PyObject_HEAD
    struct kg_audit_rules r;
    PyObject *items;                /* tuple of bytes: owns the strings */
    const char **json;
    size_t *len;
} RulesObject;

static int Rules_init(RulesObject *self, PyObject *args, PyObject *kwds)
{
    PyObject *seq;
    static char *kwlist[] = {"rules", NULL};
    if (self->items != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Rules already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O", kwlist, &seq))
        return -1;
    PyObject *t = PySequence_Tuple(seq);
    if (t == NULL)
        return -1;
    Py_ssize_t n = PyTuple_GET_SIZE(t);
    if (n > 0xFFFFFFF) {
        Py_DECREF(t);
        PyErr_SetString(PyExc_ValueError, "too many rules");
        return -1;
    }
    self->json = PyMem_Malloc(((size_t)n + 1) * sizeof *self->json);
    self->len = PyMem_Malloc(((size_t)n + 1) * sizeof *self->len);
    if (self->json == NULL || self->len == NULL) {
        Py_DECREF(t);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *b = PyTuple_GET_ITEM(t, i);
        if (!PyBytes_Check(b)) {
            Py_DECREF(t);
            PyErr_SetString(PyExc_TypeError, "rules: JSON strings as bytes");
            return -1;
        }
        self->json[i] = PyBytes_AS_STRING(b);
        self->len[i] = (size_t)PyBytes_GET_SIZE(b);
    }
    self->items = t;
    self->r = (struct kg_audit_rules){self->json, self->len, (uint32_t)n};
    return 0;
}

static void Rules_dealloc(RulesObject *self)
{
    PyMem_Free(self->json);
    PyMem_Free(self->len);
    Py_XDECREF(self->items);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject RulesType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvmgate.engine._engine.Rules",
    .tp_basicsize = sizeof(RulesObject),
    .tp_dealloc = (destructor)Rules_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Rules(seq of bytes): a table's rule descriptions, each json.dumps()'d",
    .tp_init = (initproc)Rules_init,
    .tp_new = PyType_GenericNew,
};

/* ---------------------------------------------------------------- Audit */

typedef struct {
    PyObject_HEAD
    struct kg_audit *a;
} AuditObject;

static int Audit_init(AuditObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"rate", "burst", NULL};
    double rate, burst;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "dd", kwlist, &rate, &burst))
        return -1;
    if (self->a != NULL) {
        kg_audit_configure(self->a, rate, burst);
        return 0;
    }
    self->a = kg_audit_new(rate, burst);
    if (self->a == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void Audit_dealloc(AuditObject *self)
{
    kg_audit_free(self->a);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int audit_ready(AuditObject *self)
{
    if (self->a == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Audit not initialised");
        return -1;
    }
    return 0;
}

static PyObject *Audit_configure(AuditObject *self, PyObject *args)
{
    double rate, burst;
    if (audit_ready(self) < 0 || !PyArg_ParseTuple(args, "dd", &rate, &burst))
        return NULL;
    kg_audit_configure(self->a, rate, burst);
    Py_RETURN_NONE;
}

static PyObject *Audit_set_name(AuditObject *self, PyObject *args)
{
    unsigned int index;
    const char *json;
    Py_ssize_t len;
    if (audit_ready(self) < 0 || !PyArg_ParseTuple(args, "Iy#", &index, &json, &len))
        return NULL;
    if (kg_audit_set_name(self->a, index, json, (size_t)len) < 0)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* drain(ring, rules, max_bytes) -> (status, missing index) */
static PyObject *Audit_drain(AuditObject *self, PyObject *args)
{
    PyObject *ring, *rules;
    Py_ssize_t max_bytes;
    if (audit_ready(self) < 0 || !PyArg_ParseTuple(args, "OOn", &ring, &rules, &max_bytes))
        return NULL;
    if (rules != Py_None && !PyObject_TypeCheck(rules, &RulesType)) {
        PyErr_SetString(PyExc_TypeError, "rules must be an _engine.Rules or None");
        return NULL;
    }
    Py_buffer v;
    struct kg_ring *r;
    if (PyObject_GetBuffer(ring, &v, PyBUF_WRITABLE) < 0)
        return NULL;
    if (kg_py_get_ring(&v, &r) < 0) {
        PyBuffer_Release(&v);
        return NULL;
    }
    const struct kg_audit_rules *ru = rules == Py_None ? NULL : &((RulesObject *)rules)->r;
    uint32_t missing = 0;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = kg_audit_drain(self->a, r, ru, max_bytes < 0 ? 0 : (size_t)max_bytes, &missing);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&v);
    if (rc == KG_AUDIT_NOMEM)
        return PyErr_NoMemory();
    return Py_BuildValue("(iI)", rc, missing);
}

/* lines() -> (bytes, number of lines) formatted since the last commit */
static PyObject *Audit_lines(AuditObject *self, PyObject *unused)
{
    (void)unused;
    size_t len;
    uint32_t n;
    if (audit_ready(self) < 0)
        return NULL;
    const char *buf = kg_audit_buffer(self->a, &len, &n);
    return Py_BuildValue("(y#I)", len ? buf : "", (Py_ssize_t)len, n);
}

static PyObject *Audit_commit(AuditObject *self, PyObject *arg)
{
    Py_ssize_t n = PyNumber_AsSsize_t(arg, PyExc_OverflowError);
    if ((n == -1 && PyErr_Occurred()) || audit_ready(self) < 0)
        return NULL;
    kg_audit_commit(self->a, n < 0 ? 0 : (size_t)n);
    Py_RETURN_NONE;
}

/* take_rows() -> ([(index, flags, action, result, value, count, unlogged)], suppressed) */
static PyObject *Audit_take_rows(AuditObject *self, PyObject *unused)
{
    (void)unused;
    size_t n;
    uint64_t suppressed;
    if (audit_ready(self) < 0)
        return NULL;
    const struct kg_audit_row *rows = kg_audit_rows(self->a, &n, &suppressed);
    PyObject *list = PyList_New((Py_ssize_t)n);
    if (list == NULL)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        const struct kg_audit_row *r = &rows[i];
        PyObject *t = Py_BuildValue("(IiiiKKK)", r->index, r->flags, r->action, r->result,
                                    (unsigned long long)r->value, (unsigned long long)r->count,
                                    (unsigned long long)r->unlogged);
        if (t == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, t);
    }
    kg_audit_clear_rows(self->a);
    PyObject *res = Py_BuildValue("(OK)", list, (unsigned long long)suppressed);
    Py_DECREF(list);
    return res;
}

/* take_owed() -> [(index, is_write, suppressed)] */
static PyObject *Audit_take_owed(AuditObject *self, PyObject *unused)
{
    (void)unused;
    struct kg_audit_owed buf[64];
    if (audit_ready(self) < 0)
        return NULL;
    PyObject *list = PyList_New(0);
    if (list == NULL)
        return NULL;
    for (;;) {
        size_t n = kg_audit_take_owed(self->a, buf, 64);
        for (size_t i = 0; i < n; i++) {
            PyObject *t = Py_BuildValue("(IOK)", buf[i].index, buf[i].is_write ? Py_True : Py_False,
                                        (unsigned long long)buf[i].suppressed);
            if (t == NULL || PyList_Append(list, t) < 0) {
                Py_XDECREF(t);
                Py_DECREF(list);
                return NULL;
            }
            Py_DECREF(t);
        }
        if (n < 64)
            return list;
    }
}

static PyMethodDef Audit_methods[] = {
    {"configure", (PyCFunction)Audit_configure, METH_VARARGS, "configure(rate, burst)"},
    {"set_name", (PyCFunction)Audit_set_name, METH_VARARGS, "set_name(index, json bytes)"},
    {"drain", (PyCFunction)Audit_drain, METH_VARARGS,
     "drain(ring, rules, max_bytes) -> (status, missing): KG_AUDIT_EMPTY/FULL/NAME"},
    {"lines", (PyCFunction)Audit_lines, METH_NOARGS, "lines() -> (bytes, n): uncommitted lines"},
    {"commit", (PyCFunction)Audit_commit, METH_O, "commit(n): the first n lines went out, the rest did not"},
    {"take_rows", (PyCFunction)Audit_take_rows, METH_NOARGS,
     "take_rows() -> (rows, suppressed) since the last call"},
    {"take_owed", (PyCFunction)Audit_take_owed, METH_NOARGS,
     "take_owed() -> [(index, is_write, n)]: suppressed counts no record reported"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject AuditType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvmgate.engine._engine.Audit",
    .tp_basicsize = sizeof(AuditObject),
    .tp_dealloc = (destructor)Audit_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Audit(rate, burst): counts, rate-limits and formats audit-ring records",
    .tp_methods = Audit_methods,
    .tp_init = (initproc)Audit_init,
    .tp_new = PyType_GenericNew,
};

/* ---------------------------------------------------------------- functions */

static PyObject *m_format_record(PyObject *mod, PyObject *args)
{
    (void)mod;
    Py_buffer rec;
    const char *name, *rule;
    Py_ssize_t name_len, rule_len;
    unsigned long long sb;
    if (!PyArg_ParseTuple(args, "y*y#y#K", &rec, &name, &name_len, &rule, &rule_len, &sb))
        return NULL;
    if (rec.len != (Py_ssize_t)sizeof(struct kg_record)) {
        PyBuffer_Release(&rec);
        PyErr_SetString(PyExc_ValueError, "a record is 64 bytes");
        return NULL;
    }
    struct kg_record r;
    memcpy(&r, rec.buf, sizeof r);
    PyBuffer_Release(&rec);
    size_t need = kg_audit_format(NULL, 0, &r, name, (size_t)name_len, rule, (size_t)rule_len, sb);
    char *buf = PyMem_Malloc(need + 1);
    if (buf == NULL)
        return PyErr_NoMemory();
    kg_audit_format(buf, need + 1, &r, name, (size_t)name_len, rule, (size_t)rule_len, sb);
    PyObject *s = PyUnicode_DecodeUTF8(buf, (Py_ssize_t)need, "strict");
    PyMem_Free(buf);
    return s;
}

static PyObject *m_format_time(PyObject *mod, PyObject *arg)
{
    (void)mod;
    double t = PyFloat_AsDouble(arg);
    if (t == -1.0 && PyErr_Occurred())
        return NULL;
    char out[48];
    size_t n = kg_audit_time(out, t);
    return PyUnicode_FromStringAndSize(out, (Py_ssize_t)n);
}

static PyMethodDef functions[] = {
    {"format_record", m_format_record, METH_VARARGS,
     "format_record(record64, name_json, rule_json, suppressed_before) -> the JSON line"},
    {"format_time", m_format_time, METH_O, "format_time(t) -> repr(round(t, 6))"},
    {NULL, NULL, 0, NULL},
};

int kg_py_add_types(PyObject *m)
{
    static PyTypeObject *types[] = {&LoopType, &HandlerLoopType, &RulesType, &AuditType};
    static const char *names[] = {"Loop", "HandlerLoop", "Rules", "Audit"};
    S_HANDLER = PyUnicode_InternFromString("handler");
    S_REPLY = PyUnicode_InternFromString("reply");
    S_GP = PyUnicode_InternFromString("gp");
    U64_MASK = PyLong_FromUnsignedLongLong(~0ull);
    if (!S_HANDLER || !S_REPLY || !S_GP || !U64_MASK)
        return -1;
    for (int i = 0; i < 4; i++) {
        if (PyType_Ready(types[i]) < 0)
            return -1;
        Py_INCREF(types[i]);
        if (PyModule_AddObject(m, names[i], (PyObject *)types[i]) < 0) {
            Py_DECREF(types[i]);
            return -1;
        }
    }
    if (PyModule_AddFunctions(m, functions) < 0)
        return -1;
    static const struct { const char *name; long v; } ints[] = {
        {"LOOP_EXIT", KG_LOOP_EXIT}, {"LOOP_DRAIN", KG_LOOP_DRAIN}, {"LOOP_TICK", KG_LOOP_TICK},
        {"LOOP_SYNC_REGS", KG_LOOP_SYNC_REGS}, {"LOOP_FILTER_RETURNS", KG_LOOP_FILTER_RETURNS},
        {"AUDIT_EMPTY", KG_AUDIT_EMPTY}, {"AUDIT_FULL", KG_AUDIT_FULL},
        {"AUDIT_NAME", KG_AUDIT_NAME},
    };
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++)
        if (PyModule_AddIntConstant(m, ints[i].name, ints[i].v) < 0)
            return -1;
    return 0;
}

/* kvmgate.engine._engine, part three: EventPort, the Python side of csrc/kvmi_event.c.
 *
 * EventPort(nvcpus): one introspection session's struct kg_ev_port (kvmi_event.h), made by
 *   kvmgate/introspection/fast_events.py and handed to the C exit loops through the gate's
 *   interception registration.  Starts dead (KG_TOKEN_DEAD): nothing happens in C until arm().
 *   arm(sock, template, seq_at, vcpu_at, state_at, payload_at, reply_id, event_wire, poll_ns,
 *       timeout_ns) -> bool: the session's socket and the dialect's MSR event template; the token
 *       becomes free.  Only once.
 *   set_wanted(vcpu, msrs): the MSRs whose writes are MSR events on that vCPU (sequence
 *       counter; more than KG_EV_MAX_MSRS: none here, Python sends them all).
 *   token_take() / token_release(pending) / token_adopt() / token_kill(): the reader token
 *       moves of kvmgate/introspection/inbox.py (only ever called under the inbox's lock).
 *   want(delta): Python threads waiting for the token (C does not take it while any wait).
 *   next_seq(): the session's event seq, shared with C.
 *   take_handoff(vcpu) -> None | (seq, msr, old, new, elapsed seconds, bytes read): an event C
 *       sent and left to Python (the vCPU's own thread, right after the exit).
 *   token, events, writes, released_at: for the inbox and the counters. */
#include "pymodule.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kvmi_event.h"

typedef struct {
    PyObject_HEAD
    struct kg_ev_port *p;
} EventPortObject;

static int EventPort_init(EventPortObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"nvcpus", NULL};
    unsigned int n;
    if (self->p != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "EventPort already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "I", kwlist, &n))
        return -1;
    if (n == 0 || n > 4096) {
        PyErr_SetString(PyExc_ValueError, "nvcpus out of range");
        return -1;
    }
    struct kg_ev_port *p = calloc(1, sizeof *p);
    struct kg_ev_vcpu *v = calloc(n, sizeof *v);
    if (p == NULL || v == NULL) {
        free(p);
        free(v);
        PyErr_NoMemory();
        return -1;
    }
    p->token = KG_TOKEN_DEAD;
    p->sock = -1;
    p->nvcpus = n;
    p->v = v;
    self->p = p;
    return 0;
}

static void EventPort_dealloc(EventPortObject *self)
{
    if (self->p != NULL) {
        free(self->p->v);
        free(self->p);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static struct kg_ev_port *port(EventPortObject *self)
{
    if (self->p == NULL)
        PyErr_SetString(PyExc_RuntimeError, "EventPort not initialised");
    return self->p;
}

static PyObject *EventPort_arm(EventPortObject *self, PyObject *args)
{
    struct kg_ev_port *p = port(self);
    int sock;
    Py_buffer t;
    unsigned int seq_at, vcpu_at, state_at, payload_at, reply_id, wire;
    long long poll_ns, timeout_ns;
    if (p == NULL || !PyArg_ParseTuple(args, "iy*IIIIIILL", &sock, &t, &seq_at, &vcpu_at,
                                       &state_at, &payload_at, &reply_id, &wire, &poll_ns,
                                       &timeout_ns))
        return NULL;
    const char *bad = NULL;
    if (t.len < 8 || t.len > KG_EV_MSG_MAX)
        bad = "template size";
    else if (seq_at + 4 > t.len || vcpu_at + 2 > t.len || state_at + KG_EV_STATE_SIZE > t.len ||
             payload_at + 24 > t.len)
        bad = "offsets past the template";
    else if (sock < 0 || reply_id > 0xFFFF || wire > 0xFF || poll_ns < 0)
        bad = "bad argument";
    if (bad != NULL) {
        PyBuffer_Release(&t);
        PyErr_SetString(PyExc_ValueError, bad);
        return NULL;
    }
    if (p->sock >= 0) {          /* armed once: a session's port is never reused */
        PyBuffer_Release(&t);
        Py_RETURN_FALSE;
    }
    memcpy(p->tmpl, t.buf, (size_t)t.len);
    p->msg_len = (uint32_t)t.len;
    PyBuffer_Release(&t);
    p->seq_at = seq_at;
    p->vcpu_at = vcpu_at;
    p->state_at = state_at;
    p->payload_at = payload_at;
    p->reply_id = (uint16_t)reply_id;
    p->event_wire = (uint8_t)wire;
    p->poll_ns = poll_ns;
    p->timeout_ns = timeout_ns;
    p->sock = sock;
    __atomic_store_n(&p->token, KG_TOKEN_FREE, __ATOMIC_RELEASE);
    Py_RETURN_TRUE;
}

static PyObject *EventPort_set_wanted(EventPortObject *self, PyObject *args)
{
    struct kg_ev_port *p = port(self);
    unsigned int vcpu;
    PyObject *msrs;
    if (p == NULL || !PyArg_ParseTuple(args, "IO", &vcpu, &msrs))
        return NULL;
    if (vcpu >= p->nvcpus) {
        PyErr_SetString(PyExc_ValueError, "vcpu out of range");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(msrs, "msrs must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    uint32_t vals[KG_EV_MAX_MSRS];
    uint32_t k = 0;
    for (Py_ssize_t i = 0; i < n && n <= KG_EV_MAX_MSRS; i++) {
        unsigned long x = PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(seq, i));
        if (PyErr_Occurred() || x > 0xFFFFFFFFul) {
            Py_DECREF(seq);
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "MSR index out of range");
            return NULL;
        }
        uint32_t j = k++;                          /* insertion sort: at most 64 */
        while (j > 0 && vals[j - 1] > x) {
            vals[j] = vals[j - 1];
            j--;
        }
        vals[j] = (uint32_t)x;
    }
    Py_DECREF(seq);
    struct kg_ev_vcpu *v = &p->v[vcpu];
    uint32_t g = v->gen;
    __atomic_store_n(&v->gen, g + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    __atomic_store_n(&v->n, 0u, __ATOMIC_RELAXED);
    for (uint32_t i = 0; i < k; i++)
        __atomic_store_n(&v->msrs[i], vals[i], __ATOMIC_RELAXED);
    __atomic_store_n(&v->n, k, __ATOMIC_RELAXED);
    __atomic_store_n(&v->gen, g + 2, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

static int cas(uint32_t *w, uint32_t from, uint32_t to)
{
    return __atomic_compare_exchange_n(w, &from, to, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

static PyObject *EventPort_token_take(EventPortObject *self, PyObject *unused)
{
    (void)unused;
    struct kg_ev_port *p = port(self);
    if (p == NULL)
        return NULL;
    if (cas(&p->token, KG_TOKEN_FREE, KG_TOKEN_PY) ||
        __atomic_load_n(&p->token, __ATOMIC_ACQUIRE) == KG_TOKEN_PY)
        Py_RETURN_TRUE;
    Py_RETURN_FALSE;
}

static PyObject *EventPort_token_release(EventPortObject *self, PyObject *pending)
{
    struct kg_ev_port *p = port(self);
    if (p == NULL)
        return NULL;
    int keep = PyObject_IsTrue(pending);
    if (keep < 0)
        return NULL;
    if (!keep)
        cas(&p->token, KG_TOKEN_PY, KG_TOKEN_FREE);
    Py_RETURN_NONE;
}

static PyObject *EventPort_token_adopt(EventPortObject *self, PyObject *unused)
{
    (void)unused;
    struct kg_ev_port *p = port(self);
    if (p == NULL)
        return NULL;
    return PyBool_FromLong(cas(&p->token, KG_TOKEN_C, KG_TOKEN_PY));
}

static PyObject *EventPort_token_kill(EventPortObject *self, PyObject *unused)
{
    (void)unused;
    struct kg_ev_port *p = port(self);
    if (p == NULL)
        return NULL;
    int dead = cas(&p->token, KG_TOKEN_FREE, KG_TOKEN_DEAD) ||
               cas(&p->token, KG_TOKEN_PY, KG_TOKEN_DEAD) ||
               __atomic_load_n(&p->token, __ATOMIC_ACQUIRE) == KG_TOKEN_DEAD;
    return PyBool_FromLong(dead);
}

static PyObject *EventPort_want(EventPortObject *self, PyObject *arg)
{
    struct kg_ev_port *p = port(self);
    if (p == NULL)
        return NULL;
    long d = PyLong_AsLong(arg);
    if (d == -1 && PyErr_Occurred())
        return NULL;
    __atomic_add_fetch(&p->py_wanted, (uint32_t)d, __ATOMIC_ACQ_REL);
    Py_RETURN_NONE;
}

static PyObject *EventPort_next_seq(EventPortObject *self, PyObject *unused)
{
    (void)unused;
    struct kg_ev_port *p = port(self);
    if (p == NULL)
        return NULL;
    return PyLong_FromUnsignedLong(__atomic_add_fetch(&p->seq, 1, __ATOMIC_RELAXED));
}

static PyObject *EventPort_take_handoff(EventPortObject *self, PyObject *arg)
{
    struct kg_ev_port *p = port(self);
    if (p == NULL)
        return NULL;
    unsigned long vcpu = PyLong_AsUnsignedLong(arg);
    if (PyErr_Occurred())
        return NULL;
    if (vcpu >= p->nvcpus) {
        PyErr_SetString(PyExc_ValueError, "vcpu out of range");
        return NULL;
    }
    struct kg_ev_vcpu *v = &p->v[vcpu];
    if (!v->handoff)
        Py_RETURN_NONE;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    double elapsed = ((double)((int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec) -
                      (double)v->h_start_ns) / 1e9;
    uint32_t len = v->h_len <= KG_EV_REPLY_SIZE ? v->h_len : KG_EV_REPLY_SIZE;
    v->handoff = 0;
    return Py_BuildValue("(kkKKdy#)", (unsigned long)v->h_seq, (unsigned long)v->h_msr,
                         (unsigned long long)v->h_old, (unsigned long long)v->h_new,
                         elapsed > 0 ? elapsed : 0.0, (const char *)v->h_bytes, (Py_ssize_t)len);
}

static PyObject *EventPort_get_token(EventPortObject *self, void *closure)
{
    (void)closure;
    struct kg_ev_port *p = port(self);
    return p == NULL ? NULL : PyLong_FromUnsignedLong(__atomic_load_n(&p->token, __ATOMIC_ACQUIRE));
}

static PyObject *EventPort_get_events(EventPortObject *self, void *closure)
{
    (void)closure;
    struct kg_ev_port *p = port(self);
    return p == NULL ? NULL
                     : PyLong_FromUnsignedLongLong(__atomic_load_n(&p->events, __ATOMIC_RELAXED));
}

static PyObject *EventPort_get_writes(EventPortObject *self, void *closure)
{
    (void)closure;
    struct kg_ev_port *p = port(self);
    return p == NULL ? NULL
                     : PyLong_FromUnsignedLongLong(__atomic_load_n(&p->writes, __ATOMIC_RELAXED));
}

static PyObject *EventPort_get_released_at(EventPortObject *self, void *closure)
{
    (void)closure;
    struct kg_ev_port *p = port(self);
    if (p == NULL)
        return NULL;
    return PyFloat_FromDouble((double)__atomic_load_n(&p->released_ns, __ATOMIC_RELAXED) / 1e9);
}

static PyMethodDef EventPort_methods[] = {
    {"arm", (PyCFunction)EventPort_arm, METH_VARARGS,
     "arm(sock, template, seq_at, vcpu_at, state_at, payload_at, reply_id, event_wire, poll_ns, "
     "timeout_ns) -> bool"},
    {"set_wanted", (PyCFunction)EventPort_set_wanted, METH_VARARGS, "set_wanted(vcpu, msrs)"},
    {"token_take", (PyCFunction)EventPort_token_take, METH_NOARGS, "free/Python's -> Python's"},
    {"token_release", (PyCFunction)EventPort_token_release, METH_O,
     "token_release(pending): Python's -> free, unless bytes are pending in Python"},
    {"token_adopt", (PyCFunction)EventPort_token_adopt, METH_NOARGS, "C's -> Python's (handoff)"},
    {"token_kill", (PyCFunction)EventPort_token_kill, METH_NOARGS,
     "-> dead unless C holds it; True when dead"},
    {"want", (PyCFunction)EventPort_want, METH_O, "want(+1 / -1)"},
    {"next_seq", (PyCFunction)EventPort_next_seq, METH_NOARGS, "the next event seq"},
    {"take_handoff", (PyCFunction)EventPort_take_handoff, METH_O,
     "take_handoff(vcpu) -> None | (seq, msr, old, new, elapsed, bytes)"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef EventPort_getset[] = {
    {"token", (getter)EventPort_get_token, NULL, "KG_TOKEN_*", NULL},
    {"events", (getter)EventPort_get_events, NULL, "MSR events sent in C", NULL},
    {"writes", (getter)EventPort_get_writes, NULL, "intercepted writes answered in C", NULL},
    {"released_at", (getter)EventPort_get_released_at, NULL,
     "time.monotonic() of C's last token release", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject EventPortType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvmgate.engine._engine.EventPort",
    .tp_basicsize = sizeof(EventPortObject),
    .tp_dealloc = (destructor)EventPort_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "EventPort(nvcpus): one introspection session's C MSR event path",
    .tp_methods = EventPort_methods,
    .tp_getset = EventPort_getset,
    .tp_init = (initproc)EventPort_init,
    .tp_new = PyType_GenericNew,
};

struct kg_ev_port *kg_py_event_port(PyObject *obj)
{
    if (!PyObject_TypeCheck(obj, &EventPortType)) {
        PyErr_SetString(PyExc_TypeError, "expected an EventPort");
        return NULL;
    }
    return port((EventPortObject *)obj);
}

int kg_py_add_event_types(PyObject *m)
{
    if (PyType_Ready(&EventPortType) < 0)
        return -1;
    Py_INCREF(&EventPortType);
    if (PyModule_AddObject(m, "EventPort", (PyObject *)&EventPortType) < 0) {
        Py_DECREF(&EventPortType);
        return -1;
    }
    static const struct { const char *name; long v; } ints[] = {
        {"TOKEN_FREE", KG_TOKEN_FREE}, {"TOKEN_PY", KG_TOKEN_PY}, {"TOKEN_C", KG_TOKEN_C},
        {"TOKEN_DEAD", KG_TOKEN_DEAD}, {"EV_MAX_MSRS", KG_EV_MAX_MSRS},
    };
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++)
        if (PyModule_AddIntConstant(m, ints[i].name, ints[i].v) < 0)
            return -1;
    return 0;
}

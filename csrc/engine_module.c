/* kvmgate.engine._engine: the C policy engine (engine.c) for Python.
 *
 * Engine(table, state): a validated, 8-byte-aligned private copy of a table built by
 * kvmgate/engine/table.py, deciding exits against an emulated-register state held in a writable
 * buffer (kg_state_init'ed; shareable across Engine objects so registers survive policy swaps),
 * or against no state (state=None: explain/replay verdicts).  Module functions wrap the state and
 * ring helpers for buffers (mmap, bytearray) the caller owns.  Nothing here allocates per
 * decision; decide() holds the GIL (it is a few dozen instructions).  The C run loop and the
 * audit drain are in loop_module.c. */
#include "pymodule.h"

#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

static int get_state(Py_buffer *view, struct kg_state **out)
{
    struct kg_state *s = view->buf;
    if (view->readonly) {
        PyErr_SetString(PyExc_TypeError, "state buffer must be writable");
        return -1;
    }
    if (((uintptr_t)view->buf & 15u) || (size_t)view->len < sizeof(struct kg_state) ||
        s->magic != KG_STATE_MAGIC || s->nslots == 0 || (s->nslots & (s->nslots - 1)) ||
        kg_state_size(s->nslots) > (size_t)view->len) {
        PyErr_SetString(PyExc_ValueError,
                        "state buffer is not an initialised kvmgate engine state (16-byte aligned)");
        return -1;
    }
    *out = s;
    return 0;
}

static int Engine_init(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"table", "state", NULL};
    Py_buffer tv;
    PyObject *state = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*|O", kwlist, &tv, &state))
        return -1;
    void *copy = NULL;
    if (tv.len <= 0 || posix_memalign(&copy, 64, (size_t)tv.len) != 0) {
        PyBuffer_Release(&tv);
        if (tv.len <= 0) {
            PyErr_SetString(PyExc_ValueError, kg_strerror(KG_E_SHORT));
            return -1;
        }
        PyErr_NoMemory();
        return -1;
    }
    memcpy(copy, tv.buf, (size_t)tv.len);
    int rc = kg_table_validate(copy, (size_t)tv.len);
    PyBuffer_Release(&tv);
    if (rc != KG_OK) {
        free(copy);
        PyErr_SetString(PyExc_ValueError, kg_strerror(rc));
        return -1;
    }
    if (state != Py_None) {
        Py_buffer sv;
        struct kg_state *s;
        if (PyObject_GetBuffer(state, &sv, PyBUF_WRITABLE) < 0) {
            free(copy);
            return -1;
        }
        if (get_state(&sv, &s) < 0) {
            PyBuffer_Release(&sv);
            free(copy);
            return -1;
        }
        if (self->has_state)
            PyBuffer_Release(&self->state_view);
        self->state_view = sv;
        self->has_state = 1;
    }
    free(self->table);
    self->table = copy;
    return 0;
}

static void Engine_dealloc(EngineObject *self)
{
    free(self->table);
    if (self->has_state)
        PyBuffer_Release(&self->state_view);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *decision_tuple(const struct kg_decision *d)
{
    return Py_BuildValue("(iKiIi)", d->result, (unsigned long long)d->value, d->action,
                         (unsigned int)d->rule, d->flags);
}

static int exit_args(PyObject *const *args, Py_ssize_t nargs, uint32_t *index, int *is_write,
                     uint32_t *reason, uint64_t *data)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "expected (index, is_write, reason, data)");
        return -1;
    }
    unsigned long i = PyLong_AsUnsignedLong(args[0]);
    if (i == (unsigned long)-1 && PyErr_Occurred())
        return -1;
    if (i > 0xFFFFFFFFul) {
        PyErr_SetString(PyExc_OverflowError, "MSR index is a u32");
        return -1;
    }
    int w = PyObject_IsTrue(args[1]);
    if (w < 0)
        return -1;
    unsigned long r = PyLong_AsUnsignedLong(args[2]);
    if (r == (unsigned long)-1 && PyErr_Occurred())
        return -1;
    unsigned long long v = PyLong_AsUnsignedLongLong(args[3]);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *index = (uint32_t)i;
    *is_write = w;
    *reason = (uint32_t)r;
    *data = v;
    return 0;
}

static PyObject *Engine_decide(EngineObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint32_t index, reason;
    int is_write;
    uint64_t data;
    struct kg_decision d;
    if (exit_args(args, nargs, &index, &is_write, &reason, &data) < 0)
        return NULL;
    kg_decide(self->table, self->has_state ? self->state_view.buf : NULL, index, is_write,
              reason, data, &d);
    return decision_tuple(&d);
}

static PyObject *Engine_verdict(EngineObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint32_t index, reason;
    int is_write;
    uint64_t data;
    struct kg_decision d;
    if (exit_args(args, nargs, &index, &is_write, &reason, &data) < 0)
        return NULL;
    kg_decide(self->table, NULL, index, is_write, reason, data, &d);
    return decision_tuple(&d);
}

static PyMethodDef Engine_methods[] = {
    {"decide", (PyCFunction)(void (*)(void))Engine_decide, METH_FASTCALL,
     "decide(index, is_write, reason, data) -> (result, value, action, rule, flags)"},
    {"verdict", (PyCFunction)(void (*)(void))Engine_verdict, METH_FASTCALL,
     "verdict(index, is_write, reason, data): decide without register state (explain/replay)"},
    {NULL, NULL, 0, NULL},
};

PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvmgate.engine._engine.Engine",
    .tp_basicsize = sizeof(EngineObject),
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Engine(table, state=None): a validated engine table deciding MSR exits",
    .tp_methods = Engine_methods,
    .tp_init = (initproc)Engine_init,
    .tp_new = PyType_GenericNew,
};

/* ---- module functions ---- */

static PyObject *m_validate(PyObject *mod, PyObject *arg)
{
    (void)mod;
    Py_buffer v;
    if (PyObject_GetBuffer(arg, &v, PyBUF_SIMPLE) < 0)
        return NULL;
    void *copy = NULL;
    int rc;
    if (v.len <= 0) {
        rc = KG_E_SHORT;
    } else if (posix_memalign(&copy, 64, (size_t)v.len) != 0) {
        PyBuffer_Release(&v);
        return PyErr_NoMemory();
    } else {
        memcpy(copy, v.buf, (size_t)v.len);
        rc = kg_table_validate(copy, (size_t)v.len);
        free(copy);
    }
    PyBuffer_Release(&v);
    return PyLong_FromLong(rc);
}

static PyObject *m_strerror(PyObject *mod, PyObject *arg)
{
    (void)mod;
    long c = PyLong_AsLong(arg);
    if (c == -1 && PyErr_Occurred())
        return NULL;
    return PyUnicode_FromString(kg_strerror((int)c));
}

/* state_size/ring_size and state_init/ring_init: the same shape for both layouts */
struct layout {
    size_t (*size)(uint32_t n);
    int (*init)(void *mem, size_t len, uint32_t n);
    const char *bad;                /* ValueError text of a refused init */
};

static const struct layout STATE_LAYOUT = {
    kg_state_size, kg_state_init,
    "state: slots must be a power of two and the buffer 16-byte aligned and large enough"};
static const struct layout RING_LAYOUT = {
    kg_ring_size, kg_ring_init,
    "ring: capacity must be a power of two >= 2 and the buffer 64-byte aligned and large enough"};

static PyObject *layout_size(const struct layout *l, PyObject *arg)
{
    unsigned long n = PyLong_AsUnsignedLong(arg);
    if (n == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    if (n > 0xFFFFFFFFul) {
        PyErr_SetString(PyExc_OverflowError, "count is a u32");
        return NULL;
    }
    return PyLong_FromSize_t(l->size((uint32_t)n));
}

static PyObject *layout_init(const struct layout *l, PyObject *args)
{
    Py_buffer v;
    unsigned int n;
    if (!PyArg_ParseTuple(args, "w*I", &v, &n))
        return NULL;
    int rc = l->init(v.buf, (size_t)v.len, n);
    PyBuffer_Release(&v);
    if (rc < 0) {
        PyErr_SetString(PyExc_ValueError, l->bad);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *m_state_size(PyObject *mod, PyObject *arg)
{
    (void)mod;
    return layout_size(&STATE_LAYOUT, arg);
}

static PyObject *m_state_init(PyObject *mod, PyObject *args)
{
    (void)mod;
    return layout_init(&STATE_LAYOUT, args);
}

static PyObject *m_ring_size(PyObject *mod, PyObject *arg)
{
    (void)mod;
    return layout_size(&RING_LAYOUT, arg);
}

static PyObject *m_ring_init(PyObject *mod, PyObject *args)
{
    (void)mod;
    return layout_init(&RING_LAYOUT, args);
}

static PyObject *m_state_get(PyObject *mod, PyObject *args)
{
    (void)mod;
    Py_buffer v;
    unsigned int index;
    struct kg_state *s;
    uint64_t value;
    if (!PyArg_ParseTuple(args, "w*I", &v, &index))
        return NULL;
    if (get_state(&v, &s) < 0) {
        PyBuffer_Release(&v);
        return NULL;
    }
    int have = kg_state_get(s, index, &value);
    PyBuffer_Release(&v);
    if (!have)
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(value);
}

int kg_py_get_ring(Py_buffer *v, struct kg_ring **out)
{
    struct kg_ring *r = v->buf;
    if (((uintptr_t)v->buf & 63u) || (size_t)v->len < sizeof(struct kg_ring) ||
        r->magic != KG_RING_MAGIC || r->version != 1 ||
        r->record_size != sizeof(struct kg_record) || r->capacity < 2 ||
        (r->capacity & (r->capacity - 1)) || kg_ring_size(r->capacity) > (size_t)v->len) {
        PyErr_SetString(PyExc_ValueError,
                        "not an initialised kvmgate audit ring of this size (64-byte aligned)");
        return -1;
    }
    *out = r;
    return 0;
}

static PyObject *m_ring_push(PyObject *mod, PyObject *args)
{
    (void)mod;
    Py_buffer v, rec;
    struct kg_ring *r;
    struct kg_record copy;
    if (!PyArg_ParseTuple(args, "w*y*", &v, &rec))
        return NULL;
    PyObject *res = NULL;
    if (rec.len != (Py_ssize_t)sizeof copy) {
        PyErr_SetString(PyExc_ValueError, "a record is 64 bytes");
    } else if (kg_py_get_ring(&v, &r) == 0) {
        memcpy(&copy, rec.buf, sizeof copy);
        res = PyBool_FromLong(kg_ring_push(r, &copy) == 0);
    }
    PyBuffer_Release(&rec);
    PyBuffer_Release(&v);
    return res;
}

static PyObject *m_ring_drain(PyObject *mod, PyObject *args)
{
    (void)mod;
    Py_buffer v;
    unsigned int max = 0xFFFFFFFFu;
    struct kg_ring *r;
    if (!PyArg_ParseTuple(args, "w*|I", &v, &max))
        return NULL;
    if (kg_py_get_ring(&v, &r) < 0) {
        PyBuffer_Release(&v);
        return NULL;
    }
    uint32_t n = r->capacity < max ? r->capacity : max;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n * (Py_ssize_t)sizeof(struct kg_record));
    if (out == NULL) {
        PyBuffer_Release(&v);
        return NULL;
    }
    struct kg_record *dst = (struct kg_record *)PyBytes_AS_STRING(out);
    uint32_t got = 0;
    while (got < n && kg_ring_pop(r, &dst[got]))
        got++;
    PyBuffer_Release(&v);
    if (_PyBytes_Resize(&out, (Py_ssize_t)got * (Py_ssize_t)sizeof(struct kg_record)) < 0)
        return NULL;
    return out;
}

static PyObject *m_record_fill(PyObject *mod, PyObject *args)
{
    /* record_fill((result, value, action, rule, flags), vcpu, rip, rip_valid, index, is_write,
     *             reason, data) -> 64 bytes */
    (void)mod;
    struct kg_decision d = {0};
    int result, action, flags, rip_valid, is_write;
    unsigned long long value, rip, data;
    unsigned int rule, vcpu, index, reason;
    if (!PyArg_ParseTuple(args, "(iKiIi)IKpIpIK", &result, &value, &action, &rule, &flags,
                          &vcpu, &rip, &rip_valid, &index, &is_write, &reason, &data))
        return NULL;
    d.result = (uint8_t)result;
    d.value = value;
    d.action = (uint8_t)action;
    d.rule = rule;
    d.flags = (uint8_t)flags;
    struct kg_record rec;
    kg_record_fill(&rec, &d, vcpu, rip, rip_valid, index, is_write, reason, data);
    return PyBytes_FromStringAndSize((const char *)&rec, sizeof rec);
}

static PyObject *m_host_done(PyObject *mod, PyObject *args)
{
    (void)mod;
    struct kg_decision d = {0};
    int result, action, flags, is_write, ok;
    unsigned long long value, got;
    unsigned int rule;
    if (!PyArg_ParseTuple(args, "(iKiIi)ppK", &result, &value, &action, &rule, &flags, &is_write,
                          &ok, &got))
        return NULL;
    d.result = (uint8_t)result;
    d.value = value;
    d.action = (uint8_t)action;
    d.rule = rule;
    d.flags = (uint8_t)flags;
    kg_host_done(&d, is_write, ok, got);
    return decision_tuple(&d);
}

static PyMethodDef module_methods[] = {
    {"validate", m_validate, METH_O, "validate(table) -> 0 or a negative KG_E_* code"},
    {"strerror", m_strerror, METH_O, "strerror(code) -> message"},
    {"state_size", m_state_size, METH_O, "state_size(nslots) -> bytes"},
    {"state_init", m_state_init, METH_VARARGS, "state_init(buffer, nslots)"},
    {"state_get", m_state_get, METH_VARARGS, "state_get(buffer, index) -> value or None"},
    {"ring_size", m_ring_size, METH_O, "ring_size(capacity) -> bytes"},
    {"ring_init", m_ring_init, METH_VARARGS, "ring_init(buffer, capacity)"},
    {"ring_push", m_ring_push, METH_VARARGS, "ring_push(buffer, record64) -> pushed"},
    {"ring_drain", m_ring_drain, METH_VARARGS, "ring_drain(buffer[, max]) -> records (bytes)"},
    {"record_fill", m_record_fill, METH_VARARGS, "record_fill(decision, vcpu, rip, rip_valid, "
     "index, is_write, reason, data) -> record (64 bytes)"},
    {"host_done", m_host_done, METH_VARARGS, "host_done(decision, is_write, ok, value) -> decision"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef engine_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "kvmgate.engine._engine",
    .m_doc = "The kvmgate C policy engine (csrc/engine.c).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__engine(void)
{
    if (PyType_Ready(&EngineType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&engine_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0 || kg_py_add_types(m) < 0 ||
        kg_py_add_event_types(m) < 0 ||
        PyModule_AddIntConstant(m, "API_VERSION", KG_API_VERSION) < 0 ||
        PyModule_AddIntConstant(m, "TABLE_VERSION", KG_TABLE_VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

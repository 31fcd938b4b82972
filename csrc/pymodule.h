/* Shared between the files of the kvmgate.engine._engine extension (engine_module.c: Engine
 * and the module; loop_module.c: Loop, Rules, Audit). */
#ifndef KVMGATE_PYMODULE_H
#define KVMGATE_PYMODULE_H
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "engine.h"

typedef struct {
    PyObject_HEAD
    struct kg_table_header *table;  /* aligned private copy */
    Py_buffer state_view;
    int has_state;
} EngineObject;

extern PyTypeObject EngineType;

/* An initialised kg_ring of this buffer's size (64-byte aligned), else ValueError. */
int kg_py_get_ring(Py_buffer *v, struct kg_ring **out);
/* Adds Loop, Rules, Audit and the formatting functions to the module. */
int kg_py_add_types(PyObject *m);

/* event_module.c: EventPort (csrc/kvmi_event.h) */
struct kg_ev_port;
extern PyTypeObject EventPortType;
/* The port of an EventPort object, else NULL with TypeError. */
struct kg_ev_port *kg_py_event_port(PyObject *obj);
int kg_py_add_event_types(PyObject *m);

#endif

/* kvmgate audit drain (auditfmt.h).  The record semantics are those of kvmgate/audit.py
 * (AuditLog.record / count) and kvmgate/engine/ring.py (decode); tests/differential/
 * test_audit_format.py holds the lines equal to audit.py's. */
#define _POSIX_C_SOURCE 200809L
#include "auditfmt.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct bucket {
    uint64_t key;                   /* index << 1 | is_write, +1 (0: free slot) */
    double tokens, last;
    uint64_t owed;                  /* suppressed since the last written record */
    uint64_t init;                  /* tokens and last set */
};

struct name {
    uint64_t key;                   /* index + 1 (0: free) */
    char *json;
    size_t len;
};

struct line {                       /* one formatted, uncommitted record */
    uint64_t bucket;                /* bucket key */
    uint64_t suppressed_before;
    uint32_t row;
};

struct kg_audit {
    double rate, burst;
    struct bucket *b;
    size_t nb, capb;                /* used, slots (power of two) */
    struct name *names;
    size_t nn, capn;
    struct kg_audit_row *rows;
    size_t nrows, caprows;
    uint32_t *rowslot;              /* row index + 1 by hash; caprowslot slots */
    size_t caprowslot;
    uint64_t suppressed;
    struct line *lines;
    size_t nlines, caplines;
    char *buf;
    size_t len, cap;
};

static uint64_t mix(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    return x ^ (x >> 33);
}

struct kg_audit *kg_audit_new(double rate, double burst)
{
    struct kg_audit *a = calloc(1, sizeof *a);
    if (a == NULL)
        return NULL;
    a->rate = rate;
    a->burst = burst;
    return a;
}

void kg_audit_free(struct kg_audit *a)
{
    if (a == NULL)
        return;
    for (size_t i = 0; i < a->capn; i++)
        free(a->names[i].json);
    free(a->names);
    free(a->b);
    free(a->rows);
    free(a->rowslot);
    free(a->lines);
    free(a->buf);
    free(a);
}

void kg_audit_configure(struct kg_audit *a, double rate, double burst)
{
    a->rate = rate;
    a->burst = burst;
}

/* ---------------------------------------------------------------- tables */

static struct bucket *bucket_find(struct kg_audit *a, uint64_t key, int create)
{
    if (create && (a->nb + 1) * 2 > a->capb) {
        size_t cap = a->capb ? a->capb * 2 : 64;
        struct bucket *nb = calloc(cap, sizeof *nb);
        if (nb == NULL)
            return NULL;
        for (size_t i = 0; i < a->capb; i++) {
            if (!a->b[i].key)
                continue;
            size_t j = mix(a->b[i].key) & (cap - 1);
            while (nb[j].key)
                j = (j + 1) & (cap - 1);
            nb[j] = a->b[i];
        }
        free(a->b);
        a->b = nb;
        a->capb = cap;
    }
    if (a->capb == 0)
        return NULL;
    size_t j = mix(key) & (a->capb - 1);
    while (a->b[j].key && a->b[j].key != key)
        j = (j + 1) & (a->capb - 1);
    if (a->b[j].key == key)
        return &a->b[j];
    if (!create)
        return NULL;
    a->b[j].key = key;
    a->nb++;
    return &a->b[j];
}

static struct name *name_find(struct kg_audit *a, uint32_t index)
{
    if (a->capn == 0)
        return NULL;
    uint64_t key = (uint64_t)index + 1;
    size_t j = mix(key) & (a->capn - 1);
    while (a->names[j].key && a->names[j].key != key)
        j = (j + 1) & (a->capn - 1);
    return a->names[j].key == key ? &a->names[j] : NULL;
}

int kg_audit_set_name(struct kg_audit *a, uint32_t index, const char *json, size_t len)
{
    struct name *n = name_find(a, index);
    char *copy = malloc(len + 1);
    if (copy == NULL)
        return KG_AUDIT_NOMEM;
    memcpy(copy, json, len);
    copy[len] = 0;
    if (n != NULL) {
        free(n->json);
        n->json = copy;
        n->len = len;
        return 0;
    }
    if ((a->nn + 1) * 2 > a->capn) {
        size_t cap = a->capn ? a->capn * 2 : 64;
        struct name *nt = calloc(cap, sizeof *nt);
        if (nt == NULL) {
            free(copy);
            return KG_AUDIT_NOMEM;
        }
        for (size_t i = 0; i < a->capn; i++) {
            if (!a->names[i].key)
                continue;
            size_t j = mix(a->names[i].key) & (cap - 1);
            while (nt[j].key)
                j = (j + 1) & (cap - 1);
            nt[j] = a->names[i];
        }
        free(a->names);
        a->names = nt;
        a->capn = cap;
    }
    uint64_t key = (uint64_t)index + 1;
    size_t j = mix(key) & (a->capn - 1);
    while (a->names[j].key)
        j = (j + 1) & (a->capn - 1);
    a->names[j] = (struct name){key, copy, len};
    a->nn++;
    return 0;
}

static uint64_t row_hash(const struct kg_audit_row *r)
{
    return mix(((uint64_t)r->index << 24 | (uint64_t)r->flags << 16 | (uint64_t)r->action << 8 |
                r->result) ^ mix(r->value));
}

static int row_same(const struct kg_audit_row *x, const struct kg_audit_row *y)
{
    return x->index == y->index && x->flags == y->flags && x->action == y->action &&
           x->result == y->result && x->value == y->value;
}

static int rows_rehash(struct kg_audit *a, size_t cap)
{
    uint32_t *slots = calloc(cap, sizeof *slots);
    if (slots == NULL)
        return -1;
    for (size_t i = 0; i < a->nrows; i++) {
        size_t j = row_hash(&a->rows[i]) & (cap - 1);
        while (slots[j])
            j = (j + 1) & (cap - 1);
        slots[j] = (uint32_t)i + 1;
    }
    free(a->rowslot);
    a->rowslot = slots;
    a->caprowslot = cap;
    return 0;
}

/* The row of this decision (made if new), or -1 without memory. */
static long row_of(struct kg_audit *a, const struct kg_record *r)
{
    struct kg_audit_row k = {
        .index = r->index, .flags = (uint8_t)(r->flags & (KG_RF_WRITE | KG_RF_WOULD_DENY)),
        .action = r->action, .result = r->result,
        .value = r->result == KG_RES_VALUE ? r->value : 0,
    };
    if ((a->nrows + 1) * 2 > a->caprowslot &&
        rows_rehash(a, a->caprowslot ? a->caprowslot * 2 : 64) < 0)
        return -1;
    size_t j = row_hash(&k) & (a->caprowslot - 1);
    while (a->rowslot[j]) {
        if (row_same(&a->rows[a->rowslot[j] - 1], &k))
            return (long)a->rowslot[j] - 1;
        j = (j + 1) & (a->caprowslot - 1);
    }
    if (a->nrows == a->caprows) {
        size_t cap = a->caprows ? a->caprows * 2 : 32;
        struct kg_audit_row *nr = realloc(a->rows, cap * sizeof *nr);
        if (nr == NULL)
            return -1;
        a->rows = nr;
        a->caprows = cap;
    }
    a->rows[a->nrows] = k;
    a->rowslot[j] = (uint32_t)a->nrows + 1;
    return (long)a->nrows++;
}

const struct kg_audit_row *kg_audit_rows(const struct kg_audit *a, size_t *n,
                                         uint64_t *suppressed)
{
    *n = a->nrows;
    *suppressed = a->suppressed;
    return a->rows;
}

void kg_audit_clear_rows(struct kg_audit *a)
{
    /* uncommitted lines refer to rows: keep them until the commit */
    if (a->nlines)
        return;
    a->nrows = 0;
    a->suppressed = 0;
    if (a->rowslot)
        memset(a->rowslot, 0, a->caprowslot * sizeof *a->rowslot);
}

size_t kg_audit_take_owed(struct kg_audit *a, struct kg_audit_owed *out, size_t cap)
{
    size_t n = 0;
    for (size_t i = 0; i < a->capb && n < cap; i++) {
        struct bucket *b = &a->b[i];
        if (b->key && b->owed) {
            out[n++] = (struct kg_audit_owed){(uint32_t)((b->key - 1) >> 1),
                                              (uint32_t)((b->key - 1) & 1), b->owed};
            b->owed = 0;
        }
    }
    return n;
}

/* ---------------------------------------------------------------- formatting */

struct out {
    char *p;
    size_t n, cap;                  /* written (may exceed cap: then truncated) */
};

static void put(struct out *o, const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++, o->n++)
        if (o->n + 1 < o->cap)
            o->p[o->n] = s[i];
    if (o->cap)
        o->p[o->n < o->cap ? o->n : o->cap - 1] = 0;
}

static void puts_(struct out *o, const char *s)
{
    put(o, s, strlen(s));
}

static void put_hex(struct out *o, uint64_t v)
{
    char b[24];
    int k = snprintf(b, sizeof b, "\"0x%" PRIx64 "\"", v);
    put(o, b, (size_t)k);
}

static void put_u64(struct out *o, uint64_t v)
{
    char b[24];
    int k = snprintf(b, sizeof b, "%" PRIu64, v);
    put(o, b, (size_t)k);
}

size_t kg_audit_time(char *out, double t)
{
    /* round(t, 6): correctly rounded to 6 decimals, back to the nearest double */
    char tmp[400];
    snprintf(tmp, sizeof tmp, "%.6f", t);
    double x = strtod(tmp, NULL);
    /* repr(): the shortest digits that read back as x */
    char e[40];
    int p;
    for (p = 1; p < 17; p++) {
        snprintf(e, sizeof e, "%.*e", p - 1, x);
        if (strtod(e, NULL) == x)
            break;
    }
    snprintf(e, sizeof e, "%.*e", p - 1, x);
    char digits[24];
    size_t nd = 0;
    const char *s = e;
    int neg = *s == '-';
    if (neg)
        s++;
    for (; *s && *s != 'e'; s++)
        if (*s >= '0' && *s <= '9')
            digits[nd++] = *s;
    int exp10 = *s == 'e' ? atoi(s + 1) : 0;
    while (nd > 1 && digits[nd - 1] == '0')
        nd--;
    size_t n = 0;
    if (neg)
        out[n++] = '-';
    int decpt = exp10 + 1;
    if (decpt <= -4 || decpt > 16) {       /* Python's repr switches to exponent notation */
        out[n++] = digits[0];
        if (nd > 1) {
            out[n++] = '.';
            for (size_t i = 1; i < nd; i++)
                out[n++] = digits[i];
        }
        n += (size_t)sprintf(out + n, "e%c%02d", exp10 < 0 ? '-' : '+', exp10 < 0 ? -exp10 : exp10);
        return n;
    }
    if (decpt <= 0) {
        out[n++] = '0';
        out[n++] = '.';
        for (int i = 0; i < -decpt; i++)
            out[n++] = '0';
        for (size_t i = 0; i < nd; i++)
            out[n++] = digits[i];
    } else if ((size_t)decpt < nd) {
        for (size_t i = 0; i < nd; i++) {
            if (i == (size_t)decpt)
                out[n++] = '.';
            out[n++] = digits[i];
        }
    } else {
        for (size_t i = 0; i < nd; i++)
            out[n++] = digits[i];
        for (size_t i = nd; i < (size_t)decpt; i++)
            out[n++] = '0';
        out[n++] = '.';
        out[n++] = '0';
    }
    out[n] = 0;
    return n;
}

static const char *const ACTIONS[] = {NULL, "deny", "ignore", "constant", "emulate", "forward"};

size_t kg_audit_format(char *buf, size_t cap, const struct kg_record *r, const char *name,
                       size_t name_len, const char *rule, size_t rule_len,
                       uint64_t suppressed_before)
{
    struct out o = {buf, 0, cap};
    char t[48];
    if (cap)
        buf[0] = 0;
    puts_(&o, "{\"schema\": 1, \"time\": ");
    put(&o, t, kg_audit_time(t, (double)r->time_ns / 1e9));
    puts_(&o, ", \"vcpu\": ");
    put_u64(&o, r->vcpu);
    puts_(&o, ", \"rip\": ");
    if (r->flags & KG_RF_RIP)
        put_hex(&o, r->rip);
    else
        puts_(&o, "null");
    puts_(&o, ", \"msr\": ");
    put_hex(&o, r->index);
    puts_(&o, ", \"name\": ");
    put(&o, name, name_len);
    puts_(&o, (r->flags & KG_RF_WRITE) ? ", \"access\": \"write\", \"value\": "
                                        : ", \"access\": \"read\", \"value\": ");
    put_hex(&o, r->data);
    puts_(&o, ", \"reason\": \"");
    if (r->reason == KG_REASON_FILTER)
        puts_(&o, "FILTER");
    else if (r->reason == KG_REASON_UNKNOWN)
        puts_(&o, "UNKNOWN");
    else if (r->reason == KG_REASON_INVAL)
        puts_(&o, "INVAL");
    else {
        char b[32];
        put(&o, b, (size_t)snprintf(b, sizeof b, "reason(0x%x)", r->reason));
    }
    puts_(&o, "\", \"action\": \"");
    if (r->action >= 1 && r->action <= KG_ACT_MAX) {
        puts_(&o, ACTIONS[r->action]);
    } else {
        char b[32];
        put(&o, b, (size_t)snprintf(b, sizeof b, "action(%u)", r->action));
    }
    puts_(&o, "\", \"result\": \"");
    switch (r->result) {
    case KG_RES_VALUE: {
        char b[24];
        put(&o, b, (size_t)snprintf(b, sizeof b, "read 0x%" PRIx64, r->value));
        break;
    }
    case KG_RES_WRITTEN: puts_(&o, "written"); break;
    case KG_RES_DROPPED: puts_(&o, "dropped"); break;
    case KG_RES_GP: puts_(&o, "#GP"); break;
    default: puts_(&o, "host access pending"); break;
    }
    if (r->flags & KG_RF_WOULD_DENY)
        puts_(&o, " (would #GP)");
    puts_(&o, "\"");
    if (rule_len > 2) {                     /* json.dumps("") is "\"\"": no key */
        puts_(&o, ", \"rule\": ");
        put(&o, rule, rule_len);
    }
    if (suppressed_before) {
        puts_(&o, ", \"suppressed_before\": ");
        put_u64(&o, suppressed_before);
    }
    puts_(&o, "}\n");
    return o.n;
}

/* ---------------------------------------------------------------- drain */

static int reserve(struct kg_audit *a, size_t more)
{
    if (a->len + more <= a->cap)
        return 0;
    size_t cap = a->cap ? a->cap : 4096;
    while (cap < a->len + more)
        cap *= 2;
    char *nb = realloc(a->buf, cap);
    if (nb == NULL)
        return -1;
    a->buf = nb;
    a->cap = cap;
    return 0;
}

int kg_audit_drain(struct kg_audit *a, struct kg_ring *ring, const struct kg_audit_rules *rules,
                   size_t max_bytes, uint32_t *missing)
{
    uint32_t capm = ring->capacity - 1;
    for (;;) {
        if (a->len >= max_bytes)
            return KG_AUDIT_FULL;
        uint64_t tail = __atomic_load_n(&ring->tail, __ATOMIC_RELAXED);
        uint64_t head = __atomic_load_n(&ring->head, __ATOMIC_ACQUIRE);
        if (head == tail || head - tail > ring->capacity)
            return KG_AUDIT_EMPTY;
        const struct kg_record *r = &ring->records[tail & capm];
        struct name *nm = NULL;
        int logged = (r->flags & KG_RF_LOG) != 0;
        if (logged) {
            nm = name_find(a, r->index);
            if (nm == NULL) {
                *missing = r->index;
                return KG_AUDIT_NAME;
            }
        }
        long row = row_of(a, r);
        if (row < 0)
            return KG_AUDIT_NOMEM;
        struct kg_record rec = *r;
        if (logged) {
            uint64_t key = ((uint64_t)rec.index << 1 | (rec.flags & KG_RF_WRITE ? 1u : 0u)) + 1;
            struct bucket *b = bucket_find(a, key, 1);
            if (b == NULL)
                return KG_AUDIT_NOMEM;
            double now = (double)rec.time_ns / 1e9;
            if (!b->init) {                 /* audit.py: [float(burst), now, 0] */
                b->init = 1;
                b->tokens = a->burst;
                b->last = now;
            }
            double t = b->tokens + (now - b->last) * a->rate;
            b->tokens = t < a->burst ? t : a->burst;
            b->last = now;
            if (b->tokens < 1) {
                b->owed++;
                a->suppressed++;
                a->rows[row].unlogged++;
                a->rows[row].count++;
            } else {
                const char *rule = "\"\"";
                size_t rule_len = 2;
                if (rec.rule != KG_NONE && rules != NULL && rec.rule < rules->n) {
                    rule = rules->json[rec.rule];
                    rule_len = rules->len[rec.rule];
                }
                size_t need = 512 + nm->len + rule_len;
                if (reserve(a, need) < 0)
                    return KG_AUDIT_NOMEM;
                if (a->nlines == a->caplines) {
                    size_t cap = a->caplines ? a->caplines * 2 : 64;
                    struct line *nl = realloc(a->lines, cap * sizeof *nl);
                    if (nl == NULL)
                        return KG_AUDIT_NOMEM;
                    a->lines = nl;
                    a->caplines = cap;
                }
                b->tokens -= 1;
                uint64_t sb = b->owed;
                b->owed = 0;
                a->len += kg_audit_format(a->buf + a->len, a->cap - a->len, &rec, nm->json,
                                          nm->len, rule, rule_len, sb);
                a->lines[a->nlines++] = (struct line){key, sb, (uint32_t)row};
                a->rows[row].count++;
            }
        } else {
            a->rows[row].count++;
        }
        __atomic_store_n(&ring->tail, tail + 1, __ATOMIC_RELEASE);
    }
}

const char *kg_audit_buffer(const struct kg_audit *a, size_t *len, uint32_t *lines)
{
    *len = a->len;
    *lines = (uint32_t)a->nlines;
    return a->buf;
}

void kg_audit_commit(struct kg_audit *a, size_t written)
{
    {
        for (size_t i = written; i < a->nlines; i++) {
            struct line *l = &a->lines[i];
            struct bucket *b = bucket_find(a, l->bucket, 0);
            if (b != NULL)
                b->owed += l->suppressed_before;     /* still owed to the log */
            a->rows[l->row].unlogged++;
        }
    }
    a->nlines = 0;
    a->len = 0;
}

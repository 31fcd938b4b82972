/* kvmgate policy engine: see engine.h.  The semantics are those of kvmgate/policy/handlers.py
 * (perform / make_handler); the differential tests in tests/differential/test_engine*.py hold
 * the two equal. */
#define _POSIX_C_SOURCE 200809L
#include "engine.h"
#include "sorted.h"

#include <time.h>

#if !defined(__x86_64__)
#error "kvmgate engine: x86-64 only (cmpxchg16b for the emulated registers)"
#endif

_Static_assert(sizeof(struct kg_table_header) == 64, "kg_table_header is 64 bytes");
_Static_assert(sizeof(struct kg_action) == 48, "kg_action is 48 bytes");
_Static_assert(sizeof(struct kg_span) == 16, "kg_span is 16 bytes");
_Static_assert(sizeof(struct kg_reg) == 16, "kg_reg is 16 bytes");
_Static_assert(sizeof(struct kg_state) == 16, "kg_state header is 16 bytes");
_Static_assert(sizeof(struct kg_record) == 64, "kg_record is 64 bytes");
_Static_assert(sizeof(struct kg_ring) == 192, "kg_ring header is 192 bytes");
_Static_assert(sizeof(struct kg_decision) == 16, "kg_decision is 16 bytes");

/* ---------------------------------------------------------------- table */

static uint32_t crc32_update(uint32_t crc, const uint8_t *p, size_t n)
{
    /* zlib's CRC-32 (reflected 0xEDB88320), bitwise: only run at validation time */
    for (size_t i = 0; i < n; i++) {
        crc ^= p[i];
        for (int k = 0; k < 8; k++)
            crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
    }
    return crc;
}

static uint32_t table_crc(const uint8_t *b, size_t size)
{
    static const uint8_t zero[4] = {0, 0, 0, 0};
    uint32_t crc = 0xFFFFFFFFu;
    size_t off = offsetof(struct kg_table_header, checksum);
    crc = crc32_update(crc, b, off);
    crc = crc32_update(crc, zero, 4);
    crc = crc32_update(crc, b + off + 4, size - off - 4);
    return crc ^ 0xFFFFFFFFu;
}

static const struct kg_action *actions_of(const struct kg_table_header *t)
{
    return (const struct kg_action *)((const uint8_t *)t + t->header_size);
}

static const struct kg_span *spans_of(const struct kg_table_header *t, int is_write)
{
    const struct kg_span *s = (const struct kg_span *)(actions_of(t) + t->nactions);
    return is_write ? s + t->nspans_read : s;
}

static const uint64_t *allowed_of(const struct kg_table_header *t)
{
    return (const uint64_t *)(spans_of(t, 1) + t->nspans_write);
}

static int check_spans(const struct kg_span *s, uint32_t n, uint32_t nactions)
{
    for (uint32_t i = 0; i < n; i++) {
        if (s[i].lo > s[i].hi || s[i].action >= nactions || s[i].reserved)
            return KG_E_SPAN;
        if (i && s[i - 1].hi >= s[i].lo)
            return KG_E_SPAN;
    }
    return KG_OK;
}

int kg_table_validate(const void *buf, size_t len)
{
    const struct kg_table_header *t = buf;
    if ((uintptr_t)buf & 7u)
        return KG_E_ALIGN;
    if (buf == NULL || len < sizeof *t)
        return KG_E_SHORT;
    if (t->magic != KG_TABLE_MAGIC)
        return KG_E_MAGIC;
    if (t->version != KG_TABLE_VERSION)
        return KG_E_VERSION;
    if (t->header_size != sizeof *t)
        return KG_E_SIZE;
    if (t->size > len)
        return KG_E_SHORT;
    uint64_t need = (uint64_t)sizeof *t + (uint64_t)t->nactions * sizeof(struct kg_action) +
                    ((uint64_t)t->nspans_read + t->nspans_write) * sizeof(struct kg_span) +
                    (uint64_t)t->nallowed * sizeof(uint64_t);
    if (need != t->size)
        return KG_E_SIZE;
    if (table_crc(buf, t->size) != t->checksum)
        return KG_E_CHECKSUM;
    if (t->reserved[0] || t->reserved[1] || t->reserved[2])
        return KG_E_RESERVED;
    if (t->mode != KG_MODE_ENFORCE && t->mode != KG_MODE_AUDIT)
        return KG_E_MODE;
    const struct kg_action *a = actions_of(t);
    for (uint32_t i = 0; i < t->nactions; i++) {
        const struct kg_action *x = &a[i];
        if (x->kind < KG_ACT_DENY || x->kind > KG_ACT_MAX)
            return KG_E_ACTION;
        if (x->flags & ~(KG_AF_LOG | KG_AF_WRITES_GP | KG_AF_HAS_ALLOWED))
            return KG_E_ACTION;
        if (x->reserved || x->reserved2[0] || x->reserved2[1])
            return KG_E_ACTION;
        if ((x->flags & KG_AF_WRITES_GP) && x->kind != KG_ACT_CONSTANT)
            return KG_E_ACTION;
        if (x->kind != KG_ACT_EMULATE && x->write_mask)
            return KG_E_ACTION;
        if (x->kind != KG_ACT_CONSTANT && x->kind != KG_ACT_EMULATE && x->value)
            return KG_E_ACTION;
        if (x->flags & KG_AF_HAS_ALLOWED) {
            if (x->kind != KG_ACT_EMULATE)
                return KG_E_ACTION;
            if ((uint64_t)x->allowed_off + x->allowed_n > t->nallowed)
                return KG_E_ACTION;
            const uint64_t *v = allowed_of(t) + x->allowed_off;
            for (uint32_t k = 1; k < x->allowed_n; k++)
                if (v[k - 1] >= v[k])
                    return KG_E_ALLOWED;
        } else if (x->allowed_off || x->allowed_n) {
            return KG_E_ACTION;
        }
    }
    int rc = check_spans(spans_of(t, 0), t->nspans_read, t->nactions);
    if (rc == KG_OK)
        rc = check_spans(spans_of(t, 1), t->nspans_write, t->nactions);
    if (rc != KG_OK)
        return rc;
    uint32_t refs[3] = {t->default_action, t->unknown_action, t->invalid_action};
    for (int i = 0; i < 3; i++)
        if (refs[i] != KG_NONE && refs[i] >= t->nactions)
            return KG_E_HEADER_REF;
    return KG_OK;
}

const char *kg_strerror(int code)
{
    switch (code) {
    case KG_OK: return "ok";
    case KG_E_SHORT: return "table truncated: shorter than its header or its stated size";
    case KG_E_MAGIC: return "not a kvmgate engine table (bad magic)";
    case KG_E_VERSION: return "unsupported table version";
    case KG_E_SIZE: return "table size does not match its section counts";
    case KG_E_CHECKSUM: return "table checksum mismatch";
    case KG_E_MODE: return "unknown mode";
    case KG_E_ACTION: return "malformed action (kind, flags, fields or allowed slice)";
    case KG_E_SPAN: return "malformed span list (unsorted, overlapping, lo > hi or bad action)";
    case KG_E_HEADER_REF: return "default/unknown/invalid action out of range";
    case KG_E_ALLOWED: return "allowed values not strictly ascending";
    case KG_E_ALIGN: return "table not 8-byte aligned";
    case KG_E_RESERVED: return "reserved header fields not zero";
    default: return "unknown error";
    }
}

/* ---------------------------------------------------------------- registers */

static int cas16(struct kg_reg *p, uint64_t *value, uint64_t *meta, uint64_t nvalue, uint64_t nmeta)
{
    /* lock cmpxchg16b: rdx:rax = expected (meta:value), rcx:rbx = new; on failure the current
     * contents land in rdx:rax */
    uint8_t ok;
    __asm__ __volatile__("lock cmpxchg16b %1\n\tsetz %0"
                         : "=q"(ok), "+m"(*p), "+a"(*value), "+d"(*meta)
                         : "b"(nvalue), "c"(nmeta)
                         : "memory", "cc");
    return ok;
}

static uint32_t slot_hash(uint32_t index)
{
    return index * 0x9E3779B1u;     /* Fibonacci hashing; the mask keeps the low bits */
}

static uint64_t meta_of(uint32_t index)
{
    return (uint64_t)index << 1 | 1u;
}

size_t kg_state_size(uint32_t nslots)
{
    return sizeof(struct kg_state) + (size_t)nslots * sizeof(struct kg_reg);
}

int kg_state_init(void *mem, size_t len, uint32_t nslots)
{
    if (mem == NULL || ((uintptr_t)mem & 15u) || nslots == 0 || (nslots & (nslots - 1)) ||
        len < kg_state_size(nslots))
        return -1;
    struct kg_state *s = mem;
    uint8_t *b = mem;
    for (size_t i = 0; i < kg_state_size(nslots); i++)
        b[i] = 0;
    s->nslots = nslots;
    __atomic_store_n(&s->magic, KG_STATE_MAGIC, __ATOMIC_RELEASE);
    return 0;
}

/* The slot holding `index`, or the first free slot of its probe sequence (NULL if full). */
static struct kg_reg *probe(struct kg_state *s, uint32_t index, uint64_t *meta)
{
    uint32_t mask = s->nslots - 1, h = slot_hash(index);
    for (uint32_t i = 0; i < s->nslots; i++) {
        struct kg_reg *r = &s->slots[(h + i) & mask];
        uint64_t m = __atomic_load_n(&r->meta, __ATOMIC_ACQUIRE);
        if (m == 0 || m == meta_of(index)) {
            *meta = m;
            return r;
        }
    }
    return NULL;
}

int kg_state_get(const struct kg_state *s, uint32_t index, uint64_t *value)
{
    uint64_t m;
    struct kg_reg *r = probe((struct kg_state *)s, index, &m);
    if (r == NULL || m == 0)
        return 0;
    *value = __atomic_load_n(&r->value, __ATOMIC_ACQUIRE);
    return 1;
}

static int refused(const struct kg_table_header *t, const struct kg_action *a, uint64_t cur,
                   uint64_t new)
{
    /* handlers.perform: (new ^ cur) & ~write_mask or (allowed is not None and new not in allowed) */
    if ((new ^ cur) & ~a->write_mask)
        return 1;
    if (!(a->flags & KG_AF_HAS_ALLOWED))
        return 0;
    return !kg_sorted_has64(allowed_of(t) + a->allowed_off, a->allowed_n, new);
}

/* emulate write: check-and-set against the register (or the initial value if never written) */
static uint8_t emulate_write(const struct kg_table_header *t, struct kg_state *s,
                             const struct kg_action *a, uint32_t index, uint64_t data,
                             uint8_t *flags)
{
    if (s == NULL)
        return refused(t, a, a->value, data) ? KG_RES_GP : KG_RES_WRITTEN;
    uint32_t mask = s->nslots - 1, h = slot_hash(index);
    uint64_t key = meta_of(index);
    for (uint32_t i = 0; i < s->nslots; i++) {
        struct kg_reg *r = &s->slots[(h + i) & mask];
        uint64_t m = __atomic_load_n(&r->meta, __ATOMIC_ACQUIRE);
        uint64_t v = __atomic_load_n(&r->value, __ATOMIC_ACQUIRE);
        if (m != 0 && m != key)
            continue;
        for (;;) {
            uint64_t cur = m == 0 ? a->value : v;
            if (m == 0)
                v = 0;                      /* a free slot is all zero */
            if (refused(t, a, cur, data))
                return KG_RES_GP;
            if (cas16(r, &v, &m, data, key))
                return KG_RES_WRITTEN;
            if (m != key)
                break;                      /* another MSR claimed this slot: probe on */
        }
    }
    *flags |= KG_DF_STATE_FULL;
    return KG_RES_GP;
}

/* ---------------------------------------------------------------- decide */

static const struct kg_action *lookup(const struct kg_table_header *t, uint32_t index,
                                      int is_write, uint32_t reason)
{
    uint32_t ai;
    if (reason == KG_REASON_FILTER) {
        const struct kg_span *sp = spans_of(t, is_write);
        uint32_t n = is_write ? t->nspans_write : t->nspans_read, lo = 0, hi = n;
        while (lo < hi) {
            uint32_t mid = lo + (hi - lo) / 2;
            if (sp[mid].hi < index)
                lo = mid + 1;
            else
                hi = mid;
        }
        ai = (lo < n && sp[lo].lo <= index) ? sp[lo].action : t->default_action;
    } else if (reason == KG_REASON_UNKNOWN) {
        ai = t->unknown_action;
    } else if (reason == KG_REASON_INVAL) {
        ai = t->invalid_action;
    } else {
        ai = KG_NONE;
    }
    return ai == KG_NONE ? NULL : actions_of(t) + ai;
}

int kg_decide(const struct kg_table_header *t, struct kg_state *s, uint32_t index, int is_write,
              uint32_t reason, uint64_t data, struct kg_decision *out)
{
    const struct kg_action *a = lookup(t, index, is_write, reason);
    out->value = 0;
    out->reserved = 0;
    if (a == NULL) {
        out->rule = KG_NONE;
        out->result = KG_RES_GP;
        out->action = KG_ACT_NONE;
        out->flags = 0;
        return 0;
    }
    uint8_t flags = KG_DF_COUNT | ((a->flags & KG_AF_LOG) ? KG_DF_LOG : 0);
    uint8_t result;
    switch (a->kind) {
    case KG_ACT_IGNORE:
        result = is_write ? KG_RES_DROPPED : KG_RES_VALUE;
        break;
    case KG_ACT_CONSTANT:
        if (is_write) {
            result = (a->flags & KG_AF_WRITES_GP) ? KG_RES_GP : KG_RES_DROPPED;
        } else {
            result = KG_RES_VALUE;
            out->value = a->value;
        }
        break;
    case KG_ACT_EMULATE:
        if (is_write) {
            flags |= KG_DF_VALUE_DEP;
            result = emulate_write(t, s, a, index, data, &flags);
        } else {
            uint64_t v;
            result = KG_RES_VALUE;
            out->value = (s != NULL && kg_state_get(s, index, &v)) ? v : a->value;
        }
        break;
    case KG_ACT_FORWARD:
        result = KG_RES_HOST;
        break;
    default:                                /* KG_ACT_DENY */
        result = KG_RES_GP;
        break;
    }
    if (result == KG_RES_GP && t->mode == KG_MODE_AUDIT && reason == KG_REASON_FILTER &&
        !(flags & KG_DF_STATE_FULL)) {
        /* permissive: log that the policy would deny, let the access happen as KVM would */
        result = KG_RES_HOST;
        flags |= KG_DF_WOULD_DENY | KG_DF_LOG;
    }
    out->rule = a->rule;
    out->result = result;
    out->action = a->kind;
    out->flags = flags;
    return 0;
}

void kg_host_done(struct kg_decision *d, int is_write, int ok, uint64_t value)
{
    if (!ok) {
        d->result = KG_RES_GP;
    } else if (is_write) {
        d->result = KG_RES_WRITTEN;
    } else {
        d->result = KG_RES_VALUE;
        d->value = value;
    }
}

/* ---------------------------------------------------------------- records and rings */

void kg_record_fill(struct kg_record *r, const struct kg_decision *d, uint32_t vcpu,
                    uint64_t rip, int rip_valid, uint32_t index, int is_write, uint32_t reason,
                    uint64_t data)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    r->time_ns = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
    r->rip = rip_valid ? rip : 0;
    r->data = data;
    r->value = d->result == KG_RES_VALUE ? d->value : 0;
    r->index = index;
    r->vcpu = vcpu;
    r->rule = d->rule;
    r->reason = (uint8_t)reason;
    r->action = d->action;
    r->result = d->result;
    r->flags = (uint8_t)((is_write ? KG_RF_WRITE : 0) | (rip_valid ? KG_RF_RIP : 0) |
                         ((d->flags & KG_DF_LOG) ? KG_RF_LOG : 0) |
                         ((d->flags & KG_DF_WOULD_DENY) ? KG_RF_WOULD_DENY : 0));
    r->reserved[0] = r->reserved[1] = 0;
}

size_t kg_ring_size(uint32_t capacity)
{
    return sizeof(struct kg_ring) + (size_t)capacity * sizeof(struct kg_record);
}

int kg_ring_init(void *mem, size_t len, uint32_t capacity)
{
    if (mem == NULL || ((uintptr_t)mem & 63u) || capacity < 2 || (capacity & (capacity - 1)) ||
        len < kg_ring_size(capacity))
        return -1;
    uint8_t *b = mem;
    for (size_t i = 0; i < sizeof(struct kg_ring); i++)
        b[i] = 0;
    struct kg_ring *r = mem;
    r->version = 1;
    r->capacity = capacity;
    r->record_size = sizeof(struct kg_record);
    __atomic_store_n(&r->magic, KG_RING_MAGIC, __ATOMIC_RELEASE);
    return 0;
}

int kg_ring_push(struct kg_ring *r, const struct kg_record *rec)
{
    uint64_t head = __atomic_load_n(&r->head, __ATOMIC_RELAXED);
    uint64_t tail = __atomic_load_n(&r->tail, __ATOMIC_ACQUIRE);
    uint32_t cap = r->capacity;
    if (head - tail >= cap) {
        __atomic_store_n(&r->dropped, __atomic_load_n(&r->dropped, __ATOMIC_RELAXED) + 1,
                         __ATOMIC_RELAXED);
        return -1;
    }
    r->records[head & (cap - 1)] = *rec;
    __atomic_store_n(&r->head, head + 1, __ATOMIC_RELEASE);
    return 0;
}

int kg_ring_pop(struct kg_ring *r, struct kg_record *out)
{
    uint64_t tail = __atomic_load_n(&r->tail, __ATOMIC_RELAXED);
    uint64_t head = __atomic_load_n(&r->head, __ATOMIC_ACQUIRE);
    uint32_t cap = r->capacity;
    if (head == tail || head - tail > cap)
        return 0;
    *out = r->records[tail & (cap - 1)];
    __atomic_store_n(&r->tail, tail + 1, __ATOMIC_RELEASE);
    return 1;
}

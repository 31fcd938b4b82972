/* Sanitizer harness for the policy engine (built by tests/unit/test_engine_c.py with
 * -fsanitize=address,undefined -fno-sanitize-recover):
 *   1. random well-formed tables pass kg_table_validate; kg_decide on random exits keeps its
 *      invariants;
 *   2. mutated tables (bytes flipped, truncated, grown; checksum fixed up or not) never make the
 *      validator or, when accepted, kg_decide touch memory outside the table;
 *   3. emulated registers under concurrent check-and-set writes from several threads hold only
 *      values that were written, and registers of different MSRs stay separate;
 *   4. a ring with a producer and a consumer thread: records arrive in order, none twice,
 *      popped + dropped == pushed.
 * Usage: test_engine [seed] [iterations].  Prints "ok ..." and exits 0, or names the failure. */
#include "engine.c"

#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t rng_state;

static uint64_t rnd(void)
{
    uint64_t x = rng_state;             /* xorshift64* */
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    rng_state = x;
    return x * 0x2545F4914F6CDD1Dull;
}

static uint32_t below(uint32_t n)
{
    return n ? (uint32_t)(rnd() % n) : 0;
}

#define CHECK(cond, ...)                                                   \
    do {                                                                   \
        if (!(cond)) {                                                     \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                  \
            fprintf(stderr, "\n");                                         \
            exit(1);                                                       \
        }                                                                  \
    } while (0)

/* ---- a random well-formed table, written into buf; returns its size ---- */
static size_t make_table(uint8_t *buf, size_t cap)
{
    uint32_t nactions = below(9), nallowed = 0;
    uint32_t nspans[2] = {below(12), below(12)};
    if (nactions == 0)
        nspans[0] = nspans[1] = 0;
    struct kg_action acts[8];
    uint64_t allowed[64];
    memset(acts, 0, sizeof acts);
    for (uint32_t i = 0; i < nactions; i++) {
        struct kg_action *a = &acts[i];
        a->kind = (uint8_t)(1 + below(KG_ACT_MAX));
        a->flags = (uint8_t)(below(2) ? KG_AF_LOG : 0);
        a->rule = below(4) ? below(20) : KG_NONE;
        if (a->kind == KG_ACT_CONSTANT) {
            a->value = rnd();
            a->flags |= (uint8_t)(below(2) ? KG_AF_WRITES_GP : 0);
        } else if (a->kind == KG_ACT_EMULATE) {
            a->value = below(2) ? rnd() : below(4);
            a->write_mask = below(2) ? ~0ull : rnd();
            if (below(2)) {
                uint32_t n = below(5);
                a->flags |= KG_AF_HAS_ALLOWED;
                a->allowed_off = nallowed;
                a->allowed_n = n;
                uint64_t v = below(3);
                for (uint32_t k = 0; k < n; k++) {
                    allowed[nallowed++] = v;
                    v += 1 + below(3);
                }
            }
        }
    }
    size_t size = sizeof(struct kg_table_header) + nactions * sizeof(struct kg_action) +
                  (nspans[0] + nspans[1]) * sizeof(struct kg_span) + nallowed * 8;
    CHECK(size <= cap, "table too big");
    memset(buf, 0, size);
    struct kg_table_header *h = (struct kg_table_header *)buf;
    h->magic = KG_TABLE_MAGIC;
    h->version = KG_TABLE_VERSION;
    h->header_size = sizeof *h;
    h->size = (uint32_t)size;
    h->mode = below(2);
    h->nactions = nactions;
    h->nspans_read = nspans[0];
    h->nspans_write = nspans[1];
    h->nallowed = nallowed;
    h->default_action = nactions && below(2) ? below(nactions) : KG_NONE;
    h->unknown_action = nactions && below(2) ? below(nactions) : KG_NONE;
    h->invalid_action = nactions && below(2) ? below(nactions) : KG_NONE;
    memcpy(buf + sizeof *h, acts, nactions * sizeof(struct kg_action));
    struct kg_span *sp = (struct kg_span *)(buf + sizeof *h + nactions * sizeof(struct kg_action));
    for (int d = 0; d < 2; d++) {
        uint32_t lo = below(3) == 0 ? 0xFFFFFF00u - 64 * nspans[d] : below(0x40);
        for (uint32_t i = 0; i < nspans[d]; i++, sp++) {
            sp->lo = lo;
            sp->hi = lo + below(4);
            sp->action = below(nactions);
            lo = sp->hi + 1 + below(3);
        }
    }
    memcpy(sp, allowed, nallowed * 8);
    h->checksum = table_crc(buf, size);
    return size;
}

static void decide_some(const struct kg_table_header *t, struct kg_state *s, int n)
{
    for (int i = 0; i < n; i++) {
        uint32_t index = below(4) ? below(0x50) : (below(2) ? 0xFFFFFF00u + below(0x100) : (uint32_t)rnd());
        int w = (int)below(2);
        static const uint32_t reasons[] = {1, 2, 4, 4, 4, 0, 8, 0xFFFFFFFFu};
        uint32_t reason = reasons[below(8)];
        struct kg_decision d;
        memset(&d, 0xAA, sizeof d);
        CHECK(kg_decide(t, below(3) ? s : NULL, index, w, reason, below(2) ? rnd() : below(4), &d) == 0, "rc");
        CHECK(d.result >= 1 && d.result <= KG_RES_MAX, "result %u", d.result);
        CHECK(d.action <= KG_ACT_MAX, "action %u", d.action);
        if (d.action == KG_ACT_NONE)
            CHECK(d.result == KG_RES_GP && d.flags == 0 && d.rule == KG_NONE, "none");
        else
            CHECK(d.flags & KG_DF_COUNT, "counted");
        if (d.action == KG_ACT_FORWARD)
            CHECK(d.result == KG_RES_HOST, "forward -> host");
        if (d.result == KG_RES_HOST && d.action != KG_ACT_FORWARD)
            CHECK(t->mode == KG_MODE_AUDIT && (d.flags & KG_DF_WOULD_DENY) && reason == KG_REASON_FILTER, "host");
        if (d.result == KG_RES_VALUE)
            CHECK(!w, "value for a write");
        if (d.result == KG_RES_HOST) {
            kg_host_done(&d, w, (int)below(2), rnd());
            CHECK(d.result != KG_RES_HOST, "host_done");
        }
    }
}

static void valid_tables(int iters, struct kg_state *s)
{
    static uint64_t buf[4096];
    for (int i = 0; i < iters; i++) {
        size_t n = make_table((uint8_t *)buf, sizeof buf);
        int rc = kg_table_validate(buf, n);
        CHECK(rc == KG_OK, "valid table rejected: %s", kg_strerror(rc));
        decide_some((const struct kg_table_header *)buf, s, 40);
    }
}

static void mutated_tables(int iters, struct kg_state *s)
{
    static uint64_t src[4096];
    int accepted = 0;
    for (int i = 0; i < iters; i++) {
        size_t n = make_table((uint8_t *)src, sizeof src);
        size_t len = n;
        switch (below(4)) {
        case 0: len = below((uint32_t)n + 1); break;          /* truncated */
        case 1: len = n + below(64); break;                   /* trailing bytes */
        default: break;
        }
        /* an exact-size heap copy, so ASan sees any read past the end */
        uint8_t *t = aligned_alloc(64, (len + 63) & ~(size_t)63);
        CHECK(t != NULL, "alloc");
        memcpy(t, src, len < n ? len : n);
        if (len > n)
            for (size_t k = n; k < len; k++)
                t[k] = (uint8_t)rnd();
        uint32_t flips = below(6);
        for (uint32_t k = 0; k < flips && len; k++)
            t[below((uint32_t)len)] ^= (uint8_t)(1u << below(8));
        if (below(3) && len >= sizeof(struct kg_table_header)) {
            struct kg_table_header *h = (struct kg_table_header *)t;
            if (h->size <= len && h->size >= sizeof *h)
                h->checksum = table_crc(t, h->size);           /* reach the structural checks */
        }
        uint8_t *exact = malloc(len ? len : 1);
        CHECK(exact != NULL, "alloc");
        memcpy(exact, t, len);
        int rc = ((uintptr_t)exact & 7u) ? KG_E_ALIGN : kg_table_validate(exact, len);
        if (rc == KG_OK) {
            accepted++;
            decide_some((const struct kg_table_header *)exact, s, 20);
        }
        free(exact);
        free(t);
    }
    printf("mutated tables: %d, accepted after mutation: %d\n", iters, accepted);
}

/* ---- concurrent emulate writes ---- */
struct reg_args {
    const struct kg_table_header *t;
    struct kg_state *s;
    int id, iters;
};

static void *reg_writer(void *p)
{
    struct reg_args *a = p;
    for (int i = 0; i < a->iters; i++) {
        struct kg_decision d;
        uint32_t index = 0x10 + (uint32_t)(i % 8);
        /* value encodes the MSR, so a register holding another MSR's value is caught */
        uint64_t v = (uint64_t)index << 32 | (uint64_t)a->id << 16 | (uint64_t)(i & 0xFFFF);
        kg_decide(a->t, a->s, index, 1, KG_REASON_FILTER, v, &d);
        if (d.result != KG_RES_WRITTEN) {
            fprintf(stderr, "FAIL emulate write refused: %u\n", d.result);
            exit(1);
        }
        kg_decide(a->t, a->s, index, 0, KG_REASON_FILTER, 0, &d);
        if (d.result != KG_RES_VALUE || (d.value >> 32) != index) {
            fprintf(stderr, "FAIL register of %#x holds %#llx\n", index, (unsigned long long)d.value);
            exit(1);
        }
    }
    return NULL;
}

static void concurrent_registers(int iters)
{
    static uint64_t buf[64];
    /* one emulate action (any value) over MSRs 0x10-0x18 both directions */
    memset(buf, 0, sizeof buf);
    struct kg_table_header *h = (struct kg_table_header *)buf;
    struct kg_action *a = (struct kg_action *)(h + 1);
    struct kg_span *sp = (struct kg_span *)(a + 1);
    h->magic = KG_TABLE_MAGIC;
    h->version = KG_TABLE_VERSION;
    h->header_size = sizeof *h;
    h->nactions = 1;
    h->nspans_read = h->nspans_write = 1;
    h->default_action = h->unknown_action = h->invalid_action = KG_NONE;
    h->size = sizeof *h + sizeof *a + 2 * sizeof *sp;
    a->kind = KG_ACT_EMULATE;
    a->rule = 0;
    a->write_mask = ~0ull;
    a->value = 0x10ull << 32;
    sp[0].lo = sp[1].lo = 0x10;
    sp[0].hi = sp[1].hi = 0x18;
    h->checksum = table_crc((uint8_t *)buf, h->size);
    CHECK(kg_table_validate(buf, h->size) == KG_OK, "register table");
    /* 8 slots for 8 MSRs: every probe sequence crosses other MSRs' slots */
    void *mem = aligned_alloc(16, kg_state_size(8));
    CHECK(mem && kg_state_init(mem, kg_state_size(8), 8) == 0, "state");
    pthread_t th[4];
    struct reg_args args[4];
    for (int i = 0; i < 4; i++) {
        args[i] = (struct reg_args){h, mem, i, iters};
        CHECK(pthread_create(&th[i], NULL, reg_writer, &args[i]) == 0, "thread");
    }
    for (int i = 0; i < 4; i++)
        pthread_join(th[i], NULL);
    /* a ninth MSR finds no slot: #GP with KG_DF_STATE_FULL (still decided safely) */
    struct kg_decision d;
    kg_decide(h, mem, 0x18, 1, KG_REASON_FILTER, 5, &d);
    CHECK(d.result == KG_RES_GP && (d.flags & KG_DF_STATE_FULL), "ninth register: #GP, state full");
    kg_decide(h, mem, 0x18, 0, KG_REASON_FILTER, 0, &d);
    CHECK(d.result == KG_RES_VALUE && d.value == (0x10ull << 32), "ninth register reads initial");
    uint64_t v;
    CHECK(kg_state_get(mem, 0x10, &v) && (v >> 32) == 0x10, "register 0x10 survived");
    free(mem);
    printf("concurrent registers: 4 threads x %d writes\n", iters);
}

/* ---- ring ---- */
struct ring_args {
    struct kg_ring *r;
    uint64_t n;
    uint64_t retried;   /* failed pushes of records the producer then pushed again */
    int done;
};

static void *producer(void *p)
{
    struct ring_args *a = p;
    struct kg_record rec;
    memset(&rec, 0, sizeof rec);
    for (uint64_t i = 0; i < a->n; i++) {
        rec.data = i;
        rec.value = ~i;
        rec.index = (uint32_t)i;
        /* odd records must arrive (push again when full), even ones may be dropped */
        while (kg_ring_push(a->r, &rec) != 0 && (i & 1)) {
            a->retried++;
            sched_yield();
        }
    }
    __atomic_store_n(&a->done, 1, __ATOMIC_RELEASE);
    return NULL;
}

static void ring_traffic(uint64_t n)
{
    size_t sz = kg_ring_size(64);
    struct kg_ring *r = aligned_alloc(64, sz);
    CHECK(r && kg_ring_init(r, sz, 64) == 0, "ring");
    CHECK(kg_ring_init(r, sz, 48) == -1 && kg_ring_init(r, sz - 1, 64) == -1, "ring checks");
    struct ring_args a = {r, n, 0, 0};
    pthread_t th;
    CHECK(pthread_create(&th, NULL, producer, &a) == 0, "thread");
    struct kg_record rec;
    uint64_t last = 0, got = 0;
    int first = 1;
    for (;;) {
        if (kg_ring_pop(r, &rec)) {
            CHECK(rec.value == ~rec.data && rec.index == (uint32_t)rec.data, "torn record");
            CHECK(first || rec.data > last, "order: %llu after %llu", (unsigned long long)rec.data,
                  (unsigned long long)last);
            last = rec.data;
            first = 0;
            got++;
            continue;
        }
        if (__atomic_load_n(&a.done, __ATOMIC_ACQUIRE)) {
            if (!kg_ring_pop(r, &rec))
                break;
            got++;          /* the last records, pushed before `done` */
            CHECK(rec.value == ~rec.data && rec.data > last, "late record");
            last = rec.data;
            continue;
        }
        sched_yield();
    }
    pthread_join(th, NULL);
    CHECK(got + r->dropped - a.retried == n, "popped %llu + dropped %llu != %llu",
          (unsigned long long)got, (unsigned long long)(r->dropped - a.retried), (unsigned long long)n);
    CHECK(got >= n / 2, "every odd record arrives");
    printf("ring: %llu pushed, %llu popped, %llu dropped\n", (unsigned long long)n,
           (unsigned long long)got, (unsigned long long)(r->dropped - a.retried));
    free(r);
}

int main(int argc, char **argv)
{
    rng_state = argc > 1 ? strtoull(argv[1], NULL, 0) : 0x1234567;
    if (rng_state == 0)
        rng_state = 1;
    int iters = argc > 2 ? atoi(argv[2]) : 3000;
    void *mem = aligned_alloc(16, kg_state_size(16));
    CHECK(mem && kg_state_init(mem, kg_state_size(16), 16) == 0, "state");
    CHECK(kg_state_init(mem, kg_state_size(16), 12) == -1, "state nslots");
    valid_tables(iters, mem);
    mutated_tables(iters * 4, mem);
    concurrent_registers(iters * 10);
    ring_traffic((uint64_t)iters * 20);
    free(mem);
    printf("ok seed=%#llx iterations=%d\n", (unsigned long long)(argc > 1 ? strtoull(argv[1], NULL, 0) : 0x1234567), iters);
    return 0;
}

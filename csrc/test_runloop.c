/* Sanitizer harness for the C run loop (built by tests/unit/test_engine_c.py with
 * -fsanitize=address,undefined): kg_loop_run against a scripted fake kernel (struct
 * kg_loop_ops), random tables from test_engine.c's generator, random MSR exits (every reason,
 * both directions) mixed with port exits and EINTRs, a ring of 8 records and a count table of
 * 3 entries so both fill up.  Checks, against kg_decide/kg_host_done called directly on a
 * second register state: every exit's answer in kvm_run (msr.error, msr.data), the audit
 * records in order (RIP from the fake KVM_GET_REGS or from kvm_run.s.regs with
 * KG_LOOP_SYNC_REGS, kvm_valid_regs restored), the counted decisions, that every
 * non-MSR exit and every EINTR comes back to the caller, and nothing is lost.  Also keep
 * records (one per answered exit), intercepted MSR writes and KG_LOOP_FILTER_RETURNS, and the
 * audit drain (auditfmt.c): random records through kg_audit_drain with random rate limits,
 * missing names, buffer limits and partly failed writes; every decision counted once, every
 * logged one either formatted or suppressed, well-formed lines, unlogged = suppressed + lost.
 * Usage: test_runloop [seed] [iterations].  Prints "ok ..." and exits 0, or names the failure. */
#define main kg_test_engine_main
#include "test_engine.c"
#undef main
#include "runloop.c"
#include "auditfmt.c"

#define STEPS 200
enum { S_MSR, S_IO, S_EINTR };

struct step {
    int type, is_write;
    uint32_t index, reason;
    uint64_t data;
    int error;          /* what the loop answered */
    uint64_t answer;
};

struct fake {
    struct kvm_run *run;
    struct step *s;
    int n, pos;
};

static int fake_run(int fd, void *ctx)
{
    struct fake *f = ctx;
    (void)fd;
    if (f->pos > 0 && f->s[f->pos - 1].type == S_MSR) {
        f->s[f->pos - 1].error = f->run->msr.error;
        f->s[f->pos - 1].answer = f->run->msr.data;
    }
    if (f->pos == f->n) {
        f->run->exit_reason = KVM_EXIT_HLT;
        f->pos++;
        return 0;
    }
    CHECK(f->pos < f->n, "KVM_RUN after HLT");
    struct step *s = &f->s[f->pos++];
    if (s->type == S_EINTR)
        return -EINTR;
    if (s->type == S_IO) {
        f->run->exit_reason = KVM_EXIT_IO;
        return 0;
    }
    if (f->run->kvm_valid_regs & KVM_SYNC_X86_REGS)
        f->run->s.regs.regs.rip = 0x1000u + (uint64_t)f->pos;   /* as fake_get_rip */
    f->run->exit_reason = s->is_write ? KVM_EXIT_X86_WRMSR : KVM_EXIT_X86_RDMSR;
    f->run->msr.index = s->index;
    f->run->msr.reason = s->reason;
    f->run->msr.data = s->is_write ? s->data : 0xdeadbeefull;   /* garbage for reads */
    f->run->msr.error = 0x55;
    return 0;
}

static int host_msr(uint32_t index, int is_write, uint64_t *value)
{
    if (index % 3 == 0)
        return 0;                   /* KVM refuses */
    if (!is_write)
        *value = (uint64_t)index * 0x10001ull;
    return 1;
}

static int fake_host_msr(int fd, void *ctx, uint32_t index, int is_write, uint64_t *value)
{
    (void)fd;
    (void)ctx;
    return host_msr(index, is_write, value);
}

static int fake_get_rip(int fd, void *ctx, uint64_t *rip)
{
    struct fake *f = ctx;
    (void)fd;
    *rip = 0x1000u + (uint64_t)f->pos;
    return 0;
}

static void one_run(uint8_t *tbuf, void *smem, void *smem2, size_t slen, void *rmem, size_t rlen,
                    struct kg_counts *counts, uint64_t *nrecords, uint64_t *ncounted)
{
    make_table(tbuf, 8192);
    const struct kg_table_header *t = (const struct kg_table_header *)tbuf;
    CHECK(kg_table_validate(tbuf, t->size) == KG_OK, "generated table invalid");
    CHECK(kg_state_init(smem, slen, 64) == 0 && kg_state_init(smem2, slen, 64) == 0, "state");
    CHECK(kg_ring_init(rmem, rlen, 8) == 0, "ring");
    struct kg_ring *ring = rmem;
    counts->n = 0;

    struct step steps[STEPS];
    int n = 1 + (int)below(STEPS);
    static const uint32_t reasons[] = {KG_REASON_INVAL, KG_REASON_UNKNOWN, KG_REASON_FILTER};
    for (int i = 0; i < n; i++) {
        struct step *s = &steps[i];
        memset(s, 0, sizeof *s);
        uint32_t r = below(10);
        s->type = r == 0 ? S_IO : r == 1 ? S_EINTR : S_MSR;
        s->is_write = (int)below(2);
        s->index = below(3) == 0 ? 0xFFFFFF00u - below(0x300) : below(0x48);
        s->reason = reasons[below(3)];
        s->data = below(2) ? below(12) : rnd();
    }
    struct kvm_run run;
    memset(&run, 0, sizeof run);
    struct fake f = {&run, steps, n, 0};
    struct kg_loop_ops ops = {fake_run, fake_get_rip, fake_host_msr, &f};
    static uint8_t kmem[192 + 64 * 256] __attribute__((aligned(64)));
    CHECK(kg_ring_init(kmem, sizeof kmem, 256) == 0, "keep ring");
    struct kg_ring *keep = (struct kg_ring *)kmem;
    uint64_t live = 0;
    static const uint32_t icpt[] = {0x3, 0x10, 0x20};
    int use_icpt = below(3) == 0;
    struct kg_loop l = {.fd = -1, .run = &run, .table = t, .state = smem, .ring = ring,
                        .counts = counts, .vcpu = 3, .ops = &ops,
                        .flags = below(2) ? KG_LOOP_SYNC_REGS : 0, .keep = keep,
                        .intercept = use_icpt ? icpt : NULL, .nintercept = use_icpt ? 3 : 0,
                        .live = &live};
    int returns_icpt = 0;

    struct kg_record got[STEPS + 1];
    uint64_t got_n = 0, counted = 0, counted_key = 0, answered = 0;
    int returns_io = 0, returns_eintr = 0;
    for (;;) {
        int rc = kg_loop_run(&l);
        answered += l.answered;
        CHECK(run.kvm_valid_regs == 0, "kvm_valid_regs not restored");
        struct kg_record r;
        while (kg_ring_pop(ring, &r)) {
            CHECK(got_n < STEPS, "too many records");
            got[got_n++] = r;
        }
        for (uint32_t i = 0; i < counts->n; i++) {
            counted += counts->e[i].count;
            counted_key += counts->e[i].count * (counts->e[i].index ^ counts->e[i].result);
        }
        counts->n = 0;
        if (rc == KG_LOOP_DRAIN)
            continue;
        if (rc == -EINTR) {
            returns_eintr++;
            continue;
        }
        CHECK(rc == KG_LOOP_EXIT, "rc %d", rc);
        if (run.exit_reason == KVM_EXIT_HLT)
            break;
        if (run.exit_reason == KVM_EXIT_X86_WRMSR) {
            CHECK(use_icpt && run.msr.reason == KG_REASON_FILTER &&
                  (run.msr.index == 0x3 || run.msr.index == 0x10 || run.msr.index == 0x20),
                  "write %#x came back", run.msr.index);
            run.msr.error = 0;
            returns_icpt++;
            continue;
        }
        CHECK(run.exit_reason == KVM_EXIT_IO, "exit %u came back", run.exit_reason);
        returns_io++;
    }
    CHECK(ring->dropped == 0, "records dropped");
    CHECK(answered == live, "live %llu, answered %llu", (unsigned long long)live,
          (unsigned long long)answered);
    struct kg_record kr;
    uint64_t kept = 0;
    while (kg_ring_pop(keep, &kr))
        kept++;
    CHECK(kept == answered, "kept %llu of %llu", (unsigned long long)kept,
          (unsigned long long)answered);

    /* the reference: kg_decide on the second state, in order */
    uint64_t want_n = 0, want_counted = 0, want_key = 0, msr_steps = 0;
    int want_io = 0, want_eintr = 0, want_icpt = 0;
    for (int i = 0; i < n; i++) {
        struct step *s = &steps[i];
        if (s->type == S_IO) {
            want_io++;
            continue;
        }
        if (s->type == S_EINTR) {
            want_eintr++;
            continue;
        }
        if (use_icpt && s->is_write && s->reason == KG_REASON_FILTER &&
            (s->index == 0x3 || s->index == 0x10 || s->index == 0x20)) {
            want_icpt++;
            continue;
        }
        msr_steps++;
        struct kg_decision d;
        uint64_t data = s->is_write ? s->data : 0;
        kg_decide(t, smem2, s->index, s->is_write, s->reason, data, &d);
        if (d.result == KG_RES_HOST) {
            uint64_t v = data;
            int ok = host_msr(s->index, s->is_write, &v);
            kg_host_done(&d, s->is_write, ok, v);
        }
        int gp = d.result == KG_RES_GP || (!s->is_write && d.result != KG_RES_VALUE);
        CHECK(s->error == gp, "step %d: error %d, want %d", i, s->error, gp);
        if (!gp && !s->is_write)
            CHECK(s->answer == d.value, "step %d: read answered %#llx, want %#llx", i,
                  (unsigned long long)s->answer, (unsigned long long)d.value);
        if (!(d.flags & KG_DF_COUNT))
            continue;
        if (!(d.flags & KG_DF_LOG)) {
            want_counted++;
            want_key += s->index ^ d.result;
            continue;
        }
        CHECK(want_n < got_n, "step %d: record missing", i);
        struct kg_record *r = &got[want_n++];
        CHECK(r->index == s->index && r->vcpu == 3 && r->reason == s->reason &&
              r->action == d.action && r->result == d.result && r->rule == d.rule &&
              r->data == data && (r->flags & KG_RF_LOG) && (r->flags & KG_RF_RIP) &&
              r->rip == 0x1000u + (uint64_t)i + 1 &&
              !!(r->flags & KG_RF_WRITE) == s->is_write,
              "step %d: record differs", i);
        if (d.result == KG_RES_VALUE)
            CHECK(r->value == d.value, "step %d: record value", i);
    }
    CHECK(got_n == want_n, "%llu records, want %llu", (unsigned long long)got_n,
          (unsigned long long)want_n);
    CHECK(counted == want_counted && counted_key == want_key, "counted %llu, want %llu",
          (unsigned long long)counted, (unsigned long long)want_counted);
    CHECK(answered == msr_steps, "answered %llu of %llu", (unsigned long long)answered,
          (unsigned long long)msr_steps);
    CHECK(returns_io == want_io && returns_eintr == want_eintr, "returns io %d/%d eintr %d/%d",
          returns_io, want_io, returns_eintr, want_eintr);
    CHECK(returns_icpt == want_icpt, "intercepted %d/%d", returns_icpt, want_icpt);
    *nrecords += got_n;
    *ncounted += counted;
}

/* The audit drain: random records, random limits; invariants, and sanitizers watching. */
static void audit_run(void *rmem, size_t rlen, uint64_t *nlines, uint64_t *nsupp)
{
    static const char *const rule_json[] = {"\"f.toml:1 (rule 1)\"", "\"\"", "\"a\\\"b\""};
    static const size_t rule_len[] = {19, 2, 6};
    struct kg_audit_rules rules = {rule_json, rule_len, 3};
    CHECK(kg_ring_init(rmem, rlen, 8) == 0, "ring");
    struct kg_ring *ring = rmem;
    double rate = below(2) ? 1e9 : (double)below(40) / 4.0, burst = 1 + below(4);
    struct kg_audit *a = kg_audit_new(rate, burst);
    CHECK(a != NULL, "audit");
    uint64_t pushed = 0, logged = 0, lines = 0, lost = 0, counted = 0, unlogged = 0, supp = 0;
    uint64_t t0 = 1712345678000000000ull;
    int n = (int)below(120);
    for (int i = 0; i <= n; i++) {
        if (i < n) {
            struct kg_record r;
            memset(&r, 0, sizeof r);
            r.time_ns = below(8) ? t0 + rnd() % 4000000000ull : rnd();
            r.rip = rnd();
            r.data = rnd();
            r.value = rnd();
            r.index = below(2) ? below(6) : (uint32_t)rnd();
            r.vcpu = below(4);
            r.rule = below(5) ? below(4) : KG_NONE;
            r.reason = (uint8_t)(1u << below(4));
            r.action = (uint8_t)below(7);
            r.result = (uint8_t)(1 + below(5));
            r.flags = (uint8_t)below(16);
            if (kg_ring_push(ring, &r) == 0) {
                pushed++;
                logged += (r.flags & KG_RF_LOG) != 0;
            }
            if (below(3))
                continue;
        }
        for (;;) {
            uint32_t missing = 0;
            int rc = kg_audit_drain(a, ring, &rules, below(2) ? 1 : 1u << 16, &missing);
            CHECK(rc >= 0, "drain rc %d", rc);
            if (rc == KG_AUDIT_NAME) {
                char nm[32];
                int k = snprintf(nm, sizeof nm, "\"MSR_%#x\"", missing);
                CHECK(kg_audit_set_name(a, missing, nm, (size_t)k) == 0, "name");
                continue;
            }
            size_t len;
            uint32_t nl;
            const char *buf = kg_audit_buffer(a, &len, &nl);
            uint32_t seen = 0;
            for (size_t k = 0; k < len; k++) {
                CHECK(buf[k] != 0, "NUL in a line");
                if (buf[k] == '\n') {
                    seen++;
                    CHECK(k >= 1 && buf[k - 1] == '}', "line end");
                }
            }
            CHECK(seen == nl, "lines %u, newlines %u", nl, seen);
            CHECK(len == 0 || memcmp(buf, "{\"schema\": 1, \"time\": ", 22) == 0, "line start");
            uint32_t ok = below(4) ? nl : below(nl + 1);      /* a partly failed write */
            lines += nl;
            lost += nl - ok;
            kg_audit_commit(a, ok);
            size_t nr;
            uint64_t s;
            const struct kg_audit_row *rows = kg_audit_rows(a, &nr, &s);
            for (size_t k = 0; k < nr; k++) {
                counted += rows[k].count;
                unlogged += rows[k].unlogged;
            }
            supp += s;
            kg_audit_clear_rows(a);
            if (rc == KG_AUDIT_EMPTY)
                break;
        }
    }
    CHECK(counted == pushed, "counted %llu of %llu", (unsigned long long)counted,
          (unsigned long long)pushed);
    CHECK(lines + supp == logged, "lines %llu + suppressed %llu != logged %llu",
          (unsigned long long)lines, (unsigned long long)supp, (unsigned long long)logged);
    CHECK(unlogged == supp + lost, "unlogged %llu", (unsigned long long)unlogged);
    struct kg_audit_owed owed[4];
    while (kg_audit_take_owed(a, owed, 4) == 4)
        ;
    CHECK(kg_audit_take_owed(a, owed, 4) == 0, "owed twice");
    char tb[48];
    for (int i = 0; i < 8; i++) {
        double t = (double)rnd() / 1e9;
        CHECK(kg_audit_time(tb, t) < sizeof tb, "time");
    }
    kg_audit_free(a);
    *nlines += lines;
    *nsupp += supp;
}

int main(int argc, char **argv)
{
    rng_state = argc > 1 ? strtoull(argv[1], NULL, 0) : 0x9e3779b97f4a7c15ull;
    if (!rng_state)
        rng_state = 1;
    uint64_t seed = rng_state;
    int iters = argc > 2 ? atoi(argv[2]) : 500;
    static uint8_t tbuf[8192] __attribute__((aligned(64)));
    size_t slen = kg_state_size(64), rlen = kg_ring_size(8);
    void *smem = aligned_alloc(16, slen), *smem2 = aligned_alloc(16, slen);
    void *rmem = aligned_alloc(64, rlen);
    struct kg_counts *counts = aligned_alloc(8, sizeof *counts + 3 * sizeof(struct kg_count));
    CHECK(smem && smem2 && rmem && counts, "alloc");
    counts->capacity = 3;
    uint64_t nrec = 0, ncount = 0;
    uint64_t nlines = 0, nsupp = 0;
    for (int i = 0; i < iters; i++) {
        one_run(tbuf, smem, smem2, slen, rmem, rlen, counts, &nrec, &ncount);
        audit_run(rmem, rlen, &nlines, &nsupp);
    }
    free(smem);
    free(smem2);
    free(rmem);
    free(counts);
    printf("ok seed=%#llx runs=%d records=%llu counted=%llu lines=%llu suppressed=%llu\n",
           (unsigned long long)seed, iters, (unsigned long long)nrec,
           (unsigned long long)ncount, (unsigned long long)nlines, (unsigned long long)nsupp);
    return 0;
}

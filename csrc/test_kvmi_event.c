/* Sanitizer harness for the C MSR event path (csrc/kvmi_event.c; built by
 * tests/unit/test_kvmi_event_c.py with -fsanitize=address,undefined): kg_ev_msr_write against
 * a fake kernel (msrs_ioctl: scripted MSR values, a store that may be refused) and a real
 * socketpair whose tool side is scripted before each call (the reply is already in the socket
 * when the event goes out).  Random cases: every reply shape (CONTINUE, RETRY, CRASH, wrong
 * id/size/seq/vCPU/event, non-zero padding, short, a command first, EOF, nothing with a
 * timeout, a kick), and every reason not to start (not wanted, a table being rewritten, no
 * sync regs, the token taken by Python or dead, a Python thread wanting it, KVM_GET_MSRS
 * failing, an unchanged value).  Checks, by hand from the layouts in docs/introspection.md:
 * the result, kvm_run's answer, the value stored, the event message on the wire byte by byte,
 * the handoff slot (exactly the bytes the tool sent, at most 32), the token and the counters.
 * Usage: test_kvmi_event [seed] [iterations].  Prints "ok ..." and exits 0, or names the
 * failure. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "kvmi_event.c"

#define CHECK(c)                                                                      \
    do {                                                                              \
        if (!(c)) {                                                                   \
            fprintf(stderr, "FAIL line %d case %d iter %ld: %s\n", __LINE__, kase, it, #c); \
            exit(1);                                                                  \
        }                                                                             \
    } while (0)

static uint64_t rng;
static uint64_t rnd(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

/* the fake kernel: MSR values, whether KVM_GET_MSRS fails / a store is refused */
struct fake {
    uint64_t value[KG_EV_NSTATE + 1];
    uint32_t index;             /* the written MSR */
    int get_fails, store_refused, stores;
    uint64_t stored;
};

static uint64_t fake_value(struct fake *f, uint32_t index)
{
    for (int i = 0; i < KG_EV_NSTATE; i++)
        if (kg_ev_state_msrs[i] == index)
            return f->value[i];
    return f->value[KG_EV_NSTATE];
}

static int fake_ioctl(int fd, unsigned long request, struct kvm_msrs *m, void *ctx)
{
    struct fake *f = ctx;
    (void)fd;
    if (request == KVM_GET_MSRS) {
        if (f->get_fails)
            return (int)m->nmsrs - 1;            /* KVM read fewer than asked */
        for (uint32_t i = 0; i < m->nmsrs; i++)
            m->entries[i].data = fake_value(f, m->entries[i].index);
        return (int)m->nmsrs;
    }
    if (request == KVM_SET_MSRS) {
        if (m->nmsrs != 1 || m->entries[0].index != f->index)
            return -1;
        f->stores++;
        if (f->store_refused)
            return 0;
        f->stored = m->entries[0].data;
        return 1;
    }
    errno = EINVAL;
    return -1;
}

enum {
    C_CONTINUE, C_RETRY, C_CRASH, C_BAD_ID, C_BAD_SIZE, C_BAD_SEQ, C_BAD_VCPU, C_BAD_EVENT,
    C_BAD_PAD, C_SHORT, C_COMMAND, C_EOF, C_TIMEOUT, C_KICK, C_SPLIT,
    /* not started */
    C_NOT_WANTED, C_TABLE_BUSY, C_NO_SYNC, C_TOKEN_PY, C_TOKEN_DEAD, C_PY_WANTS, C_GET_FAILS,
    C_UNCHANGED, NCASES
};

static void put16(unsigned char *b, uint16_t x) { memcpy(b, &x, 2); }
static void put32(unsigned char *b, uint32_t x) { memcpy(b, &x, 4); }
static void put64(unsigned char *b, uint64_t x) { memcpy(b, &x, 8); }

int main(int argc, char **argv)
{
    uint64_t seed = argc > 1 ? strtoull(argv[1], NULL, 0) : 1;
    long iters = argc > 2 ? strtol(argv[2], NULL, 0) : 1000;
    rng = seed | 1;
    long done = 0, handed = 0, python = 0, it;
    int kase = -1;
    /* v12's MSR event: header {1, size, seq}, event header {15, 0, 0, 0}, vCPU event header
     * {8, vcpu, 0}, state at 24, payload at 560, 584 bytes */
    static unsigned char tmpl[584];
    memset(tmpl, 0, sizeof tmpl);
    put16(tmpl, 1);
    put16(tmpl + 2, 576);
    put16(tmpl + 8, 15);
    put16(tmpl + 16, 8);
    for (it = 0; it < iters; it++) {
        kase = (int)(rnd() % NCASES);
        struct fake f;
        memset(&f, 0, sizeof f);
        struct kg_ev_port *p = calloc(1, sizeof *p);
        uint32_t nv = 1 + (uint32_t)(rnd() % 3), vcpu = (uint32_t)(rnd() % nv);
        p->v = calloc(nv, sizeof *p->v);
        struct kvm_run *run = calloc(1, sizeof *run);
        CHECK(p && p->v && run);
        int sv[2];
        CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
        p->nvcpus = nv;
        p->sock = sv[0];
        memcpy(p->tmpl, tmpl, sizeof tmpl);
        p->msg_len = sizeof tmpl;
        p->seq_at = 4;
        p->vcpu_at = 18;
        p->state_at = 24;
        p->payload_at = 560;
        p->reply_id = 1;
        p->event_wire = 15;
        p->poll_ns = (rnd() & 1) ? 0 : 20000;
        p->timeout_ns = kase == C_TIMEOUT ? 1000000 : -1;
        p->seq = (uint32_t)rnd();
        p->msrs_ioctl = fake_ioctl;
        p->ctx = &f;
        p->token = kase == C_TOKEN_PY ? KG_TOKEN_PY : kase == C_TOKEN_DEAD ? KG_TOKEN_DEAD
                                                                          : KG_TOKEN_FREE;
        p->py_wanted = kase == C_PY_WANTS;
        /* the written MSR: a state MSR or another one; the wanted table */
        uint32_t index = (rnd() & 1) ? kg_ev_state_msrs[rnd() % KG_EV_NSTATE]
                                     : 0x40000000u + (uint32_t)(rnd() % 64);
        f.index = index;
        for (int i = 0; i <= KG_EV_NSTATE; i++)
            f.value[i] = rnd();
        struct kg_ev_vcpu *v = &p->v[vcpu];
        uint32_t n = 0;
        for (uint32_t m = 0x100; n < 5; m += 0x1000)        /* sorted, around the index */
            v->msrs[n++] = m;
        if (kase != C_NOT_WANTED) {
            uint32_t j = n++;
            while (j > 0 && v->msrs[j - 1] > index) {
                v->msrs[j] = v->msrs[j - 1];
                j--;
            }
            v->msrs[j] = index;
        }
        v->n = n;
        v->gen = kase == C_TABLE_BUSY ? 7 : 8;
        f.get_fails = kase == C_GET_FAILS;
        f.store_refused = (rnd() % 5) == 0;
        /* the exit */
        run->exit_reason = KVM_EXIT_X86_WRMSR;
        run->msr.reason = KVM_MSR_EXIT_REASON_FILTER;
        run->msr.index = index;
        uint64_t old = fake_value(&f, index);
        uint64_t new = kase == C_UNCHANGED ? old : old ^ (1 + (rnd() >> 1));
        run->msr.data = new;
        run->msr.error = 7;                              /* must be answered */
        run->kvm_valid_regs = kase == C_NO_SYNC ? KVM_SYNC_X86_REGS
                                                : KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS;
        for (size_t i = 0; i < sizeof run->s.regs.regs; i++)
            ((unsigned char *)&run->s.regs.regs)[i] = (unsigned char)rnd();
        for (size_t i = 0; i < sizeof run->s.regs.sregs; i++)
            ((unsigned char *)&run->s.regs.sregs)[i] = (unsigned char)rnd();
        run->immediate_exit = kase == C_KICK;
        /* the tool's bytes, in the socket before the call */
        uint32_t seq = p->seq + 1;
        unsigned char r[64];
        memset(r, 0, sizeof r);
        uint64_t tool_value = rnd();
        uint8_t action = kase == C_RETRY ? 1 : kase == C_CRASH ? 2 : 0;
        put16(r, 1);
        put16(r + 2, 24);
        put32(r + 4, seq);
        put16(r + 8, (uint16_t)vcpu);
        r[16] = action;
        r[17] = 15;
        put64(r + 24, tool_value);
        size_t rlen = 32;
        switch (kase) {
        case C_BAD_ID: put16(r, 3); break;
        case C_BAD_SIZE: put16(r + 2, 32); rlen = 40; break;
        case C_BAD_SEQ: put32(r + 4, seq + 1); break;
        case C_BAD_VCPU: put16(r + 8, (uint16_t)(vcpu + 1)); break;
        case C_BAD_EVENT: r[17] = 2; break;
        case C_BAD_PAD: r[12 + rnd() % 4] = 1; break;
        case C_SHORT: put16(r + 2, 16); rlen = 24; break;
        case C_COMMAND: put16(r, 2); put16(r + 2, 0); rlen = 8; break;   /* GET_VERSION */
        default: break;
        }
        int tool_sends = kase < C_NOT_WANTED && kase != C_EOF && kase != C_TIMEOUT &&
                         kase != C_KICK;
        if (kase == C_SPLIT) {           /* the reply in two pieces: C reads on */
            CHECK(send(sv[1], r, 11, 0) == 11);
            CHECK(send(sv[1], r + 11, 21, 0) == 21);
        } else if (tool_sends) {
            CHECK(send(sv[1], r, rlen, 0) == (ssize_t)rlen);
        }
        if (kase == C_EOF)
            CHECK(shutdown(sv[1], SHUT_WR) == 0);

        int rc = kg_ev_msr_write(p, vcpu, 99, run);

        int started = kase < C_NOT_WANTED;
        int ok_reply = kase == C_CONTINUE || kase == C_RETRY || kase == C_SPLIT;
        if (kase == C_UNCHANGED) {
            CHECK(rc == KG_EV_DONE && f.stores == 1 && p->events == 0 && p->writes == 1);
            CHECK(run->msr.error == (f.store_refused ? 1 : 0));
            CHECK(f.store_refused || f.stored == new);
            CHECK(p->token == KG_TOKEN_FREE);
        } else if (!started) {
            python++;
            CHECK(rc == KG_EV_PYTHON && f.stores == 0 && p->events == 0 && p->writes == 0);
            CHECK(run->msr.error == 7 && !v->handoff);
            CHECK(p->token == (kase == C_TOKEN_PY ? KG_TOKEN_PY : kase == C_TOKEN_DEAD
                                                                 ? KG_TOKEN_DEAD : KG_TOKEN_FREE));
            CHECK(p->seq == seq - 1);
        } else {
            /* the event went out: exactly the template with seq, vCPU, state and payload */
            unsigned char m[600];
            CHECK(recv(sv[1], m, sizeof m, MSG_DONTWAIT) == 584);
            unsigned char want[584];
            memcpy(want, tmpl, sizeof want);
            put32(want + 4, seq);
            put16(want + 18, (uint16_t)vcpu);
            const struct kvm_sregs *sr = &run->s.regs.sregs;
            want[24] = ((sr->efer >> 10) & 1) && sr->cs.l ? 8 : sr->cs.db ? 4 : 2;
            memcpy(want + 32, &run->s.regs.regs, 144);
            memcpy(want + 176, sr, 312);
            for (int i = 0; i < KG_EV_NSTATE; i++)
                put64(want + 488 + 8 * i, f.value[i]);
            put32(want + 560, index);
            put64(want + 568, old);
            put64(want + 576, new);
            CHECK(memcmp(m, want, sizeof want) == 0);
            CHECK(p->events == 1 && p->seq == seq);
            if (ok_reply) {
                done++;
                CHECK(rc == KG_EV_DONE && !v->handoff && p->token == KG_TOKEN_FREE);
                CHECK(f.stores == 1 && p->writes == 1);
                CHECK(run->msr.error == (f.store_refused ? 1 : 0));
                CHECK(f.store_refused || f.stored == (action == 0 ? tool_value : old));
                CHECK(recv(sv[0], m, 1, MSG_DONTWAIT) < 0 && errno == EAGAIN);   /* all read */
            } else {
                handed++;
                CHECK(rc == KG_EV_HANDOFF && v->handoff == 1 && p->token == KG_TOKEN_C);
                CHECK(f.stores == 0 && p->writes == 0 && run->msr.error == 7);
                CHECK(v->h_seq == seq && v->h_msr == index && v->h_old == old && v->h_new == new);
                /* exactly the tool's bytes C read: never past the reply's 32, never past a
                 * header that is not the reply's; the rest is still in the socket */
                size_t sent = tool_sends ? rlen : 0;
                size_t expect = sent < 32 ? sent : 32;
                CHECK(v->h_len == expect);
                CHECK(memcmp(v->h_bytes, r, v->h_len) == 0);
                ssize_t rest = recv(sv[0], m, sizeof m, MSG_DONTWAIT);
                CHECK((size_t)(rest < 0 ? 0 : rest) == sent - v->h_len);
            }
        }
        close(sv[0]);
        close(sv[1]);
        free(run);
        free(p->v);
        free(p);
    }
    CHECK(done > 0 && handed > 0 && python > 0);
    printf("ok seed=%#llx iterations=%ld done=%ld handed=%ld python=%ld\n",
           (unsigned long long)seed, iters, done, handed, python);
    return 0;
}

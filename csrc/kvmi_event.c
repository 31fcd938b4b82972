/* kvmgate introspection MSR events in C (kvmi_event.h). */
#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <stddef.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>

#include "kvmi_event.h"

const uint32_t kg_ev_state_msrs[KG_EV_NSTATE] = {
    0x174, 0x175, 0x176, 0xC0000080, 0xC0000081, 0xC0000082, 0xC0000083, 0x277, 0xC0000102,
};

#define SYNC_MASK (KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS)
#define EFER_LMA (1ull << 10)
#define ACTION_CONTINUE 0
#define ACTION_RETRY 1
#define WAIT_SLICE_MS 10     /* poll(2) at most this long between looks at immediate_exit */

_Static_assert(sizeof(struct kvm_regs) + sizeof(struct kvm_sregs) + 8 + 8 * KG_EV_NSTATE ==
               KG_EV_STATE_SIZE, "state block layout");

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);          /* vDSO: no syscall, no lock */
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

uint8_t kg_ev_mode(const struct kvm_sregs *s)
{
    if ((s->efer & EFER_LMA) && s->cs.l)
        return 8;
    return s->cs.db ? 4 : 2;
}

/* The wanted table of vCPU `v` holds `index` (a consistent read, else "no"). */
static int wanted(const struct kg_ev_vcpu *v, uint32_t index)
{
    uint32_t g1 = __atomic_load_n(&v->gen, __ATOMIC_ACQUIRE);
    if (g1 & 1)
        return 0;
    uint32_t n = __atomic_load_n(&v->n, __ATOMIC_RELAXED), lo = 0, hi, found;
    if (n > KG_EV_MAX_MSRS)
        n = KG_EV_MAX_MSRS;
    hi = n;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (__atomic_load_n(&v->msrs[mid], __ATOMIC_RELAXED) < index)
            lo = mid + 1;
        else
            hi = mid;
    }
    found = lo < n && __atomic_load_n(&v->msrs[lo], __ATOMIC_RELAXED) == index;
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return found && __atomic_load_n(&v->gen, __ATOMIC_RELAXED) == g1;
}

static int msrs_ioctl(const struct kg_ev_port *p, int fd, unsigned long request,
                      struct kvm_msrs *msrs)
{
    if (p->msrs_ioctl != NULL)
        return p->msrs_ioctl(fd, request, msrs, p->ctx);
    return ioctl(fd, request, msrs);
}

/* Host-initiated KVM_SET_MSRS of one MSR: 1 stored, else 0 (KVM refused it). */
static int store(const struct kg_ev_port *p, int fd, uint32_t index, uint64_t value)
{
    struct {
        struct kvm_msrs hdr;
        struct kvm_msr_entry e;
    } buf = {.hdr = {.nmsrs = 1}, .e = {.index = index, .data = value}};
    return msrs_ioctl(p, fd, KVM_SET_MSRS, &buf.hdr) == 1;
}

/* Answer the WRMSR in kvm_run after storing `value` (#GP when KVM refuses the store). */
static int answer(const struct kg_ev_port *p, int fd, struct kvm_run *run, uint32_t index,
                  uint64_t value)
{
    run->msr.error = store(p, fd, index, value) ? 0 : 1;
    return KG_EV_DONE;
}

static void release(struct kg_ev_port *p)
{
    __atomic_store_n(&p->released_ns, now_ns(), __ATOMIC_RELAXED);
    __atomic_store_n(&p->token, KG_TOKEN_FREE, __ATOMIC_RELEASE);
}

static int handoff(struct kg_ev_vcpu *v, uint32_t seq, uint32_t index, uint64_t old,
                   uint64_t new, int64_t start, const unsigned char *bytes, uint32_t len)
{
    v->h_seq = seq;
    v->h_msr = index;
    v->h_old = old;
    v->h_new = new;
    v->h_start_ns = start;
    v->h_len = len;
    memcpy(v->h_bytes, bytes, len);
    v->handoff = 1;
    return KG_EV_HANDOFF;
}

static uint16_t get16(const unsigned char *b)
{
    uint16_t x;
    memcpy(&x, b, 2);
    return x;
}

static uint32_t get32(const unsigned char *b)
{
    uint32_t x;
    memcpy(&x, b, 4);
    return x;
}

static uint64_t get64(const unsigned char *b)
{
    uint64_t x;
    memcpy(&x, b, 8);
    return x;
}

/* The header so far still reads as the expected reply (`got` bytes of it). */
static int header_ok(const struct kg_ev_port *p, const unsigned char *r, uint32_t got,
                     uint32_t seq)
{
    if (got >= 2 && get16(r) != p->reply_id)
        return 0;
    if (got >= 4 && get16(r + 2) != KG_EV_REPLY_SIZE - 8)
        return 0;
    if (got >= 8 && get32(r + 4) != seq)
        return 0;
    return 1;
}

/* A whole expected reply: its action (CONTINUE / RETRY), or -1 for anything else. */
static int reply_action(const struct kg_ev_port *p, const unsigned char *r, uint32_t vcpu)
{
    /* vCPU header {u16 vcpu; u16; u32}, common reply {u8 action; u8 event; u16; u32} */
    if (get16(r + 8) != vcpu || get16(r + 10) || get32(r + 12) || r[17] != p->event_wire ||
        get16(r + 18) || get32(r + 20))
        return -1;
    if (r[16] != ACTION_CONTINUE && r[16] != ACTION_RETRY)
        return -1;
    return r[16];
}

/* Build vCPU `v`'s MSR event message from the template; its length. */
static uint32_t build(const struct kg_ev_port *p, struct kg_ev_vcpu *v, const struct kvm_run *run,
                      uint32_t vcpu, uint32_t seq, uint32_t index, uint64_t old, uint64_t new)
{
    unsigned char *m = v->msg;
    memcpy(m, p->tmpl, p->msg_len);
    uint16_t vcpu16 = (uint16_t)vcpu;
    memcpy(m + p->seq_at, &seq, 4);
    memcpy(m + p->vcpu_at, &vcpu16, 2);
    unsigned char *st = m + p->state_at;
    const struct kvm_regs *regs = &run->s.regs.regs;
    const struct kvm_sregs *sregs = &run->s.regs.sregs;
    memset(st, 0, 8);
    st[0] = kg_ev_mode(sregs);
    memcpy(st + 8, regs, sizeof *regs);
    memcpy(st + 8 + sizeof *regs, sregs, sizeof *sregs);
    unsigned char *msrs = st + 8 + sizeof *regs + sizeof *sregs;
    for (int i = 0; i < KG_EV_NSTATE; i++)
        memcpy(msrs + 8 * i, &v->get.e[i].data, 8);
    unsigned char *pl = m + p->payload_at;     /* {u32 msr; u32 pad; u64 old; u64 new} */
    uint32_t zero = 0;
    memcpy(pl, &index, 4);
    memcpy(pl + 4, &zero, 4);
    memcpy(pl + 8, &old, 8);
    memcpy(pl + 16, &new, 8);
    return p->msg_len;
}

/* Send all of m (one message): 1, or 0 when nothing went out (the caller goes to Python). */
static int send_msg(int sock, const unsigned char *m, uint32_t len)
{
    return send(sock, m, len, MSG_NOSIGNAL) == (ssize_t)len;
}

int kg_ev_msr_write(struct kg_ev_port *p, uint32_t vcpu, int fd, struct kvm_run *run)
{
    if (vcpu >= p->nvcpus || run->exit_reason != KVM_EXIT_X86_WRMSR ||
        run->msr.reason != KVM_MSR_EXIT_REASON_FILTER)
        return KG_EV_PYTHON;
    /* registers from kvm_run.s: only once Python asked KVM to copy them there */
    if ((run->kvm_valid_regs & SYNC_MASK) != SYNC_MASK)
        return KG_EV_PYTHON;
    struct kg_ev_vcpu *v = &p->v[vcpu];
    uint32_t index = run->msr.index;
    uint64_t new = run->msr.data;
    if (!wanted(v, index) || v->handoff)
        return KG_EV_PYTHON;

    /* one KVM_GET_MSRS: the state MSRs and the written one */
    uint32_t n = KG_EV_NSTATE, at = KG_EV_NSTATE;
    for (uint32_t i = 0; i < KG_EV_NSTATE; i++) {
        v->get.e[i].index = kg_ev_state_msrs[i];
        v->get.e[i].reserved = 0;
        v->get.e[i].data = 0;
        if (kg_ev_state_msrs[i] == index)
            at = i;
    }
    if (at == KG_EV_NSTATE) {
        v->get.e[n].index = index;
        v->get.e[n].reserved = 0;
        v->get.e[n].data = 0;
        n++;
    }
    v->get.hdr.nmsrs = n;
    v->get.hdr.pad = 0;
    if (msrs_ioctl(p, fd, KVM_GET_MSRS, &v->get.hdr) != (int)n)
        return KG_EV_PYTHON;
    uint64_t old = v->get.e[at].data;
    if (old == new) {                         /* no change: no event, the guest's value */
        __atomic_add_fetch(&p->writes, 1, __ATOMIC_RELAXED);
        return answer(p, fd, run, index, new);
    }

    /* the reader token: free, and no Python thread waiting for it */
    uint32_t free_ = KG_TOKEN_FREE;
    if (__atomic_load_n(&p->py_wanted, __ATOMIC_ACQUIRE) ||
        !__atomic_compare_exchange_n(&p->token, &free_, KG_TOKEN_C, 0, __ATOMIC_ACQ_REL,
                                     __ATOMIC_RELAXED))
        return KG_EV_PYTHON;
    if (__atomic_load_n(&p->py_wanted, __ATOMIC_ACQUIRE)) {    /* raced with want() */
        __atomic_store_n(&p->token, KG_TOKEN_FREE, __ATOMIC_RELEASE);
        return KG_EV_PYTHON;
    }
    uint32_t seq = __atomic_add_fetch(&p->seq, 1, __ATOMIC_RELAXED);
    uint32_t len = build(p, v, run, vcpu, seq, index, old, new);
    if (!send_msg(p->sock, v->msg, len)) {
        release(p);
        return KG_EV_PYTHON;
    }
    int64_t start = now_ns();
    __atomic_add_fetch(&p->events, 1, __ATOMIC_RELAXED);

    /* the reply: exactly KG_EV_REPLY_SIZE bytes, never more */
    unsigned char r[KG_EV_REPLY_SIZE];
    uint32_t got = 0;
    int64_t spin_end = start + p->poll_ns;
    struct pollfd pfd = {.fd = p->sock, .events = POLLIN};
    for (;;) {
        ssize_t k = recv(p->sock, r + got, KG_EV_REPLY_SIZE - got, MSG_DONTWAIT);
        if (k > 0) {
            got += (uint32_t)k;
            if (!header_ok(p, r, got, seq))
                return handoff(v, seq, index, old, new, start, r, got);
            if (got < KG_EV_REPLY_SIZE)
                continue;
            int action = reply_action(p, r, vcpu);
            if (action < 0)
                return handoff(v, seq, index, old, new, start, r, got);
            release(p);
            __atomic_add_fetch(&p->writes, 1, __ATOMIC_RELAXED);
            return answer(p, fd, run, index, action == ACTION_CONTINUE ? get64(r + 24) : old);
        }
        if (k == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR))
            return handoff(v, seq, index, old, new, start, r, got);   /* EOF, socket error */
        if (__atomic_load_n(&run->immediate_exit, __ATOMIC_RELAXED))   /* kicked */
            return handoff(v, seq, index, old, new, start, r, got);
        int64_t t = now_ns();
        if (t < spin_end) {
            sched_yield();
            continue;
        }
        int ms = WAIT_SLICE_MS;
        if (p->timeout_ns >= 0) {
            int64_t left = start + p->timeout_ns - t;
            if (left <= 0)                            /* the event timeout: Python's to tell */
                return handoff(v, seq, index, old, new, start, r, got);
            if (left / 1000000 + 1 < ms)
                ms = (int)(left / 1000000 + 1);
        }
        if (poll(&pfd, 1, ms) < 0)                    /* a signal (kick, stop, Ctrl-C) */
            return handoff(v, seq, index, old, new, start, r, got);
    }
}

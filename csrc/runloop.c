/* kvmgate C vCPU run loop (runloop.h). */
#include <errno.h>
#include <stddef.h>
#include <sys/ioctl.h>
#include <time.h>

#include "runloop.h"

static uint64_t coarse_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);   /* vDSO: no syscall, no lock */
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static int sys_run(int fd, void *ctx)
{
    (void)ctx;
    return ioctl(fd, KVM_RUN, 0) < 0 ? -errno : 0;
}

static int sys_get_rip(int fd, void *ctx, uint64_t *rip)
{
    struct kvm_regs regs;
    (void)ctx;
    if (ioctl(fd, KVM_GET_REGS, &regs) < 0)
        return -errno;
    *rip = regs.rip;
    return 0;
}

static int sys_host_msr(int fd, void *ctx, uint32_t index, int is_write, uint64_t *value)
{
    struct {
        struct kvm_msrs hdr;
        struct kvm_msr_entry entry;
    } buf = {.hdr = {.nmsrs = 1}, .entry = {.index = index, .data = is_write ? *value : 0}};
    (void)ctx;
    int rc = ioctl(fd, is_write ? KVM_SET_MSRS : KVM_GET_MSRS, &buf);
    if (rc < 0)
        return -errno;
    if (rc == 1 && !is_write)
        *value = buf.entry.data;
    return rc == 1;
}

static const struct kg_loop_ops sys_ops = {sys_run, sys_get_rip, sys_host_msr, NULL};

static int ring_nearly_full(const struct kg_ring *r)
{
    uint64_t head = r->head;   /* ours (single producer) */
    uint64_t tail = __atomic_load_n(&r->tail, __ATOMIC_ACQUIRE);
    return head - tail >= (uint64_t)r->capacity - 1;
}

static void count_decision(struct kg_counts *c, const struct kg_decision *d, uint32_t index,
                           int is_write)
{
    uint8_t flags = (uint8_t)((is_write ? KG_RF_WRITE : 0) |
                              ((d->flags & KG_DF_WOULD_DENY) ? KG_RF_WOULD_DENY : 0));
    uint64_t value = d->result == KG_RES_VALUE ? d->value : 0;
    uint32_t i;
    for (i = 0; i < c->n; i++) {
        struct kg_count *e = &c->e[i];
        if (e->index == index && e->flags == flags && e->action == d->action &&
            e->result == d->result && e->value == value && e->rule == d->rule) {
            e->count++;
            return;
        }
    }
    /* room guaranteed: kg_loop_run checks n < capacity before each KVM_RUN */
    struct kg_count *e = &c->e[c->n++];
    e->index = index;
    e->flags = flags;
    e->action = d->action;
    e->result = d->result;
    e->reserved = 0;
    e->rule = d->rule;
    e->reserved2 = 0;
    e->value = value;
    e->count = 1;
}

int kg_loop_run(struct kg_loop *l)
{
    const struct kg_loop_ops *ops = l->ops ? l->ops : &sys_ops;
    struct kvm_run *run = l->run;
    struct kg_decision d;
    struct kg_record rec;
    uint64_t answered = 0;
    int rc;
    int sync = (l->flags & KG_LOOP_SYNC_REGS) != 0;
    uint64_t valid = run->kvm_valid_regs;
    uint64_t tick_end = l->tick_us ? coarse_us() + l->tick_us : 0;
    if (sync)
        run->kvm_valid_regs = valid | KVM_SYNC_X86_REGS;

    for (;;) {
        if ((l->ring && ring_nearly_full(l->ring)) || (l->keep && ring_nearly_full(l->keep)) ||
            (l->counts && l->counts->n >= l->counts->capacity)) {
            rc = KG_LOOP_DRAIN;
            break;
        }
        rc = ops->run(l->fd, ops->ctx);
        if (rc < 0)
            break;
        uint32_t reason = run->exit_reason;
        if (reason != KVM_EXIT_X86_RDMSR && reason != KVM_EXIT_X86_WRMSR) {
            rc = KG_LOOP_EXIT;
            break;
        }
        int is_write = reason == KVM_EXIT_X86_WRMSR;
        uint32_t index = run->msr.index, why = run->msr.reason;
        uint64_t data = is_write ? run->msr.data : 0;
        if (why == KG_REASON_FILTER &&
            ((l->flags & KG_LOOP_FILTER_RETURNS) ||
             (is_write && l->nintercept && kg_sorted_has(l->intercept, l->nintercept, index)))) {
            rc = KG_LOOP_EXIT;
            break;
        }
        kg_decide(l->table, l->state, index, is_write, why, data, &d);
        if (d.result == KG_RES_HOST) {
            uint64_t v = data;
            int ok = ops->host_msr(l->fd, ops->ctx, index, is_write, &v);
            kg_host_done(&d, is_write, ok == 1, v);
        }
        if (l->counts && (d.flags & KG_DF_COUNT) && !(d.flags & KG_DF_LOG)) {
            count_decision(l->counts, &d, index, is_write);
        } else if (l->ring && (d.flags & KG_DF_COUNT)) {
            uint64_t rip = 0;
            int rip_valid = 0;
            if (d.flags & KG_DF_LOG) {
                if (sync) {
                    rip = run->s.regs.regs.rip;
                    rip_valid = 1;
                } else {
                    rip_valid = ops->get_rip(l->fd, ops->ctx, &rip) == 0;
                }
            }
            kg_record_fill(&rec, &d, l->vcpu, rip, rip_valid, index, is_write, why, data);
            kg_ring_push(l->ring, &rec);
        }
        /* as kvmgate's Python loop: a read without a value is #GP */
        if (d.result == KG_RES_GP || (!is_write && d.result != KG_RES_VALUE)) {
            run->msr.error = 1;
        } else {
            run->msr.error = 0;
            if (!is_write)
                run->msr.data = d.value;
        }
        if (l->keep) {
            kg_record_fill(&rec, &d, l->vcpu, 0, 0, index, is_write, why, data);
            kg_ring_push(l->keep, &rec);
        }
        answered++;
        if (l->live)
            __atomic_store_n(l->live, *l->live + 1, __ATOMIC_RELAXED);
        if (tick_end && coarse_us() >= tick_end) {
            rc = KG_LOOP_TICK;
            break;
        }
    }
    if (sync)
        run->kvm_valid_regs = valid;
    l->answered = answered;
    return rc;
}

/* kvmgate C vCPU run loop: KVM_RUN in a loop, MSR exits answered by the policy engine.
 *
 * kg_loop_run() calls KVM_RUN on one vCPU until an exit needs its caller (kvmgate's Python exit
 * loop): every KVM_EXIT_X86_RDMSR / KVM_EXIT_X86_WRMSR is decided by kg_decide() and answered in
 * kvm_run.msr {error, data} (docs/kvm-msr.md, "4. Exits to user space"), including forward /
 * audit-mode accesses, which it carries out host-initiated (KVM_GET_MSRS / KVM_SET_MSRS, the
 * kernel's return value 1 = done); logged and counted decisions go into the vCPU's audit ring
 * (kg_record_fill; RIP for logged ones only: KVM_GET_REGS, or kvm_run.s.regs with
 * KG_LOOP_SYNC_REGS).  Any other exit, a KVM_RUN error
 * (EINTR: a signal or kvm_run.immediate_exit), an audit ring about to fill or a full count
 * table (struct kg_counts: decisions only counted are aggregated, not recorded one by one)
 * returns.
 *
 * No allocation, no locks, no Python: the caller releases the GIL around it.  The kernel calls
 * are function pointers in struct kg_loop_ops so the loop runs against a fake kernel in tests
 * (csrc/test_runloop.c); NULL means the real ioctl.
 */
#ifndef KVMGATE_RUNLOOP_H
#define KVMGATE_RUNLOOP_H

#include <linux/kvm.h>
#include <stdint.h>

#include "engine.h"
#include "sorted.h"        /* kg_sorted_has: the intercepted MSRs, the MSRs routed to the C event path */

/* kg_loop_run results (>= 0); negative: -errno of a failed KVM_RUN (-EINTR when interrupted) */
#define KG_LOOP_EXIT  0   /* kvm_run holds an exit for the caller, unanswered */
#define KG_LOOP_DRAIN 1   /* ring nearly full or count table full: drain them, call again */
#define KG_LOOP_TICK  2   /* tick_us of CLOCK_MONOTONIC_COARSE passed: call again (the caller's
                             chance to run signal handlers that arrived between two KVM_RUNs,
                             which no -EINTR reports) */

/* kg_loop.flags */
#define KG_LOOP_SYNC_REGS 0x1u  /* RIP of logged records from kvm_run.s.regs (KVM_CAP_SYNC_REGS,
                                   KVM_SYNC_X86_REGS set in kvm_valid_regs during the call and
                                   restored after) instead of a KVM_GET_REGS per record */
#define KG_LOOP_FILTER_RETURNS 0x2u  /* every exit with reason KVM_MSR_EXIT_REASON_FILTER returns
                                        to the caller unanswered (kvmgate: write interceptions
                                        forced FILTER into an exit mask the policy lacks it in) */
#define KG_LOOP_FLAGS (KG_LOOP_SYNC_REGS | KG_LOOP_FILTER_RETURNS)

struct kg_loop_ops {
    int (*run)(int fd, void *ctx);                     /* KVM_RUN: 0 or -errno */
    int (*get_rip)(int fd, void *ctx, uint64_t *rip);  /* KVM_GET_REGS: 0 or -errno */
    /* one host-initiated access (KVM_GET_MSRS / KVM_SET_MSRS): 1 done, 0 refused, -errno */
    int (*host_msr)(int fd, void *ctx, uint32_t index, int is_write, uint64_t *value);
    void *ctx;
};

/* Decisions only counted (not logged), aggregated per vCPU instead of one ring record each:
 * owned by the vCPU's thread (written inside kg_loop_run, read and reset by the same thread
 * after it returns), so no atomics.  Entries are distinct (index, write, action, result, value,
 * would-deny) keys in first-seen order; a full table returns KG_LOOP_DRAIN before KVM_RUN. */
struct kg_count {               /* 32 bytes */
    uint32_t index;
    uint8_t  flags;             /* KG_RF_WRITE | KG_RF_WOULD_DENY */
    uint8_t  action;            /* KG_ACT_* */
    uint8_t  result;            /* KG_RES_* */
    uint8_t  reserved;
    uint32_t rule;
    uint32_t reserved2;
    uint64_t value;             /* KG_RES_VALUE: the value the read returned, else 0 */
    uint64_t count;
};

struct kg_counts {
    uint32_t n;                 /* entries in use */
    uint32_t capacity;
    uint64_t reserved;
    struct kg_count e[];
};

struct kg_loop {
    int fd;                                  /* the vCPU fd */
    struct kvm_run *run;                     /* its kvm_run mapping */
    const struct kg_table_header *table;     /* kg_table_validate'd */
    struct kg_state *state;                  /* emulated registers (may be NULL) */
    struct kg_ring *ring;                    /* audit ring, NULL: no records made */
    struct kg_counts *counts;                /* counted decisions; NULL: records in the ring */
    uint32_t vcpu;                           /* vCPU index written into records */
    uint32_t flags;                          /* KG_LOOP_* */
    uint64_t answered;                       /* out: MSR exits answered by this call */
    const struct kg_loop_ops *ops;           /* NULL: the real kernel */
    /* every answered exit as a record (kvmgate's keep_exits: the caller lists them), or NULL;
     * kg_record_fill of the final decision, no RIP, KG_RF_LOG as the policy said */
    struct kg_ring *keep;
    /* MSR indices, sorted ascending, whose WRMSR exits with reason FILTER return to the caller
     * unanswered (kvmgate's write interceptions); NULL when nintercept is 0 */
    const uint32_t *intercept;
    uint32_t nintercept;
    /* 0, or microseconds: after an answered exit, return KG_LOOP_TICK once this much time has
     * passed since the call began */
    uint32_t tick_us;
    /* NULL, or a counter the loop adds each answered exit to (a relaxed atomic store by this
     * thread only), so other threads can read the vCPU's progress while it runs */
    uint64_t *live;
};

int kg_loop_run(struct kg_loop *l);

#endif

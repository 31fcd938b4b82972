/* kvmgate wrap: the shared-memory layout between `kvmgate wrap` (the parent, Python:
 * kvmgate/wrap/layout.py mirrors this file) and the LD_PRELOAD shim inside the VMM (shim.c).
 *
 * One memfd, inherited by the VMM, mapped MAP_SHARED by both:
 *   offset 0                     struct shim_header
 *   header.stats_off             struct shim_stats[max_vcpus]: per-vCPU exit counters
 *   header.counts_off            struct shim_count[max_vcpus][counts_slots]: counted decisions
 *   header.mailbox_off           struct shim_mailbox: the policy the parent wants installed
 *   header.rings_off + i*stride  struct kg_ring (engine.h) for vCPU i, initialised by the shim
 * and two pipes: ctl (parent -> shim: one byte 'R' = install the mailbox) and status (shim ->
 * parent: text lines, see shim.c "status lines").
 *
 * The environment variable KVMGATE_SHIM="MEMFD:CTL:STATUS" (fd numbers) hands them over.
 */
#ifndef KVMGATE_SHIM_ABI_H
#define KVMGATE_SHIM_ABI_H

#include <stdint.h>

#define SHIM_ENV          "KVMGATE_SHIM"
#define SHIM_MAGIC        0x4d494853u      /* "SHIM" little-endian */
#define SHIM_VERSION      1u
#define SHIM_MAX_RANGES   16u              /* KVM_MSR_FILTER_MAX_RANGES */
#define SHIM_BITMAP_BYTES 0x600u           /* KVM_MSR_FILTER_MAX_BITMAP_SIZE: 0x3000 MSRs */
#define SHIM_NAME_BYTES   256u
#define SHIM_TABLE_MAX    (1u << 20)       /* engine table bytes the mailbox holds */

struct shim_range {                        /* one kvm_msr_filter_range with its bitmap inline */
    uint32_t flags;                        /* KVM_MSR_FILTER_READ | KVM_MSR_FILTER_WRITE */
    uint32_t base;
    uint32_t nmsrs;                        /* 0: unused */
    uint32_t reserved;
    uint8_t  bitmap[SHIM_BITMAP_BYTES];    /* bit set = allowed */
};

struct shim_filter {                       /* a whole kvm_msr_filter */
    uint32_t flags;                        /* KVM_MSR_FILTER_DEFAULT_ALLOW / _DENY */
    uint32_t nranges;
    struct shim_range ranges[SHIM_MAX_RANGES];
};

struct shim_mailbox {
    uint32_t seq;                          /* the parent bumps it with every policy it writes */
    uint32_t exit_mask;                    /* the policy's KVM_CAP_X86_USER_SPACE_MSR reasons */
    uint32_t table_len;                    /* bytes of table[] used */
    uint32_t reserved;
    char     name[SHIM_NAME_BYTES];        /* the policy's file, for messages */
    struct shim_filter filter;             /* the policy's own kernel filter */
    uint64_t table[SHIM_TABLE_MAX / 8];    /* the engine table (engine.h), 8-byte aligned */
};

struct shim_header {
    uint32_t magic;
    uint32_t version;
    uint32_t max_vcpus;                    /* rings available */
    uint32_t ring_capacity;                /* records per ring, power of two */
    uint64_t mailbox_off;
    uint64_t rings_off;
    uint64_t ring_stride;
    uint64_t total_size;
    uint64_t stats_off;                    /* struct shim_stats[max_vcpus] */
    uint32_t vcpus;                        /* shim: vCPUs created so far */
    uint32_t shim_pid;                     /* shim: the VMM's pid once a VM exists */
    uint64_t counts_off;                   /* struct shim_count[max_vcpus][counts_slots] */
    uint32_t counts_slots;                 /* per vCPU, power of two */
    uint32_t applied_seq;                  /* shim: mailbox seq of the policy in force (set just
                                              before vCPUs can see it: a VMM that exits before
                                              the status line still tells the reload's fate) */
    uint64_t options;                      /* parent: SHIM_OPT_* */
    uint64_t kvmi_off;                     /* SHIM_OPT_KVMI: struct shim_kvmi, then
                                              struct shim_kvmi_vcpu[max_vcpus] */
};

#define SHIM_OPT_LEARN 1u                  /* record the MSR exits QEMU answers (action NONE) and
                                              wait at KVM_CREATE_VM for 'G' on the ctl pipe (the
                                              parent starts its kvm:kvm_msr recording first) */

#define SHIM_OPT_KVMI 2u                   /* an introspection tool is attached (kvmgate wrap
                                              --introspect): guest writes to the MSRs in
                                              shim_kvmi.msrs go to the parent, which answers */

/* Introspection of a wrapped VM.  KVM answers vCPU ioctls only in the VMM process, so every
 * vCPU operation the tool needs is done by the shim on the vCPU's own thread while it waits
 * ("parks") for the parent:
 *   shim:   says "kvmi-run VCPU" at the vCPU's first KVM_RUN (the parent starts a worker
 *           that futex-waits on this vCPU's state); at a park fills the slot (kind, MSR,
 *           old/new, regs, sregs, state MSRs), state = PARKED, futex wake (no status line),
 *           then futex-waits on state;
 *   parent: state = REQ (a request, e.g. read MSRs) + wake, waits for REQ_DONE; finally
 *           action/value (+ set_regs) and state = REPLY + wake.
 * Pause: the parent sets pause_req and writes 'P' on the ctl pipe; the shim's control thread
 * sets kvm_run.immediate_exit and sends SIGUSR1 (QEMU's own kick signal) to the vCPU thread,
 * which parks with KIND_PAUSE before it re-enters KVM_RUN.
 * Controlled MSRs: the parent writes msrs/nmsrs, bumps seq, writes 'K'; the shim merges a
 * "deny writes" range per MSR into the installed filter and says "kvmi-filter SEQ ERRNO". */
#define SHIM_KVMI_MAX_MSRS 64u
#define SHIM_KVMI_REQ_MSRS 32u
#define SHIM_KVMI_STATE_MSRS 9u

enum { SHIM_KVMI_IDLE = 0, SHIM_KVMI_PARKED = 1, SHIM_KVMI_REQ = 2, SHIM_KVMI_REQ_DONE = 3,
       SHIM_KVMI_REPLY = 4 };
enum { SHIM_KVMI_KIND_MSR = 1, SHIM_KVMI_KIND_PAUSE = 2 };
enum { SHIM_KVMI_CONTINUE = 0, SHIM_KVMI_RETRY = 1, SHIM_KVMI_CRASH = 2 };
enum { SHIM_KVMI_REQ_GET_MSRS = 1 };

struct shim_kvmi {
    uint32_t seq;                          /* parent: bumped with each new msrs[] */
    uint32_t nmsrs;
    uint32_t msrs[SHIM_KVMI_MAX_MSRS];     /* guest writes that go to the parent */
};

struct shim_kvmi_vcpu {                    /* one per vCPU, 4096-byte stride */
    uint32_t state;                        /* futex word: SHIM_KVMI_* */
    uint32_t kind;                         /* shim: SHIM_KVMI_KIND_* of the park */
    uint32_t pause_req;                    /* parent: 1 = park with KIND_PAUSE soon */
    uint32_t action;                       /* parent: SHIM_KVMI_CONTINUE/RETRY/CRASH */
    uint32_t msr;                          /* KIND_MSR: the MSR written */
    uint32_t set_regs;                     /* parent: load regs[] before resuming */
    uint32_t tid;                          /* shim: the vCPU thread (gettid), 0 before its run */
    uint32_t req;                          /* parent: SHIM_KVMI_REQ_* */
    int32_t  req_result;                   /* shim: entries read, or -errno */
    uint32_t req_nmsrs;
    uint64_t old_value, new_value;         /* KIND_MSR: the MSR before, the guest's value */
    uint64_t value;                        /* parent: the value to store (CONTINUE) */
    uint64_t tsc_khz;                      /* shim: KVM_GET_TSC_KHZ at the first KVM_RUN */
    uint8_t  regs[144];                    /* struct kvm_regs */
    uint8_t  sregs[312];                   /* struct kvm_sregs */
    uint64_t state_msrs[SHIM_KVMI_STATE_MSRS];   /* 0x174 0x175 0x176 EFER STAR LSTAR CSTAR
                                                    PAT KERNEL_GS_BASE */
    uint32_t req_msrs[SHIM_KVMI_REQ_MSRS];
    uint64_t req_values[SHIM_KVMI_REQ_MSRS];
};

#define SHIM_KVMI_STRIDE 4096u

/* Decisions that are only counted (not logged) are summed here by their vCPU instead of
 * taking a ring record each: open addressing on (MSR, direction, action, result, value);
 * a full table falls back to the ring.  key 0 = free slot. */
struct shim_count {
    uint64_t key;                          /* index << 32 | would_deny << 25 | write << 24 |
                                              action << 16 | result << 8 | 1 */
    uint64_t value;                        /* KG_RES_VALUE: the value read, else 0 */
    uint64_t count;
    uint64_t reserved;
};

struct shim_stats {                        /* per vCPU, written by its thread only */
    uint64_t policy;                       /* MSR exits the policy answered */
    uint64_t vmm;                          /* MSR exits handed to the VMM */
    uint64_t gp;                           /* MSR exits nobody asked for: #GP */
    uint64_t host;                         /* exits only a replaced filter sent: done as KVM would */
    uint64_t tool;                         /* writes caught by the introspection tool's filter */
    uint64_t reserved[3];
};

#endif

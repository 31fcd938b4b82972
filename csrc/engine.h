/* kvmgate policy engine: evaluates a compiled MSR policy for one KVM MSR exit.
 *
 * The one implementation of the policy actions (deny, ignore, constant, emulate, forward =
 * allow + log, [unknown], [invalid], enforce/audit mode).  Python (kvmgate/engine/table.py)
 * compiles a CompiledPolicy into the binary table below; this engine is linked into the
 * LD_PRELOAD shim inside a VMM, into a C vCPU run loop, and into the kvmgate.engine._engine
 * CPython extension (policy explain, trace replay, differential tests).
 *
 * Exit path rules: no allocation, no locks, no libc calls in kg_decide / kg_host_done /
 * kg_ring_push.  kg_record_fill calls clock_gettime(CLOCK_REALTIME) (vDSO).  All memory is
 * the caller's: the table (read-only after validation), the emulated-register state (shared
 * by all vCPU threads, lock-free: 16-byte compare-and-swap per register) and one audit ring per
 * vCPU (single producer, single consumer; may live in shared memory between processes).
 *
 * KVM facts used: struct kvm_run.msr {error, reason, index, data} of KVM_EXIT_X86_RDMSR/WRMSR;
 * reasons KVM_MSR_EXIT_REASON_INVAL (1), _UNKNOWN (2), _FILTER (4) (docs/kvm-msr.md).
 * x86-64 only (the MSRs are x86's; cmpxchg16b is used for the registers).
 *
 * API version 1.  Stable: changes are announced in the commit message that makes them.
 */
#ifndef KVMGATE_ENGINE_H
#define KVMGATE_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KG_API_VERSION 1

/* ---- exit reasons (KVM_MSR_EXIT_REASON_*) ---- */
#define KG_REASON_INVAL   1u
#define KG_REASON_UNKNOWN 2u
#define KG_REASON_FILTER  4u

/* ---- action kinds (kg_action.kind, kg_decision.action, kg_record.action) ---- */
#define KG_ACT_NONE     0u  /* no action for this exit: #GP, neither recorded nor counted */
#define KG_ACT_DENY     1u  /* #GP */
#define KG_ACT_IGNORE   2u  /* reads 0, writes dropped */
#define KG_ACT_CONSTANT 3u  /* reads `value`; writes dropped or #GP (KG_AF_WRITES_GP) */
#define KG_ACT_EMULATE  4u  /* a user-space register: initial, write_mask, allowed list */
#define KG_ACT_FORWARD  5u  /* allow + log: the caller carries the access out host-initiated */
#define KG_ACT_MAX      5u

/* ---- results (kg_decision.result, kg_record.result) ---- */
#define KG_RES_VALUE    1u  /* read answered: return kg_decision.value      ("read 0x..") */
#define KG_RES_WRITTEN  2u  /* write done (emulated register / host access) ("written")   */
#define KG_RES_DROPPED  3u  /* write dropped                                ("dropped")   */
#define KG_RES_GP       4u  /* inject #GP (kvm_run.msr.error = 1)           ("#GP")       */
#define KG_RES_HOST     5u  /* caller must carry the access out host-initiated
                               (KVM_GET_MSRS / KVM_SET_MSRS), then call kg_host_done() */
#define KG_RES_MAX      5u

/* ---- decision flags (kg_decision.flags) ---- */
#define KG_DF_LOG        0x01u  /* write an audit record (else only count the decision) */
#define KG_DF_COUNT      0x02u  /* the decision is counted (clear only for KG_ACT_NONE) */
#define KG_DF_WOULD_DENY 0x04u  /* audit mode: the policy would have given #GP; KG_RES_HOST */
#define KG_DF_VALUE_DEP  0x08u  /* the result depends on the written value (emulate writes) */
#define KG_DF_STATE_FULL 0x10u  /* emulate write refused (#GP): no free register slot */

/* ---- table ---- */
#define KG_TABLE_MAGIC   0x3145474bu   /* "KGE1" little-endian */
#define KG_TABLE_VERSION 1u
#define KG_NONE          0xffffffffu   /* no action (header) / no rule */
#define KG_MODE_ENFORCE  0u
#define KG_MODE_AUDIT    1u            /* permissive: would-#GP of FILTER exits -> KG_RES_HOST */

/* kg_action.flags */
#define KG_AF_LOG         0x01u
#define KG_AF_WRITES_GP   0x02u   /* constant: writes #GP instead of being dropped */
#define KG_AF_HAS_ALLOWED 0x04u   /* emulate: only values in allowed[off, off+n) may be written */

/* Layout (little-endian, every section 8-byte aligned, in this order, nothing else):
 *   struct kg_table_header
 *   struct kg_action   actions[nactions]
 *   struct kg_span     spans[nspans_read]    sorted by lo, disjoint: RDMSR
 *   struct kg_span     spans[nspans_write]   sorted by lo, disjoint: WRMSR
 *   uint64_t           allowed[nallowed]     each emulate action's slice sorted ascending, unique
 * size == header_size + 48*nactions + 16*(nspans_read+nspans_write) + 8*nallowed.
 * checksum: CRC-32 (zlib's) of the whole table with the checksum field read as 0. */
struct kg_table_header {
    uint32_t magic;
    uint16_t version;
    uint16_t header_size;       /* sizeof(struct kg_table_header) = 64 */
    uint32_t size;              /* total bytes */
    uint32_t checksum;
    uint32_t mode;              /* KG_MODE_* */
    uint32_t default_action;    /* FILTER exits of MSRs in no span: action index or KG_NONE */
    uint32_t unknown_action;    /* UNKNOWN exits */
    uint32_t invalid_action;    /* INVAL exits */
    uint32_t nactions;
    uint32_t nspans_read;
    uint32_t nspans_write;
    uint32_t nallowed;
    uint32_t nemulate;          /* distinct MSR indices with an emulate action (state sizing) */
    uint32_t reserved[3];       /* 0 */
};

struct kg_action {
    uint8_t  kind;              /* KG_ACT_DENY .. KG_ACT_FORWARD */
    uint8_t  flags;             /* KG_AF_* */
    uint16_t reserved;          /* 0 */
    uint32_t rule;              /* rule id (index into the caller's rule descriptions) or KG_NONE */
    uint64_t value;             /* constant: value reads return; emulate: initial value */
    uint64_t write_mask;        /* emulate: bits a write may change; else 0 */
    uint32_t allowed_off;       /* emulate with KG_AF_HAS_ALLOWED: slice of allowed[]; else 0 */
    uint32_t allowed_n;
    uint64_t reserved2[2];      /* 0 */
};

struct kg_span {
    uint32_t lo, hi;            /* MSR indices, inclusive */
    uint32_t action;            /* index into actions[] */
    uint32_t reserved;          /* 0 */
};

/* kg_table_validate error codes (negative); kg_strerror() names them. */
#define KG_OK             0
#define KG_E_SHORT       -1   /* buffer smaller than a header / than header.size */
#define KG_E_MAGIC       -2
#define KG_E_VERSION     -3
#define KG_E_SIZE        -4   /* header_size / size do not match the counts */
#define KG_E_CHECKSUM    -5
#define KG_E_MODE        -6
#define KG_E_ACTION      -7   /* bad kind, flags, reserved bits or allowed slice */
#define KG_E_SPAN        -8   /* unsorted, overlapping, lo > hi, action out of range, reserved */
#define KG_E_HEADER_REF  -9   /* default/unknown/invalid action out of range */
#define KG_E_ALLOWED     -10  /* an allowed slice not strictly ascending */
#define KG_E_ALIGN       -11  /* table pointer not 8-byte aligned */
#define KG_E_RESERVED    -12  /* header reserved fields not 0 */

/* Check everything kg_decide relies on.  `buf` must be 8-byte aligned.  0 or KG_E_*. */
int kg_table_validate(const void *buf, size_t len);
const char *kg_strerror(int code);

/* ---- emulated registers: shared by all vCPUs, keyed by MSR index, survive table swaps ---- */
struct kg_reg {                 /* 16-byte aligned; both words change together (cmpxchg16b) */
    uint64_t value;
    uint64_t meta;              /* 0: free; else (uint64_t)index << 1 | 1 */
};

struct kg_state {
    uint32_t magic;             /* KG_STATE_MAGIC */
    uint32_t nslots;            /* power of two */
    uint64_t reserved;
    struct kg_reg slots[];      /* open addressing by MSR index, never deleted */
};
#define KG_STATE_MAGIC 0x3153474bu     /* "KGS1" */
#define KG_STATE_DEFAULT_SLOTS 4096u   /* written emulated MSRs it holds: the table builder
                                          refuses policies with more than half of this */

size_t kg_state_size(uint32_t nslots);
/* nslots must be a power of two >= 1; mem 16-byte aligned, >= kg_state_size(nslots) bytes,
 * not yet shared.  0 or -1. */
int kg_state_init(void *mem, size_t len, uint32_t nslots);
/* The register's value if the guest ever wrote it (1), else 0. */
int kg_state_get(const struct kg_state *s, uint32_t index, uint64_t *value);

/* ---- decisions ---- */
struct kg_decision {
    uint64_t value;             /* KG_RES_VALUE: the value the read returns */
    uint32_t rule;              /* rule id of the action, KG_NONE for KG_ACT_NONE */
    uint8_t  result;            /* KG_RES_* */
    uint8_t  action;            /* KG_ACT_* (the policy's action, also in audit mode) */
    uint8_t  flags;             /* KG_DF_* */
    uint8_t  reserved;
};

/* Decide one MSR exit.  `t` must have passed kg_table_validate.  `s` may be NULL: emulate
 * then reads the initial value and checks writes against it without storing (explain/replay).
 * `data` is kvm_run.msr.data (the value written; ignored for reads).  Thread-safe; returns 0. */
int kg_decide(const struct kg_table_header *t, struct kg_state *s, uint32_t index, int is_write,
              uint32_t reason, uint64_t data, struct kg_decision *out);

/* After KG_RES_HOST: the host-initiated access succeeded (ok != 0; `value` = what a read got)
 * or failed.  Sets result to KG_RES_VALUE/KG_RES_WRITTEN or KG_RES_GP. */
void kg_host_done(struct kg_decision *d, int is_write, int ok, uint64_t value);

/* ---- audit records and per-vCPU rings ---- */
/* kg_record.flags */
#define KG_RF_WRITE      0x01u
#define KG_RF_RIP        0x02u  /* rip is valid */
#define KG_RF_LOG        0x04u  /* an audit record (else a decision only counted) */
#define KG_RF_WOULD_DENY 0x08u  /* audit mode: the policy would have given #GP */

struct kg_record {              /* 64 bytes */
    uint64_t time_ns;           /* CLOCK_REALTIME */
    uint64_t rip;
    uint64_t data;              /* kvm_run.msr.data: the value written, 0 for reads */
    uint64_t value;             /* KG_RES_VALUE: the value returned to the read */
    uint32_t index;
    uint32_t vcpu;
    uint32_t rule;              /* rule id or KG_NONE */
    uint8_t  reason;            /* KG_REASON_* */
    uint8_t  action;            /* KG_ACT_* */
    uint8_t  result;            /* KG_RES_* (never KG_RES_HOST: call kg_host_done first) */
    uint8_t  flags;             /* KG_RF_* */
    uint64_t reserved[2];
};

/* Fill a record for a decision (time from clock_gettime(CLOCK_REALTIME)). */
void kg_record_fill(struct kg_record *r, const struct kg_decision *d, uint32_t vcpu,
                    uint64_t rip, int rip_valid, uint32_t index, int is_write, uint32_t reason,
                    uint64_t data);

/* Single-producer single-consumer ring in caller memory (may be MAP_SHARED between processes).
 * head: records pushed (producer only); tail: records popped (consumer only); both count
 * forever, slot = count & (capacity - 1).  Full: the record is dropped and `dropped` counted. */
struct kg_ring {
    uint32_t magic;             /* KG_RING_MAGIC */
    uint32_t version;           /* 1 */
    uint32_t capacity;          /* records, power of two */
    uint32_t record_size;       /* sizeof(struct kg_record) */
    uint8_t  pad0[48];
    uint64_t head;              /* offset 64: producer's line */
    uint64_t dropped;
    uint8_t  pad1[48];
    uint64_t tail;              /* offset 128: consumer's line */
    uint8_t  pad2[56];
    struct kg_record records[]; /* offset 192 */
};
#define KG_RING_MAGIC 0x3152474bu      /* "KGR1" */

size_t kg_ring_size(uint32_t capacity);
/* capacity a power of two >= 2; mem 64-byte aligned, >= kg_ring_size(capacity).  0 or -1. */
int kg_ring_init(void *mem, size_t len, uint32_t capacity);
/* Never blocks: 0 pushed, -1 full (dropped counted). */
int kg_ring_push(struct kg_ring *r, const struct kg_record *rec);
/* 1 popped into *out, 0 empty.  The consumer must have checked r->capacity against the size
 * of its mapping; a head more than capacity ahead of tail (a corrupt producer) reads as empty. */
int kg_ring_pop(struct kg_ring *r, struct kg_record *out);

#ifdef __cplusplus
}
#endif
#endif

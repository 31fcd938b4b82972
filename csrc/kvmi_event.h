/* kvmgate introspection MSR events on the vCPU's own thread, without Python
 * (docs/introspection.md §3 "who reads the socket", §5 "the event path").
 *
 * kg_ev_msr_write() is called by the C exit loops right after KVM_RUN returned a
 * KVM_EXIT_X86_WRMSR with reason KVM_MSR_EXIT_REASON_FILTER for an MSR routed to the
 * introspection interception (kvmgate/vm/gate.py).  For the common case it does in C what
 * kvmgate/introspection/machine_backend.py `_on_write` and server.py `msr_event` do in Python:
 *
 *   1. the tool wants the write (the MSR is controlled on this vCPU, the MSR event enabled and
 *      allowed: the table Python publishes per vCPU, read under a sequence counter);
 *   2. one KVM_GET_MSRS of the nine state MSRs and the written one (the old value);
 *      unchanged value: store it (host-initiated KVM_SET_MSRS) and go on, no event (KVMI's rule);
 *   3. take the session's reader token (free and nobody in Python waiting for it), build the
 *      MSR event from the dialect's template (state block: mode, kvm_regs and kvm_sregs from
 *      kvm_run.s, KVM_CAP_SYNC_REGS; the nine MSRs; the payload), send it;
 *   4. read the tool's reply itself: non-blocking recv(2) and sched_yield(2) for poll_ns, then
 *      poll(2) (at most WAIT_SLICE_MS at a time, looking at kvm_run.immediate_exit in between:
 *      a kick hands the wait to Python, where the vCPU counts as parked); a reply of exactly the expected shape (this seq, vCPU, event, CONTINUE or
 *      RETRY, zero padding, 24 bytes) is applied: host-initiated KVM_SET_MSRS of the tool's
 *      value (CONTINUE) or the old one (RETRY), #GP in kvm_run when KVM refuses the store, as
 *      the Python router does.
 *
 * Anything else goes to Python, which has the whole protocol: before anything is sent
 * (KG_EV_PYTHON: not wanted, no sync regs yet, a state MSR KVM cannot read, token busy, a
 * failed send), or after (KG_EV_HANDOFF: the bytes read so far and the event's seq are left in
 * the vCPU's handoff slot, the token stays taken; Python adopts both and goes on reading: a
 * command before the reply, CRASH, a malformed or short reply, EOF, a socket error, a signal
 * (kick, stop, Ctrl-C) or the event timeout).  Reads never go past the expected reply's 32
 * bytes, so no byte of a later message is ever consumed here.
 *
 * The reader token (one word per session, shared with kvmgate/introspection/inbox.py):
 * KG_TOKEN_FREE (nobody reads, the Python reader's buffer is empty), KG_TOKEN_PY (a Python
 * thread holds it, or it is Python's to drain), KG_TOKEN_C (a vCPU thread here holds it),
 * KG_TOKEN_DEAD (the session is over: the socket may be closed, never touched again).  Only C
 * moves FREE -> C and C -> FREE; the socket is only used while holding the token.
 *
 * No allocation, no lock, no Python.  Every field is set up by Python (csrc/event_module.c)
 * before the port is armed. */
#ifndef KVMGATE_KVMI_EVENT_H
#define KVMGATE_KVMI_EVENT_H

#include <linux/kvm.h>
#include <stdint.h>

#define KG_TOKEN_FREE 0u
#define KG_TOKEN_PY   1u
#define KG_TOKEN_C    2u
#define KG_TOKEN_DEAD 3u

#define KG_EV_PYTHON  0   /* nothing sent, kvm_run untouched: the exit goes the Python way */
#define KG_EV_DONE    1   /* answered in kvm_run (value stored, or #GP) */
#define KG_EV_HANDOFF 2   /* event sent, the rest is Python's (vcpu handoff slot, token held) */

#define KG_EV_MAX_MSRS   64    /* wanted MSRs per vCPU (more: Python handles the rest) */
#define KG_EV_REPLY_SIZE 32    /* header 8, vCPU header 8, common reply 8, MSR reply 8 */
#define KG_EV_MSG_MAX    1024  /* the MSR event message (v12 584 bytes, kvmi-v7 576) */
#define KG_EV_STATE_SIZE 536   /* mode, 7 pad, kvm_regs, kvm_sregs, 9 MSRs */
#define KG_EV_NSTATE     9

struct kg_ev_vcpu {
    /* written by Python (any thread), read by this vCPU's thread: a sequence counter */
    uint32_t gen;                       /* odd while Python rewrites n/msrs */
    uint32_t n;
    uint32_t msrs[KG_EV_MAX_MSRS];      /* sorted ascending */
    /* the handoff slot: written by this vCPU's thread in C, read by it in Python */
    uint32_t handoff;                   /* 1: an event is outstanding, Python's to finish */
    uint32_t h_seq, h_msr, h_len;
    uint64_t h_old, h_new;
    int64_t h_start_ns;                 /* CLOCK_MONOTONIC when the event was sent */
    unsigned char h_bytes[KG_EV_REPLY_SIZE];
    /* KVM_GET_MSRS buffer: the state MSRs, then the written MSR when not among them */
    struct {
        struct kvm_msrs hdr;
        struct kvm_msr_entry e[KG_EV_NSTATE + 1];
    } get;
    unsigned char msg[KG_EV_MSG_MAX];   /* this vCPU's event message, built from the template */
};

struct kg_ev_port {
    uint32_t token;                     /* KG_TOKEN_* */
    uint32_t py_wanted;                 /* Python threads between want() and the end of wait() */
    uint32_t seq;                       /* the session's last event seq (atomic add) */
    int sock;                           /* the session socket */
    /* the dialect: template of the MSR event with zero seq, state and payload */
    uint32_t msg_len, seq_at, vcpu_at, state_at, payload_at;
    uint16_t reply_id;                  /* message id of event replies */
    uint8_t event_wire;                 /* the MSR event's id on the wire */
    uint8_t reserved;
    int64_t poll_ns;                    /* spin this long before sleeping in poll(2) */
    int64_t timeout_ns;                 /* the event timeout; < 0: none */
    int64_t released_ns;                /* CLOCK_MONOTONIC of C's last token release */
    uint64_t events;                    /* MSR events sent here (atomic) */
    uint64_t writes;                    /* intercepted writes answered here (atomic) */
    uint32_t nvcpus;
    struct kg_ev_vcpu *v;               /* nvcpus entries */
    /* KVM_GET_MSRS / KVM_SET_MSRS on the vCPU fd (ioctl's result, -1 with errno); NULL: the
     * real ioctl (a fake kernel in csrc/test_kvmi_event.c) */
    int (*msrs_ioctl)(int fd, unsigned long request, struct kvm_msrs *msrs, void *ctx);
    void *ctx;
    unsigned char tmpl[KG_EV_MSG_MAX];
};

/* The MSR event of `run` (a WRMSR exit, reason FILTER, on vCPU `vcpu` whose fd is `fd`):
 * KG_EV_PYTHON, KG_EV_DONE or KG_EV_HANDOFF as above. */
int kg_ev_msr_write(struct kg_ev_port *p, uint32_t vcpu, int fd, struct kvm_run *run);

/* KVMI's mode from raw kvm_sregs: 8 (EFER.LMA and CS.L), 4 (CS.D/B) or 2 */
uint8_t kg_ev_mode(const struct kvm_sregs *s);

/* The state MSRs, in the state block's order (kvmgate/introspection/vcpu_state.py). */
extern const uint32_t kg_ev_state_msrs[KG_EV_NSTATE];

#endif

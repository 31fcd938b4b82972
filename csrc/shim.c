/* kvmgate shim: LD_PRELOAD library that puts an unmodified VMM's (QEMU's) guest MSR accesses
 * under a kvmgate policy from inside the VMM process (KVM answers VM ioctls only to the process
 * that created the VM: EIO for anyone else).
 *
 * It interposes ioctl() and close() and acts only on fds it saw come out of /dev/kvm:
 *   KVM_CREATE_VM (on /dev/kvm)  -> map the parent's shared memory, install the policy's exit
 *                                   mask and filter; if that fails the VM is not created.
 *   KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR) on the VM: remember the VMM's mask, install the
 *                                   union with the policy's.
 *   KVM_X86_SET_MSR_FILTER on the VM: remember the VMM's filter, install the merge: an
 *                                   (MSR, direction) is allowed only if both filters allow it.
 *   KVM_CREATE_VCPU              -> map the vCPU's kvm_run, set up its audit ring.
 *   KVM_RUN                      -> MSR exits (KVM_EXIT_X86_RDMSR/WRMSR) the VMM did not ask
 *                                   for are answered here (the engine, engine.h) and KVM_RUN
 *                                   is entered again; everything else returns to the VMM.
 * A process that never creates a VM (the VMM's helpers, qemu-img) sees plain ioctl()/close().
 *
 * Who answers an MSR exit (reason R, MSR i, direction d):
 *   1. the policy, if a rule of the policy names (i, d) and the policy's exit mask has R;
 *   2. the VMM, if its mask has R and, for FILTER, its own filter denies (i, d);
 *   3. the policy, if its mask has R and, for FILTER, its own filter denies (i, d);
 *   4. otherwise, if the installed merge denies (i, d): #GP, what KVM gives when nobody exits;
 *      else the exit came from a filter just replaced: the access is carried out host-initiated
 *      (KVM_GET_MSRS / KVM_SET_MSRS), as KVM would have under the new filter.
 *
 * Exit path (KVM_RUN): no allocation, no lock, no Python, nothing that blocks: per-vCPU state
 * and ring; the installed configuration is read through one atomic pointer.  Configuration
 * changes (VM creation, the VMM's cap/filter calls, reloads from the control thread) are
 * serialised by a mutex, build the new configuration in the spare buffer, publish it, then
 * install it in KVM, and wait until no vCPU still reads the old buffer before reusing it.
 *
 * Status lines to the parent (status pipe): "active PID", "vcpu N", "reloaded SEQ",
 * "refused SEQ REASON", "merged VMMRANGES MERGEDRANGES", "failed REASON".
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/futex.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "engine.h"
#include "shim_abi.h"

#define MAX_FDS   65536
#define MAX_VCPUS 256

enum fdkind { FD_NONE = 0, FD_VM = 1, FD_VCPU = 2 };

struct config {                          /* one installed configuration (private memory) */
    uint32_t policy_mask, vmm_mask;
    uint32_t seq;                        /* the mailbox seq it came from */
    char name[SHIM_NAME_BYTES];
    struct shim_filter policy, vmm, tool, merged;   /* tool: writes the introspection tool
                                                       controls (deny = exit to us) */
    const struct kg_table_header *table; /* points into tablebuf */
    uint64_t tablebuf[SHIM_TABLE_MAX / 8];
};

struct vcpu {
    int fd;
    uint32_t index;                      /* creation order: kvmgate's vCPU number */
    struct kvm_run *run;
    struct kg_ring *ring;                /* NULL if more vCPUs than rings */
    struct shim_stats *stats;
    struct shim_count *counts;           /* NULL if more vCPUs than rings */
    struct config *volatile using;       /* the configuration this vCPU is reading, or NULL */
    int vmm_pending;                     /* learn: an MSR exit handed to the VMM, answer unseen */
    uint32_t pending_index, pending_reason;
    int pending_write;
    uint64_t pending_data;
    struct shim_kvmi_vcpu *kvmi;         /* SHIM_OPT_KVMI: this vCPU's slot, else NULL */
};

typedef int (*ioctl_fn)(int, unsigned long, ...);
typedef int (*close_fn)(int);

static ioctl_fn real_ioctl;
static close_fn real_close;
static unsigned char fdkind[MAX_FDS];
static struct vcpu *vcpu_of_fd[MAX_FDS];
static struct vcpu vcpus[MAX_VCPUS];
static uint32_t nvcpus;

static int configured;                   /* KVMGATE_SHIM parsed */
static int shm_fd = -1, ctl_fd = -1, status_fd = -1;
static struct shim_header *shm;
static struct shim_mailbox *mailbox;
static struct shim_stats spare_stats[MAX_VCPUS];   /* vCPUs beyond the shared rings */
static int vm_fd = -1;
static int vm_closed;                    /* the VMM closed its VM fd: nothing left to reload */
static struct config *cur;               /* exit path: __atomic_load_n */
static struct config *bufs[2];
static struct kg_state *regs;            /* emulated registers: shared by vCPUs, survive reloads */
static pthread_mutex_t cfg_lock = PTHREAD_MUTEX_INITIALIZER;
static const char *setup_error;          /* why KVMGATE_SHIM could not be used */
static int kvmi_on;                      /* SHIM_OPT_KVMI and its area is valid */
static struct shim_kvmi *kvmi;

/* ------------------------------------------------------------------ messages */

static void status(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void status(const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0 || status_fd < 0)
        return;
    if (n > (int)sizeof line - 2)
        n = sizeof line - 2;
    line[n++] = '\n';
    ssize_t w = write(status_fd, line, n);
    (void)w;
}

static void complain(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void complain(const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    fprintf(stderr, "kvmgate: %s\n", line);
    status("failed %s", line);
}

/* ------------------------------------------------------------------ set-up */

__attribute__((constructor)) static void shim_init(void)
{
    real_ioctl = (ioctl_fn)dlsym(RTLD_NEXT, "ioctl");
    real_close = (close_fn)dlsym(RTLD_NEXT, "close");
    const char *env = getenv(SHIM_ENV);
    if (env == NULL)
        return;                          /* no parent: a VM created here is refused */
    configured = 1;
    if (sscanf(env, "%d:%d:%d", &shm_fd, &ctl_fd, &status_fd) != 3) {
        setup_error = SHIM_ENV " is not MEMFD:CTL:STATUS";
        shm_fd = ctl_fd = status_fd = -1;
        return;
    }
    /* the VMM's own children (helpers, scripts) must not inherit the channel */
    fcntl(shm_fd, F_SETFD, FD_CLOEXEC);
    fcntl(ctl_fd, F_SETFD, FD_CLOEXEC);
    fcntl(status_fd, F_SETFD, FD_CLOEXEC);
    /* a status line never blocks the VMM (the parent reads them as they come) */
    fcntl(status_fd, F_SETFL, fcntl(status_fd, F_GETFL) | O_NONBLOCK);
}

static int map_shared(void)
{
    struct stat st;
    if (shm_fd < 0 || fstat(shm_fd, &st) < 0 || (size_t)st.st_size < sizeof(struct shim_header)) {
        setup_error = setup_error ? setup_error : "the shared memory from kvmgate is missing";
        return -1;
    }
    void *p = mmap(NULL, st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, shm_fd, 0);
    if (p == MAP_FAILED) {
        setup_error = "cannot map the shared memory from kvmgate";
        return -1;
    }
    struct shim_header *h = p;
    if (h->magic != SHIM_MAGIC || h->version != SHIM_VERSION || h->total_size != (uint64_t)st.st_size ||
        h->mailbox_off + sizeof(struct shim_mailbox) > h->total_size ||
        h->stats_off + (uint64_t)h->max_vcpus * sizeof(struct shim_stats) > h->total_size ||
        h->rings_off + (uint64_t)h->max_vcpus * h->ring_stride > h->total_size ||
        h->ring_stride < kg_ring_size(h->ring_capacity) || (h->mailbox_off & 7) ||
        !h->counts_slots || (h->counts_slots & (h->counts_slots - 1)) || (h->counts_off & 7) ||
        h->counts_off + (uint64_t)h->max_vcpus * h->counts_slots * sizeof(struct shim_count) >
            h->total_size) {
        munmap(p, st.st_size);
        setup_error = "the shared memory from kvmgate has another layout (version mismatch?)";
        return -1;
    }
    shm = h;
    mailbox = (struct shim_mailbox *)((char *)p + h->mailbox_off);
    return 0;
}

/* ------------------------------------------------------------------ filters */

static int range_allows(const struct shim_filter *f, uint32_t index, uint32_t dir, int *hit)
{
    for (uint32_t i = 0; i < f->nranges; i++) {
        const struct shim_range *r = &f->ranges[i];
        uint32_t end = r->base + r->nmsrs;          /* KVM's u32 end: a wrapping range covers nothing */
        if ((r->flags & dir) && index >= r->base && index < end) {
            *hit = 1;
            uint32_t b = index - r->base;
            return (r->bitmap[b >> 3] >> (b & 7)) & 1;
        }
    }
    *hit = 0;
    return !(f->flags & KVM_MSR_FILTER_DEFAULT_DENY);
}

/* KVM's rule (kvm_msr_allowed): x2APIC MSRs are never filtered; the first range with the
 * direction's flag that holds the index decides; else the default. */
static int filter_allows(const struct shim_filter *f, uint32_t index, uint32_t dir)
{
    int hit;
    if (index >= 0x800 && index <= 0x8ff)
        return 1;
    return range_allows(f, index, dir, &hit);
}

/* Copy a kvm_msr_filter from the VMM, checking it as KVM would (EINVAL); EFAULT if unreadable
 * bitmaps make the copy fault is left to the kernel's own call, which sees the same pointers. */
static int copy_filter(struct shim_filter *out, const struct kvm_msr_filter *in)
{
    memset(out, 0, sizeof *out);
    if (in->flags & ~(uint32_t)KVM_MSR_FILTER_DEFAULT_DENY)
        return -EINVAL;
    out->flags = in->flags;
    int empty = 1;
    for (int i = 0; i < KVM_MSR_FILTER_MAX_RANGES; i++) {
        const struct kvm_msr_filter_range *r = &in->ranges[i];
        if (!r->nmsrs)
            continue;
        empty = 0;
        if (!r->flags || (r->flags & ~(uint32_t)(KVM_MSR_FILTER_READ | KVM_MSR_FILTER_WRITE)))
            return -EINVAL;
        size_t bytes = ((size_t)r->nmsrs + 63) / 64 * 8;
        if (bytes > SHIM_BITMAP_BYTES || r->bitmap == NULL)
            return -EINVAL;
        struct shim_range *o = &out->ranges[out->nranges++];
        o->flags = r->flags;
        o->base = r->base;
        o->nmsrs = r->nmsrs;
        memcpy(o->bitmap, r->bitmap, (r->nmsrs + 7) / 8);
        if (r->nmsrs & 7)                /* bits beyond nmsrs are never looked at */
            o->bitmap[r->nmsrs / 8] &= (uint8_t)((1u << (r->nmsrs & 7)) - 1);
    }
    if (empty && (in->flags & KVM_MSR_FILTER_DEFAULT_DENY))
        return -EINVAL;
    return 0;
}

struct span { uint32_t lo, hi; };        /* [lo, hi) */

static int span_cmp(const void *a, const void *b)
{
    const struct span *x = a, *y = b;
    return x->lo < y->lo ? -1 : x->lo > y->lo;
}

/* The windows where either filter has a range for `dir`: overlapping or touching ranges
 * joined, then cut into pieces of at most 0x3000 MSRs (one kernel range each). */
static int windows(const struct shim_filter *a, const struct shim_filter *b, uint32_t dir,
                   struct span *out, int max)
{
    struct span s[2 * SHIM_MAX_RANGES];
    int n = 0, m = 0;
    const struct shim_filter *fs[2] = {a, b};
    for (int k = 0; k < 2; k++)
        for (uint32_t i = 0; i < fs[k]->nranges; i++)
            if ((fs[k]->ranges[i].flags & dir) &&
                (uint64_t)fs[k]->ranges[i].base + fs[k]->ranges[i].nmsrs <= 0xffffffffu)
                s[n++] = (struct span){fs[k]->ranges[i].base,
                                       fs[k]->ranges[i].base + fs[k]->ranges[i].nmsrs};
    qsort(s, n, sizeof s[0], span_cmp);
    for (int i = 0; i < n;) {
        uint64_t lo = s[i].lo, hi = s[i].hi;
        for (i++; i < n && s[i].lo <= hi; i++)
            if (s[i].hi > hi)
                hi = s[i].hi;
        for (uint64_t p = lo; p < hi; p += SHIM_BITMAP_BYTES * 8) {
            if (m == max)
                return -1;
            uint64_t e = p + SHIM_BITMAP_BYTES * 8;
            out[m++] = (struct span){(uint32_t)p, (uint32_t)(e < hi ? e : hi)};
        }
    }
    return m;
}

/* merged = (policy AND vmm), in at most 16 kernel ranges; -1 if it does not fit. */
static int merge_filters(struct shim_filter *out, const struct shim_filter *pol,
                         const struct shim_filter *vmm)
{
    static const uint32_t dirs[2] = {KVM_MSR_FILTER_READ, KVM_MSR_FILTER_WRITE};
    struct span w[2][64];
    int nw[2];
    memset(out, 0, sizeof *out);
    out->flags = (pol->flags | vmm->flags) & KVM_MSR_FILTER_DEFAULT_DENY;
    for (int d = 0; d < 2; d++)
        if ((nw[d] = windows(pol, vmm, dirs[d], w[d], 64)) < 0)
            return -1;
    /* a window read and write share with the same verdicts becomes one READ|WRITE range */
    int used[2][64] = {{0}};
    for (int d = 0; d < 2; d++) {
        for (int i = 0; i < nw[d]; i++) {
            if (used[d][i])
                continue;
            if (out->nranges == SHIM_MAX_RANGES)
                return -1;
            struct shim_range *r = &out->ranges[out->nranges++];
            r->base = w[d][i].lo;
            r->nmsrs = w[d][i].hi - w[d][i].lo;
            r->flags = dirs[d];
            int same = -1;
            for (uint32_t k = 0; k < r->nmsrs; k++) {
                uint32_t idx = r->base + k;
                if (filter_allows(pol, idx, dirs[d]) && filter_allows(vmm, idx, dirs[d]))
                    r->bitmap[k >> 3] |= (uint8_t)(1u << (k & 7));
            }
            if (d == 0) {
                for (int j = 0; j < nw[1] && same < 0; j++)
                    if (!used[1][j] && w[1][j].lo == w[0][i].lo && w[1][j].hi == w[0][i].hi)
                        same = j;
                if (same >= 0) {
                    int equal = 1;
                    for (uint32_t k = 0; k < r->nmsrs && equal; k++) {
                        uint32_t idx = r->base + k;
                        int wr = filter_allows(pol, idx, KVM_MSR_FILTER_WRITE) &&
                                 filter_allows(vmm, idx, KVM_MSR_FILTER_WRITE);
                        equal = wr == ((r->bitmap[k >> 3] >> (k & 7)) & 1);
                    }
                    if (equal) {
                        r->flags |= KVM_MSR_FILTER_WRITE;
                        used[1][same] = 1;
                    }
                }
            }
        }
    }
    if (out->nranges == 0 && (out->flags & KVM_MSR_FILTER_DEFAULT_DENY)) {
        /* KVM wants a range with DEFAULT_DENY: one that denies MSR 0 reads (denied anyway) */
        out->ranges[0] = (struct shim_range){.flags = KVM_MSR_FILTER_READ, .base = 0, .nmsrs = 1};
        out->nranges = 1;
    }
    return 0;
}

/* n->merged = policy AND vmm AND tool; -1 if it does not fit 16 kernel ranges. */
static int merge_all(struct config *n)
{
    if (n->tool.nranges == 0)
        return merge_filters(&n->merged, &n->policy, &n->vmm);
    static struct shim_filter tmp;       /* cfg_lock held */
    if (merge_filters(&tmp, &n->policy, &n->vmm) < 0)
        return -1;
    return merge_filters(&n->merged, &tmp, &n->tool);
}

static int install_filter(const struct shim_filter *f)
{
    struct kvm_msr_filter k;
    memset(&k, 0, sizeof k);
    k.flags = f->flags;
    for (uint32_t i = 0; i < f->nranges; i++) {
        k.ranges[i].flags = f->ranges[i].flags;
        k.ranges[i].base = f->ranges[i].base;
        k.ranges[i].nmsrs = f->ranges[i].nmsrs;
        k.ranges[i].bitmap = (uint8_t *)f->ranges[i].bitmap;
    }
    return real_ioctl(vm_fd, KVM_X86_SET_MSR_FILTER, &k);
}

static int install_mask(uint32_t mask)
{
    struct kvm_enable_cap cap;
    memset(&cap, 0, sizeof cap);
    cap.cap = KVM_CAP_X86_USER_SPACE_MSR;
    cap.args[0] = mask;
    return real_ioctl(vm_fd, KVM_ENABLE_CAP, &cap);
}

/* ------------------------------------------------------------------ configurations */

static struct config *spare(void)
{
    return cur == bufs[0] ? bufs[1] : bufs[0];
}

/* Wait until no vCPU reads `c` (it was just replaced): then it may be rewritten. */
static void quiesce(struct config *c)
{
    for (uint32_t i = 0; i < nvcpus; i++)
        while (__atomic_load_n(&vcpus[i].using, __ATOMIC_ACQUIRE) == c)
            sched_yield();
}

/* Publish `n`, then install its mask and merged filter; on a kernel refusal put back the
 * previous configuration.  0 or -errno.  cfg_lock held. */
static int publish(struct config *n)
{
    struct config *old = cur;
    uint32_t old_seq = shm->applied_seq;
    __atomic_store_n(&shm->applied_seq, n->seq, __ATOMIC_RELEASE);
    __atomic_store_n(&cur, n, __ATOMIC_RELEASE);
    int r = install_mask(n->policy_mask | n->vmm_mask);
    if (r == 0)
        r = install_filter(&n->merged);
    if (r < 0) {
        r = -errno;
        __atomic_store_n(&shm->applied_seq, old_seq, __ATOMIC_RELEASE);
        if (old != NULL) {
            __atomic_store_n(&cur, old, __ATOMIC_RELEASE);
            install_mask(old->policy_mask | old->vmm_mask);
            install_filter(&old->merged);
        }
        quiesce(n);
        return r;
    }
    if (old != NULL)
        quiesce(old);
    return 0;
}

/* The mailbox's policy into `n` (validated); NULL or why not. */
static const char *take_mailbox(struct config *n)
{
    uint32_t seq = __atomic_load_n(&mailbox->seq, __ATOMIC_ACQUIRE);
    uint32_t len = mailbox->table_len;
    if (len > SHIM_TABLE_MAX)
        return "engine table larger than the mailbox";
    memcpy(n->tablebuf, mailbox->table, len);
    n->seq = seq;
    n->policy_mask = mailbox->exit_mask;
    memcpy(n->name, mailbox->name, SHIM_NAME_BYTES);
    n->name[SHIM_NAME_BYTES - 1] = 0;
    memcpy(&n->policy, &mailbox->filter, sizeof n->policy);
    if (n->policy_mask & ~(uint32_t)(KG_REASON_INVAL | KG_REASON_UNKNOWN | KG_REASON_FILTER))
        return "bad exit mask";
    if (n->policy.nranges > SHIM_MAX_RANGES)
        return "bad filter: more than 16 ranges";
    for (uint32_t i = 0; i < n->policy.nranges; i++)
        if (n->policy.ranges[i].nmsrs > SHIM_BITMAP_BYTES * 8 || !n->policy.ranges[i].nmsrs)
            return "bad filter range";
    int v = kg_table_validate(n->tablebuf, len);
    if (v != KG_OK)
        return kg_strerror(v);
    n->table = (const struct kg_table_header *)n->tablebuf;
    return NULL;
}

static void *control_thread(void *arg);

/* After KVM_CREATE_VM succeeded on `fd`: install the policy or refuse the VM.  0 or -errno. */
static int adopt_vm(int fd)
{
    if (vm_fd >= 0) {
        complain("the shim serves one VM per process; a second KVM_CREATE_VM is refused");
        return -EBUSY;
    }
    if (!configured || shm == NULL) {
        if (configured && map_shared() == 0)
            goto mapped;
        complain("no policy: %s; the VM is not created (run the VMM through `kvmgate wrap`)",
                 setup_error ? setup_error : SHIM_ENV " is not set");
        return -EPERM;
    }
mapped:
    for (int i = 0; i < 2; i++) {
        void *p = mmap(NULL, sizeof(struct config), PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) {
            complain("cannot allocate the shim's configuration: %s", strerror(errno));
            return -ENOMEM;
        }
        bufs[i] = p;
    }
    size_t rs = kg_state_size(KG_STATE_DEFAULT_SLOTS);
    void *rp = mmap(NULL, rs, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (rp == MAP_FAILED || kg_state_init(rp, rs, KG_STATE_DEFAULT_SLOTS) < 0) {
        complain("cannot allocate the emulated registers");
        return -ENOMEM;
    }
    regs = rp;
    vm_fd = fd;
    struct config *n = bufs[0];
    const char *why = take_mailbox(n);
    if (why != NULL) {
        complain("policy %s cannot be installed: %s; the VM is not created", n->name, why);
        vm_fd = -1;
        return -EINVAL;
    }
    n->vmm_mask = 0;
    memset(&n->vmm, 0, sizeof n->vmm);   /* no VMM filter yet: allow everything */
    memset(&n->tool, 0, sizeof n->tool); /* no tool yet */
    if (merge_all(n) < 0) {
        complain("policy %s cannot be installed: its filter needs more than 16 ranges; "
                 "the VM is not created", n->name);
        vm_fd = -1;
        return -ENOSPC;
    }
    int r = publish(n);
    if (r < 0) {
        complain("policy %s cannot be installed: %s: %s; the VM is not created", n->name,
                 "KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR) / KVM_X86_SET_MSR_FILTER", strerror(-r));
        __atomic_store_n(&cur, NULL, __ATOMIC_RELEASE);
        vm_fd = -1;
        return r;
    }
    shm->shim_pid = (uint32_t)getpid();
    if (shm->options & SHIM_OPT_KVMI) {
        if (shm->kvmi_off < sizeof *shm || (shm->kvmi_off & 4095) ||
            shm->kvmi_off + SHIM_KVMI_STRIDE * (1 + (uint64_t)shm->max_vcpus) > shm->total_size) {
            complain("introspection: the shared memory has no room for it; the VM is not created");
            __atomic_store_n(&cur, NULL, __ATOMIC_RELEASE);
            vm_fd = -1;
            return -EINVAL;
        }
        kvmi = (struct shim_kvmi *)((char *)shm + shm->kvmi_off);
        kvmi_on = 1;
    }
    if (shm->options & SHIM_OPT_LEARN) {
        /* the parent starts recording this process's kvm:kvm_msr events, then says 'G' */
        status("learn-wait %d", (int)getpid());
        char go = 0;
        ssize_t got;
        do
            got = read(ctl_fd, &go, 1);
        while (got < 0 && errno == EINTR);
        if (got != 1 || go != 'G') {
            complain("learn: kvmgate did not start recording; the VM is not created");
            __atomic_store_n(&cur, NULL, __ATOMIC_RELEASE);
            vm_fd = -1;
            return -EPERM;
        }
    }
    pthread_t t;
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    if (pthread_create(&t, &at, control_thread, NULL) != 0) {
        complain("cannot start the shim's control thread; the VM is not created");
        __atomic_store_n(&cur, NULL, __ATOMIC_RELEASE);
        vm_fd = -1;
        return -EAGAIN;
    }
    pthread_attr_destroy(&at);
    status("active %d %u", (int)getpid(), n->seq);
    return 0;
}

/* A change of the VMM's mask or filter: redo the merge.  0 or -errno (the VMM sees it). */
static int vmm_changed(const uint32_t *mask, const struct shim_filter *vmm)
{
    pthread_mutex_lock(&cfg_lock);
    struct config *n = spare(), *c = cur;
    memcpy(n, c, offsetof(struct config, tablebuf));
    memcpy(n->tablebuf, c->tablebuf, c->table->size);
    n->table = (const struct kg_table_header *)n->tablebuf;
    if (mask != NULL)
        n->vmm_mask = *mask;
    if (vmm != NULL)
        memcpy(&n->vmm, vmm, sizeof n->vmm);
    int r;
    if (merge_all(n) < 0) {
        complain("policy %s and the VMM's own MSR filter (%u ranges) do not fit 16 kernel ranges "
                 "together; the VMM's filter is refused", n->name, vmm ? vmm->nranges : 0);
        r = -ENOSPC;
    } else {
        r = publish(n);
        if (r == 0 && vmm != NULL)
            status("merged %u %u", n->vmm.nranges, n->merged.nranges);
    }
    pthread_mutex_unlock(&cfg_lock);
    return r;
}

static void reload(void)
{
    pthread_mutex_lock(&cfg_lock);
    struct config *n = spare(), *c = cur;
    const char *why = vm_closed ? "the VM is gone" : take_mailbox(n);
    if (why == NULL) {
        n->vmm_mask = c->vmm_mask;
        memcpy(&n->vmm, &c->vmm, sizeof n->vmm);
        memcpy(&n->tool, &c->tool, sizeof n->tool);
        if (merge_all(n) < 0)
            why = "with the VMM's own filter it needs more than 16 kernel ranges";
        else if (publish(n) < 0)
            why = "KVM refused the merged filter";
    }
    if (why == NULL)
        status("reloaded %u", n->seq);
    else
        status("refused %u %s", n->seq, why);
    pthread_mutex_unlock(&cfg_lock);
}

/* ------------------------------------------------------------------ introspection */

static long futex(uint32_t *word, int op, uint32_t val)
{
    return syscall(SYS_futex, word, op, val, NULL, NULL, 0);
}

static void kvmi_set(struct shim_kvmi_vcpu *k, uint32_t state)
{
    __atomic_store_n(&k->state, state, __ATOMIC_RELEASE);
    futex(&k->state, FUTEX_WAKE, INT32_MAX);
}

/* 'K': the tool's controlled MSRs changed: one "deny writes" range per MSR merged into the
 * filter (Machine.intercept_msr_writes does the same).  Status "kvmi-filter SEQ ERRNO". */
static void kvmi_filter(void)
{
    pthread_mutex_lock(&cfg_lock);
    uint32_t seq = __atomic_load_n(&kvmi->seq, __ATOMIC_ACQUIRE);
    uint32_t nm = kvmi->nmsrs;
    int err = 0;
    if (vm_closed || cur == NULL) {
        err = ENODEV;
    } else if (nm > SHIM_KVMI_MAX_MSRS || nm > SHIM_MAX_RANGES) {
        err = ENOSPC;
    } else {
        struct config *n = spare(), *c = cur;
        memcpy(n, c, offsetof(struct config, tablebuf));
        memcpy(n->tablebuf, c->tablebuf, c->table->size);
        n->table = (const struct kg_table_header *)n->tablebuf;
        memset(&n->tool, 0, sizeof n->tool);
        for (uint32_t i = 0; i < nm; i++) {
            struct shim_range *r = &n->tool.ranges[n->tool.nranges++];
            r->flags = KVM_MSR_FILTER_WRITE;
            r->base = kvmi->msrs[i];
            r->nmsrs = 1;                /* bitmap 0: denied, so it exits to us */
        }
        if (merge_all(n) < 0)
            err = ENOSPC;
        else if (publish(n) < 0)
            err = EINVAL;
    }
    status("kvmi-filter %u %d", seq, err);
    pthread_mutex_unlock(&cfg_lock);
}

/* 'P': kick every vCPU the parent wants paused out of KVM_RUN: immediate_exit (taken at the
 * next entry) and SIGUSR1, the signal QEMU itself kicks vCPUs with (its handler sets
 * immediate_exit too).  The vCPU parks in run_vcpu before entering again. */
static void kvmi_kick(void)
{
    uint32_t n = __atomic_load_n(&nvcpus, __ATOMIC_ACQUIRE);
    for (uint32_t i = 0; i < n; i++) {
        struct vcpu *v = &vcpus[i];
        if (v->kvmi == NULL || !__atomic_load_n(&v->kvmi->pause_req, __ATOMIC_ACQUIRE))
            continue;
        if (v->run != NULL)
            __atomic_store_n(&v->run->immediate_exit, 1, __ATOMIC_RELEASE);
        uint32_t tid = __atomic_load_n(&v->kvmi->tid, __ATOMIC_ACQUIRE);
        if (tid != 0)
            syscall(SYS_tgkill, getpid(), tid, SIGUSR1);
    }
}

/* The parent is gone: nobody will answer; every parked vCPU goes on with the guest's value. */
static void kvmi_release_all(void)
{
    uint32_t n = __atomic_load_n(&nvcpus, __ATOMIC_ACQUIRE);
    for (uint32_t i = 0; i < n; i++) {
        struct shim_kvmi_vcpu *k = vcpus[i].kvmi;
        if (k == NULL)
            continue;
        k->action = SHIM_KVMI_CONTINUE;
        k->value = k->new_value;
        k->set_regs = 0;
        __atomic_store_n(&k->pause_req, 0, __ATOMIC_RELEASE);
        kvmi_set(k, SHIM_KVMI_REPLY);
    }
    kvmi_on = 0;
}

static void *control_thread(void *arg)
{
    (void)arg;
    for (;;) {
        char c;
        ssize_t n = read(ctl_fd, &c, 1);
        if (n == 0) {
            if (kvmi_on)
                kvmi_release_all();
            return NULL;                 /* the parent is gone: keep the policy as it is */
        }
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return NULL;
        }
        if (c == 'R')
            reload();
        else if (c == 'K' && kvmi_on)
            kvmi_filter();
        else if (c == 'P' && kvmi_on)
            kvmi_kick();
    }
}

/* ------------------------------------------------------------------ vCPUs */

static void adopt_vcpu(int fd)
{
    uint32_t i = __atomic_load_n(&nvcpus, __ATOMIC_RELAXED);
    if (i >= MAX_VCPUS || fd >= MAX_FDS)
        return;                          /* refused in ioctl() before KVM_CREATE_VCPU */
    struct vcpu *v = &vcpus[i];
    v->fd = fd;
    v->index = i;
    long page = sysconf(_SC_PAGESIZE);
    void *run = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    v->run = run == MAP_FAILED ? NULL : run;
    v->ring = NULL;
    v->counts = NULL;
    v->stats = &spare_stats[i];
    if (i < shm->max_vcpus) {
        void *ring = (char *)shm + shm->rings_off + (uint64_t)i * shm->ring_stride;
        if (kg_ring_init(ring, shm->ring_stride, shm->ring_capacity) == 0)
            v->ring = ring;
        v->stats = (struct shim_stats *)((char *)shm + shm->stats_off) + i;
        v->counts = (struct shim_count *)((char *)shm + shm->counts_off) +
                    (uint64_t)i * shm->counts_slots;
    }
    v->kvmi = NULL;
    if (kvmi_on && i < shm->max_vcpus)
        v->kvmi = (struct shim_kvmi_vcpu *)((char *)kvmi + SHIM_KVMI_STRIDE * (1 + (uint64_t)i));
    __atomic_store_n(&vcpu_of_fd[fd], v, __ATOMIC_RELEASE);
    __atomic_store_n(&fdkind[fd], FD_VCPU, __ATOMIC_RELEASE);
    __atomic_store_n(&nvcpus, i + 1, __ATOMIC_RELEASE);
    shm->vcpus = i + 1;
    status("vcpu %u", i);
}

/* Is (index, direction) named by a rule of the policy (a span of the engine table)? */
static int policy_names(const struct kg_table_header *t, uint32_t index, int is_write)
{
    const struct kg_span *s = (const struct kg_span *)
        ((const char *)t + t->header_size + (size_t)t->nactions * sizeof(struct kg_action));
    uint32_t n = t->nspans_read;
    if (is_write) {
        s += t->nspans_read;
        n = t->nspans_write;
    }
    uint32_t lo = 0, hi = n;
    while (lo < hi) {
        uint32_t mid = (lo + hi) / 2;
        if (index < s[mid].lo)
            hi = mid;
        else if (index > s[mid].hi)
            lo = mid + 1;
        else
            return 1;
    }
    return 0;
}

/* Count a decision that is not logged in the vCPU's table: 1 counted, 0 full (use the ring).
 * Single writer (this vCPU's thread); the parent reads the table after the VMM is gone. */
static int count_decision(struct vcpu *v, uint32_t index, int wr, const struct kg_decision *d)
{
    if (v->counts == NULL)
        return 0;
    uint64_t key = (uint64_t)index << 32 | (uint64_t)!!(d->flags & KG_DF_WOULD_DENY) << 25 |
                   (uint64_t)!!wr << 24 | (uint64_t)d->action << 16 | (uint64_t)d->result << 8 | 1;
    uint64_t value = d->result == KG_RES_VALUE ? d->value : 0;
    uint32_t mask = shm->counts_slots - 1;
    uint32_t h = (uint32_t)((key ^ value ^ (value >> 29)) * 0x9E3779B97F4A7C15ull >> 40) & mask;
    for (uint32_t probe = 0; probe < 16; probe++) {
        struct shim_count *c = &v->counts[(h + probe) & mask];
        uint64_t k = c->key;
        if (k == 0) {
            c->value = value;
            c->count = 1;
            __atomic_store_n(&c->key, key, __ATOMIC_RELEASE);
            return 1;
        }
        if (k == key && c->value == value) {
            __atomic_store_n(&c->count, c->count + 1, __ATOMIC_RELAXED);
            return 1;
        }
    }
    return 0;
}

/* A host-initiated access of the vCPU's MSR (KVM_GET_MSRS / KVM_SET_MSRS): 1 done, 0 not. */
static int host_access(int fd, uint32_t index, int is_write, uint64_t *value)
{
    struct {
        struct kvm_msrs hdr;
        struct kvm_msr_entry e;
    } b;
    memset(&b, 0, sizeof b);
    b.hdr.nmsrs = 1;
    b.e.index = index;
    b.e.data = *value;
    int r = real_ioctl(fd, is_write ? KVM_SET_MSRS : KVM_GET_MSRS, &b);
    if (r != 1)
        return 0;
    *value = b.e.data;
    return 1;
}

static uint64_t guest_rip(int fd)
{
    struct kvm_regs r;
    if (real_ioctl(fd, KVM_GET_REGS, &r) < 0)
        return 0;
    return r.rip;
}

/* ------------------------------------------------------------------ introspection: vCPU side */

_Static_assert(sizeof(struct kvm_regs) == 144, "struct kvm_regs as in shim_kvmi_vcpu.regs");
_Static_assert(sizeof(struct kvm_sregs) == 312, "struct kvm_sregs as in shim_kvmi_vcpu.sregs");
_Static_assert(sizeof(struct shim_kvmi_vcpu) <= SHIM_KVMI_STRIDE, "kvmi slot stride");
_Static_assert(sizeof(struct shim_kvmi) <= SHIM_KVMI_STRIDE, "kvmi area");

static const uint32_t state_msr_index[SHIM_KVMI_STATE_MSRS] = {
    0x174, 0x175, 0x176, 0xc0000080, 0xc0000081, 0xc0000082, 0xc0000083, 0x277, 0xc0000102};

/* KVM_GET_MSRS of up to SHIM_KVMI_REQ_MSRS MSRs: entries read (they come in order), or -errno. */
static int get_msrs(int fd, const uint32_t *index, uint64_t *out, uint32_t n)
{
    struct {
        struct kvm_msrs hdr;
        struct kvm_msr_entry e[SHIM_KVMI_REQ_MSRS];
    } b;
    if (n > SHIM_KVMI_REQ_MSRS)
        return -EINVAL;
    memset(&b, 0, sizeof b);
    b.hdr.nmsrs = n;
    for (uint32_t i = 0; i < n; i++)
        b.e[i].index = index[i];
    int r = real_ioctl(fd, KVM_GET_MSRS, &b);
    if (r < 0)
        return -errno;
    for (uint32_t i = 0; i < n; i++)
        out[i] = i < (uint32_t)r ? b.e[i].data : 0;
    return r;
}

/* What the event's state block needs (kvm_regs, kvm_sregs, 9 MSRs), read on the vCPU. */
static void kvmi_snapshot(struct vcpu *v, struct shim_kvmi_vcpu *k)
{
    struct kvm_regs r;
    struct kvm_sregs sr;
    if (real_ioctl(v->fd, KVM_GET_REGS, &r) < 0)
        memset(&r, 0, sizeof r);
    if (real_ioctl(v->fd, KVM_GET_SREGS, &sr) < 0)
        memset(&sr, 0, sizeof sr);
    memcpy(k->regs, &r, sizeof r);
    memcpy(k->sregs, &sr, sizeof sr);
    if (get_msrs(v->fd, state_msr_index, k->state_msrs, SHIM_KVMI_STATE_MSRS) < 0)
        memset(k->state_msrs, 0, sizeof k->state_msrs);
}

static void kvmi_request(struct vcpu *v, struct shim_kvmi_vcpu *k)
{
    if (k->req == SHIM_KVMI_REQ_GET_MSRS)
        k->req_result = get_msrs(v->fd, k->req_msrs, k->req_values, k->req_nmsrs);
    else
        k->req_result = -EINVAL;
}

/* Wait in the VMM for the parent (and through it the tool): requests are carried out here,
 * on the vCPU's thread, until the reply.  The action (SHIM_KVMI_*). */
static uint32_t kvmi_park(struct vcpu *v, uint32_t kind)
{
    struct shim_kvmi_vcpu *k = v->kvmi;
    if (!__atomic_load_n(&kvmi_on, __ATOMIC_ACQUIRE))
        return SHIM_KVMI_CONTINUE;
    k->kind = kind;
    k->set_regs = 0;
    k->action = SHIM_KVMI_CONTINUE;
    kvmi_snapshot(v, k);
    kvmi_set(k, SHIM_KVMI_PARKED);      /* wakes the parent's worker of this vCPU */
    for (;;) {
        uint32_t st = __atomic_load_n(&k->state, __ATOMIC_ACQUIRE);
        if (st == SHIM_KVMI_REPLY)
            break;
        if (st == SHIM_KVMI_REQ) {
            kvmi_request(v, k);
            kvmi_set(k, SHIM_KVMI_REQ_DONE);
            continue;
        }
        futex(&k->state, FUTEX_WAIT, st);
    }
    if (k->set_regs) {
        struct kvm_regs r;
        memcpy(&r, k->regs, sizeof r);
        real_ioctl(v->fd, KVM_SET_REGS, &r);
        k->set_regs = 0;
    }
    uint32_t action = k->action;
    __atomic_store_n(&k->state, SHIM_KVMI_IDLE, __ATOMIC_RELEASE);
    return action;
}

static void kvmi_crash(struct vcpu *v, const char *what)
{
    complain("vCPU %u: the introspection tool answered %s with CRASH: the VM is stopped",
             v->index, what);
    _exit(1);
}

/* A pause the parent asked for (pause_req): park with KIND_PAUSE. */
static void kvmi_pause(struct vcpu *v)
{
    if (!__atomic_exchange_n(&v->kvmi->pause_req, 0, __ATOMIC_ACQ_REL))
        return;
    if (kvmi_park(v, SHIM_KVMI_KIND_PAUSE) == SHIM_KVMI_CRASH)
        kvmi_crash(v, "PAUSE_VCPU");
}

/* A guest write to an MSR the tool controls: the MSR event if the value changes; the value
 * stored (host-initiated KVM_SET_MSRS) is the tool's (CONTINUE), none (RETRY: the old one
 * stays), or the VM stops (CRASH).  1 done, 0 the write failed (#GP). */
static int kvmi_write(struct vcpu *v, uint32_t index, uint64_t data)
{
    uint64_t old = 0, val = data;
    if (get_msrs(v->fd, &index, &old, 1) == 1 && old != data && v->kvmi != NULL) {
        struct shim_kvmi_vcpu *k = v->kvmi;
        k->msr = index;
        k->old_value = old;
        k->new_value = data;
        k->value = data;
        uint32_t act = kvmi_park(v, SHIM_KVMI_KIND_MSR);
        if (act == SHIM_KVMI_CRASH)
            kvmi_crash(v, "an MSR event");
        if (act == SHIM_KVMI_RETRY)
            return 1;
        val = k->value;
    }
    return host_access(v->fd, index, 1, &val);
}

enum owner { TO_VMM, TO_POLICY, TO_GP, TO_HOST, TO_TOOL };

static enum owner who_answers(const struct config *c, uint32_t reason, uint32_t index, int wr)
{
    uint32_t dir = wr ? KVM_MSR_FILTER_WRITE : KVM_MSR_FILTER_READ;
    int is_filter = reason == KVM_MSR_EXIT_REASON_FILTER;
    if ((c->policy_mask & reason) && is_filter && policy_names(c->table, index, wr))
        return TO_POLICY;
    if ((c->vmm_mask & reason) && (!is_filter || !filter_allows(&c->vmm, index, dir)))
        return TO_VMM;
    if ((c->policy_mask & reason) && (!is_filter || !filter_allows(&c->policy, index, dir)))
        return TO_POLICY;
    if (wr && is_filter && c->tool.nranges && !filter_allows(&c->tool, index, dir))
        return TO_TOOL;
    if (!is_filter || !filter_allows(&c->merged, index, dir))
        return TO_GP;
    return TO_HOST;
}

/* One MSR exit: 1 answered here (re-enter KVM_RUN), 0 for the VMM. */
static int answer(struct vcpu *v, struct kvm_run *run, int wr)
{
    struct config *c = __atomic_load_n(&cur, __ATOMIC_ACQUIRE);
    __atomic_store_n(&v->using, c, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&cur, __ATOMIC_SEQ_CST) != c) {   /* replaced meanwhile: take the new */
        c = __atomic_load_n(&cur, __ATOMIC_ACQUIRE);
        __atomic_store_n(&v->using, c, __ATOMIC_SEQ_CST);
    }
    uint32_t reason = run->msr.reason, index = run->msr.index;
    uint64_t data = wr ? run->msr.data : 0;
    int handled = 1;
    switch (who_answers(c, reason, index, wr)) {
    case TO_VMM:
        v->stats->vmm++;
        handled = 0;
        if (shm->options & SHIM_OPT_LEARN) {
            v->pending_index = index;
            v->pending_reason = reason;
            v->pending_write = wr;
            v->pending_data = data;
            v->vmm_pending = 1;
        }
        break;
    case TO_TOOL:
        /* not reading `c` any more: a filter swap while we wait must not wait for us */
        __atomic_store_n(&v->using, NULL, __ATOMIC_RELEASE);
        v->stats->tool++;
        run->msr.error = !kvmi_write(v, index, data);
        break;
    case TO_GP:
        v->stats->gp++;
        run->msr.error = 1;
        break;
    case TO_HOST: {
        uint64_t val = data;
        int ok = host_access(v->fd, index, wr, &val);
        v->stats->host++;
        run->msr.error = !ok;
        if (ok && !wr)
            run->msr.data = val;
        break;
    }
    case TO_POLICY: {
        struct kg_decision d;
        v->stats->policy++;
        kg_decide(c->table, regs, index, wr, reason, data, &d);
        if (d.result == KG_RES_HOST) {
            uint64_t val = data;
            int ok = host_access(v->fd, index, wr, &val);
            kg_host_done(&d, wr, ok, val);
        }
        if (d.result == KG_RES_GP) {
            run->msr.error = 1;
        } else {
            run->msr.error = 0;
            if (!wr)
                run->msr.data = d.result == KG_RES_VALUE ? d.value : 0;
        }
        int log = d.flags & KG_DF_LOG;
        if (!log && (d.flags & KG_DF_COUNT) && count_decision(v, index, wr, &d))
            break;
        if ((d.flags & (KG_DF_LOG | KG_DF_COUNT)) && v->ring != NULL) {
            struct kg_record rec;
            uint64_t rip = log ? guest_rip(v->fd) : 0;
            kg_record_fill(&rec, &d, v->index, rip, log, index, wr, reason, data);
            kg_ring_push(v->ring, &rec);
        }
        break;
    }
    }
    __atomic_store_n(&v->using, NULL, __ATOMIC_RELEASE);
    return handled;
}

/* learn: the VMM has answered the MSR exit it was handed (kvm_run.msr.error/data, read at its
 * next KVM_RUN): one record with action KG_ACT_NONE for the parent's learned policy. */
static void record_vmm_answer(struct vcpu *v)
{
    struct kvm_run *run = v->run;
    struct kg_decision d;
    struct kg_record rec;
    v->vmm_pending = 0;
    if (v->ring == NULL)
        return;
    memset(&d, 0, sizeof d);
    d.action = KG_ACT_NONE;
    d.rule = KG_NONE;
    d.result = run->msr.error ? KG_RES_GP : v->pending_write ? KG_RES_WRITTEN : KG_RES_VALUE;
    d.value = v->pending_write ? 0 : run->msr.data;
    kg_record_fill(&rec, &d, v->index, 0, 0, v->pending_index, v->pending_write,
                   v->pending_reason, v->pending_data);
    kg_ring_push(v->ring, &rec);
}

static int run_vcpu(struct vcpu *v, unsigned long req, void *arg)
{
    if (v->vmm_pending && v->run != NULL)
        record_vmm_answer(v);
    struct shim_kvmi_vcpu *k = v->kvmi;
    if (k != NULL && __builtin_expect(k->tid == 0, 0)) {
        int khz = real_ioctl(v->fd, KVM_GET_TSC_KHZ, 0);
        k->tsc_khz = khz > 0 ? (uint64_t)khz : 0;
        __atomic_store_n(&k->tid, (uint32_t)syscall(SYS_gettid), __ATOMIC_RELEASE);
        status("kvmi-run %u", v->index);
    }
    for (;;) {
        if (k != NULL && __atomic_load_n(&k->pause_req, __ATOMIC_ACQUIRE))
            kvmi_pause(v);
        int r = real_ioctl(v->fd, req, arg);
        struct kvm_run *run = v->run;
        if (r < 0 && k != NULL && __atomic_load_n(&k->pause_req, __ATOMIC_ACQUIRE))
            kvmi_pause(v);               /* kicked out (EINTR): park before QEMU sees it */
        if (r < 0 || run == NULL)
            return r;
        int wr = run->exit_reason == KVM_EXIT_X86_WRMSR;
        if (!wr && run->exit_reason != KVM_EXIT_X86_RDMSR)
            return r;
        if (!answer(v, run, wr))
            return r;
        /* answered: KVM completes the access on the next KVM_RUN; a kick meanwhile
         * (immediate_exit, a signal) makes it return EINTR to the VMM, which runs it again */
    }
}

/* ------------------------------------------------------------------ interposed calls */

static int is_dev_kvm(int fd)
{
    struct stat st;
    return fstat(fd, &st) == 0 && S_ISCHR(st.st_mode) && major(st.st_rdev) == 10 &&
           minor(st.st_rdev) == 232;
}

static int fail(int e)
{
    errno = e;
    return -1;
}

int ioctl(int fd, unsigned long req, ...)
{
    va_list ap;
    va_start(ap, req);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    if (__builtin_expect(real_ioctl == NULL, 0))
        real_ioctl = (ioctl_fn)dlsym(RTLD_NEXT, "ioctl");
    unsigned kind = fd >= 0 && fd < MAX_FDS ? __atomic_load_n(&fdkind[fd], __ATOMIC_ACQUIRE) : 0;
    if (__builtin_expect(kind == FD_VCPU, 1) && req == KVM_RUN)
        return run_vcpu(__atomic_load_n(&vcpu_of_fd[fd], __ATOMIC_ACQUIRE), req, arg);
    if (kind == FD_NONE) {
        if (req != KVM_CREATE_VM || !is_dev_kvm(fd))
            return real_ioctl(fd, req, arg);
        int r = real_ioctl(fd, req, arg);
        if (r < 0)
            return r;
        if (r >= MAX_FDS) {
            real_close(r);
            complain("VM fd %d beyond the shim's table; the VM is not created", r);
            return fail(EMFILE);
        }
        pthread_mutex_lock(&cfg_lock);
        int e = adopt_vm(r);
        pthread_mutex_unlock(&cfg_lock);
        if (e < 0) {
            real_close(r);
            return fail(-e);
        }
        __atomic_store_n(&fdkind[r], FD_VM, __ATOMIC_RELEASE);
        return r;
    }
    if (kind == FD_VM) {
        if ((req == KVM_ENABLE_CAP || req == KVM_X86_SET_MSR_FILTER) && arg == NULL)
            return fail(EFAULT);
        if (req == KVM_ENABLE_CAP && ((struct kvm_enable_cap *)arg)->cap == KVM_CAP_X86_USER_SPACE_MSR) {
            const struct kvm_enable_cap *cap = arg;
            if (cap->flags || cap->args[0] > 0xffffffffu ||
                (cap->args[0] & ~(uint64_t)(KG_REASON_INVAL | KG_REASON_UNKNOWN | KG_REASON_FILTER)))
                return fail(EINVAL);
            uint32_t mask = (uint32_t)cap->args[0];
            int r = vmm_changed(&mask, NULL);
            return r < 0 ? fail(-r) : 0;
        }
        if (req == KVM_X86_SET_MSR_FILTER) {
            struct shim_filter *f = mmap(NULL, sizeof *f, PROT_READ | PROT_WRITE,
                                         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (f == MAP_FAILED)
                return fail(ENOMEM);
            int r = copy_filter(f, arg);
            if (r == 0)
                r = vmm_changed(NULL, f);
            munmap(f, sizeof *f);
            return r < 0 ? fail(-r) : 0;
        }
        if (req == KVM_CREATE_VCPU) {
            if (__atomic_load_n(&nvcpus, __ATOMIC_RELAXED) >= MAX_VCPUS)
                return fail(ENOSPC);
            int r = real_ioctl(fd, req, arg);
            if (r < 0)
                return r;
            if (r >= MAX_FDS) {
                real_close(r);
                return fail(EMFILE);
            }
            pthread_mutex_lock(&cfg_lock);
            adopt_vcpu(r);
            pthread_mutex_unlock(&cfg_lock);
            return r;
        }
    }
    return real_ioctl(fd, req, arg);
}

int close(int fd)
{
    if (__builtin_expect(real_close == NULL, 0))
        real_close = (close_fn)dlsym(RTLD_NEXT, "close");
    if (fd >= 0 && fd < MAX_FDS && __atomic_load_n(&fdkind[fd], __ATOMIC_RELAXED) != FD_NONE) {
        if (fdkind[fd] == FD_VM && fd == vm_fd) {
            pthread_mutex_lock(&cfg_lock);          /* no reload may use the fd number now */
            vm_closed = 1;
            __atomic_store_n(&fdkind[fd], FD_NONE, __ATOMIC_RELEASE);
            int r = real_close(fd);
            pthread_mutex_unlock(&cfg_lock);
            return r;
        }
        __atomic_store_n(&fdkind[fd], FD_NONE, __ATOMIC_RELEASE);
    }
    return real_close(fd);
}

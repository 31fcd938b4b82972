/* Bare C KVM_RUN loop: the baseline for `kvmgate bench exits`.
 * Runs an already set-up vCPU, answering every MSR exit (reads with 0, writes completed),
 * until KVM_EXIT_HLT.  Returns the number of MSR exits, or -errno / -1000-exit_reason. */
#include <errno.h>
#include <linux/kvm.h>
#include <sched.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>

long kvmgate_bench_loop(int vcpu_fd, struct kvm_run *run)
{
	long exits = 0;

	for (;;) {
		if (ioctl(vcpu_fd, KVM_RUN, 0) < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		switch (run->exit_reason) {
		case KVM_EXIT_X86_RDMSR:
			run->msr.data = 0;
			run->msr.error = 0;
			exits++;
			break;
		case KVM_EXIT_X86_WRMSR:
			run->msr.error = 0;
			exits++;
			break;
		case KVM_EXIT_HLT:
			return exits;
		default:
			return -1000 - (long)run->exit_reason;
		}
	}
}

/* The C floor of an introspection MSR event (`kvmgate bench introspect`): the same kernel and
 * socket work as kvmgate's event path with no Python on either side.  On every WRMSR exit:
 * KVM_GET_MSRS of the written MSR (the event's old value), `event_size` bytes to `sock`, a
 * `reply_size`-byte reply read back (after polling up to `poll_ns` with sched_yield when it is
 * not 0, as kvmgate.introspection.inbox does), then the host-initiated KVM_SET_MSRS that stores
 * the value; `sock` < 0: the store only (the plain exit that stores the value).  Reads are
 * answered 0.  Returns the number of WRMSR exits, or -errno / -1000-exit_reason. */
static long now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static int recv_all(int sock, char *buf, size_t size, long poll_ns)
{
	size_t got = 0;
	long end = poll_ns ? now_ns() + poll_ns : 0;

	while (got < size) {
		ssize_t n = recv(sock, buf + got, size - got, end ? MSG_DONTWAIT : 0);
		if (n > 0) {
			got += (size_t)n;
			continue;
		}
		if (n == 0)
			return -EPIPE;
		if (errno == EAGAIN && end) {
			if (now_ns() >= end)
				end = 0;
			else
				sched_yield();
			continue;
		}
		if (errno != EINTR)
			return -errno;
	}
	return 0;
}

long kvmgate_bench_event_loop(int vcpu_fd, struct kvm_run *run, int sock, int event_size,
			      int reply_size, long poll_ns)
{
	struct {
		struct kvm_msrs hdr;
		struct kvm_msr_entry entry;
	} msrs;
	char msg[1024], reply[256];
	long exits = 0;

	if (event_size < 0 || event_size > (int)sizeof(msg) || reply_size < 0 ||
	    reply_size > (int)sizeof(reply))
		return -EINVAL;
	memset(msg, 0, sizeof(msg));
	for (;;) {
		if (ioctl(vcpu_fd, KVM_RUN, 0) < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		switch (run->exit_reason) {
		case KVM_EXIT_X86_RDMSR:
			run->msr.data = 0;
			run->msr.error = 0;
			break;
		case KVM_EXIT_X86_WRMSR:
			memset(&msrs, 0, sizeof(msrs));
			msrs.hdr.nmsrs = 1;
			msrs.entry.index = run->msr.index;
			if (sock >= 0) {
				if (ioctl(vcpu_fd, KVM_GET_MSRS, &msrs) != 1)
					return -EIO;
				memcpy(msg, &run->msr.data, sizeof(run->msr.data));
				if (send(sock, msg, (size_t)event_size, 0) != event_size)
					return -EIO;
				int rc = recv_all(sock, reply, (size_t)reply_size, poll_ns);
				if (rc < 0)
					return rc;
			}
			msrs.entry.data = run->msr.data;
			if (ioctl(vcpu_fd, KVM_SET_MSRS, &msrs) != 1)
				return -EIO;
			run->msr.error = 0;
			exits++;
			break;
		case KVM_EXIT_HLT:
			return exits;
		default:
			return -1000 - (long)run->exit_reason;
		}
	}
}

/* The tool's side of that floor, for a child process: answer every `event_size`-byte message
 * on `sock` with `reply_size` bytes until EOF.  Returns the number of messages answered. */
long kvmgate_bench_echo(int sock, int event_size, int reply_size)
{
	char msg[1024], reply[256];
	long n = 0;

	if (event_size < 0 || event_size > (int)sizeof(msg) || reply_size < 0 ||
	    reply_size > (int)sizeof(reply))
		return -EINVAL;
	memset(reply, 0, sizeof(reply));
	for (;;) {
		if (recv_all(sock, msg, (size_t)event_size, 0) < 0)
			return n;
		if (send(sock, reply, (size_t)reply_size, 0) != reply_size)
			return n;
		n++;
	}
}

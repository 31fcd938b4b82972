/* Bare C KVM_RUN loop: the baseline for `kvmgate bench exits`.
 * Runs an already set-up vCPU, answering every MSR exit (reads with 0, writes completed),
 * until KVM_EXIT_HLT.  Returns the number of MSR exits, or -errno / -1000-exit_reason. */
#include <errno.h>
#include <linux/kvm.h>
#include <sys/ioctl.h>

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

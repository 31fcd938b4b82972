"""CPUID and exception injection of MachineBackend (docs/introspection.md §2): VCPU_GET_CPUID
from KVM_GET_SUPPORTED_CPUID, VCPU_INJECT_EXCEPTION through KVM_SET_VCPU_EVENTS, kept pending
for a vCPU that does not run yet.

A part of MachineBackend (kvmgate.introspection.machine_backend), split out by concern: it uses
the backend's machine, _vcpus, _lock, _cpuid, _injections, _injected, intro and _vcpu_call."""
from __future__ import annotations

import ctypes as C
import logging
import threading

from .. import uapi as u
from . import ids

log = logging.getLogger("kvmgate.introspection")

INJECT_POLL = 0.05         # a pending INJECT_EXCEPTION: kick again / look for a run this often
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1
PF_VECTOR = 14
ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})   # x86 SDM vol. 3 6.13


class CpuidAndExceptions:
    # --- Backend: CPUID, exceptions ---------------------------------------------------------

    def get_cpuid(self, vcpu: int, function: int, index: int):
        """From KVM_GET_SUPPORTED_CPUID, which Machine gives every vCPU (KVM_SET_CPUID2)."""
        if self._cpuid is None:
            blob = self.machine.kvm.supported_cpuid()
            n = u.kvm_cpuid2.from_buffer_copy(blob).nent
            size, head = C.sizeof(u.kvm_cpuid_entry2), C.sizeof(u.kvm_cpuid2)
            self._cpuid = [u.kvm_cpuid_entry2.from_buffer_copy(blob, head + i * size)
                           for i in range(n)]
        for e in self._cpuid:
            if e.function == function and (e.index == index
                                           or not e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX):
                return e.eax, e.ebx, e.ecx, e.edx
        return None

    def inject_exception(self, vcpu: int, vector: int, error_code: int, address: int) -> int:
        """KVM_SET_VCPU_EVENTS with the exception injected (CR2 = `address` for #PF, through
        KVM_SET_SREGS); delivered at the vCPU's next entry.  -KVM_EBUSY if one is pending.

        A vCPU whose thread does not run yet keeps it pending here: run() resets every vCPU
        (KVM_SET_REGS drops an injected exception), so it is set by the vCPU's own thread once
        it runs (a kick, then its kick hook)."""
        with self._lock:
            if vcpu in self._injections:
                return -ids.KVM_EBUSY
            if self.machine.vcpu_thread(vcpu) is None:
                self._injections[vcpu] = (vector, error_code, address)
                threading.Thread(target=self._inject_when_running, args=(vcpu,),
                                 name=f"kvmi-inject{vcpu}", daemon=True).start()
                return 0
        return self._vcpu_call(vcpu, self._inject_now, vcpu, vector, error_code, address)

    def _inject_now(self, vcpu: int, vector: int, error_code: int, address: int) -> int:
        v = self._vcpus[vcpu]
        ev = v.get_vcpu_events()
        if ev.exception_injected or ev.exception_pending:
            return -ids.KVM_EBUSY
        if vector == PF_VECTOR:
            sregs = v.get_sregs()
            sregs.cr2 = address
            v.set_sregs(sregs)
        ev.exception_injected, ev.exception_nr = 1, vector
        ev.exception_has_error_code = int(vector in ERROR_CODE_VECTORS)
        ev.exception_error_code = error_code & 0xFFFFFFFF
        ev.flags = 0
        v.set_vcpu_events(ev)
        return 0

    def _take_injection(self, vid: int) -> None:
        """On vCPU `vid`'s thread while it runs: set the exception kept pending, if any."""
        with self._lock:
            args = self._injections.pop(vid, None)
        if args is not None:
            if self._inject_now(vid, *args):
                log.warning("vCPU %d: an exception is already pending; INJECT_EXCEPTION of "
                            "vector %d dropped", vid, args[0])
            self._injected[vid].set()

    def _inject_when_running(self, vid: int) -> None:
        """Until the pending exception of `vid` is set: wait for a run (wait_running), then kick
        the vCPU so that its kick hook sets it; between runs, look again every INJECT_POLL."""
        done = self._injected[vid]
        while vid in self._injections:
            intro = self.intro
            if intro is None or not intro.connected:     # the session ended: dropped
                with self._lock:
                    self._injections.pop(vid, None)
                return
            done.clear()
            if self.machine.wait_running(INJECT_POLL) and self.machine.kick(vid):
                done.wait(INJECT_POLL)        # set by the hook; else kick again
            elif not self.machine.wait_running(0):
                done.wait(INJECT_POLL)        # between runs: look for the next one

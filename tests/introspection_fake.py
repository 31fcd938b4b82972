"""An in-memory introspection `Backend` (no /dev/kvm): the test double of the server tests."""
from __future__ import annotations

import threading
from typing import Sequence

from kvmgate.introspection import ids
from kvmgate.introspection.backend import Backend
from kvmgate.introspection.protocol import REGS_SIZE, SREGS_SIZE


class FakeBackend(Backend):
    """Guest RAM is a bytearray at GPA 0; registers and MSRs are dicts; calls are recorded."""

    def __init__(self, vcpus: int = 2, mem_size: int = 0x10000, tsc_khz: int = 2_500_000,
                 denied_msrs: Sequence[int] = (), mode: int = 8):
        self.vcpus = vcpus
        self.mem = bytearray(mem_size)
        self.khz = tsc_khz
        self.mode = mode
        self.denied_msrs = set(denied_msrs)
        self.regs = {v: bytes(REGS_SIZE) for v in range(vcpus)}
        self.sregs = {v: bytes(SREGS_SIZE) for v in range(vcpus)}
        self.msrs: dict[int, dict[int, int]] = {v: {} for v in range(vcpus)}
        self.controlled: set[tuple[int, int]] = set()
        self.pause_calls: list[tuple[int, bool]] = []
        self.set_regs_calls: list[tuple[int, bytes, str]] = []   # (vcpu, regs, thread name)
        self.lock = threading.Lock()
        self.cpuid = {(0, 0): (0xD, 0x756E6547, 0x6C65746E, 0x49656E69)}
        self.injected: list[tuple[int, int, int, int]] = []

    def vcpu_count(self) -> int:
        return self.vcpus

    def read_physical(self, gpa: int, size: int) -> bytes | None:
        if gpa + size > len(self.mem):
            return None
        return bytes(self.mem[gpa:gpa + size])

    def write_physical(self, gpa: int, data: bytes) -> bool:
        if gpa + len(data) > len(self.mem):
            return False
        self.mem[gpa:gpa + len(data)] = data
        return True

    def get_registers(self, vcpu: int, msrs: Sequence[int]):
        values = [(m, self.msrs[vcpu].get(m, 0)) for m in msrs]
        return self.mode, self.regs[vcpu], self.sregs[vcpu], values

    def set_registers(self, vcpu: int, regs: bytes) -> None:
        self.regs[vcpu] = bytes(regs)
        self.set_regs_calls.append((vcpu, bytes(regs), threading.current_thread().name))

    def tsc_khz(self) -> int | None:
        return self.khz

    def control_msr(self, vcpu: int, msr: int, enable: bool) -> int:
        if enable and msr in self.denied_msrs:
            return -ids.KVM_EPERM
        with self.lock:
            if enable:
                self.controlled.add((vcpu, msr))
            else:
                self.controlled.discard((vcpu, msr))
        return 0

    def pause_vcpu(self, vcpu: int, wait: bool) -> int | None:
        self.pause_calls.append((vcpu, wait))
        return 0

    # The optional operations, so the server's handlers for them can be tested without KVM.
    def get_cpuid(self, vcpu: int, function: int, index: int):
        return self.cpuid.get((function, index))

    def inject_exception(self, vcpu: int, vector: int, error_code: int, address: int) -> int:
        self.injected.append((vcpu, vector, error_code, address))
        return 0

    def max_gfn(self) -> int:
        return (len(self.mem) - 1) >> 12

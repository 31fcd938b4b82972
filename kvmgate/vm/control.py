"""What Machine offers beyond running a guest, as two small mixins: per-machine extensions
(the documented registration higher layers use instead of attributes set from outside), and
the vCPU thread controls (stop, kick, quiesce, ...), which delegate to vm.threads."""
from __future__ import annotations

from typing import Callable, ClassVar


class Extensions:
    """`Machine.register_extension(name, factory, close)`; `machine.extension(name)`."""
    _extension_types: ClassVar[dict[str, tuple[Callable, Callable | None]]] = {}
    _extensions: dict[str, object]

    @classmethod
    def register_extension(cls, name: str, factory: Callable, close: Callable | None = None) -> None:
        """Make `machine.extension(name)` available: factory(machine) builds it on first use,
        close(obj) runs in Machine.close()."""
        cls._extension_types[name] = (factory, close)

    def extension(self, name: str):
        """This machine's `name` extension (made on first use); LookupError if not registered."""
        ext = self._extensions.get(name)
        if ext is None:
            if name not in self._extension_types:
                raise LookupError(f"no Machine extension {name!r} is registered (import the "
                                  "package that provides it)")
            ext = self._extensions[name] = self._extension_types[name][0](self)
        return ext

    def has_extension(self, name: str) -> bool:
        return name in self._extensions

    @property
    def introspection(self):
        """The VM's introspection owner API (kvmgate.introspection.Introspection):
        hook(sock, uuid), allow_command(id, allow), allow_event(id, allow), unhook()."""
        return self.extension("introspection")

    def _close_extensions(self) -> None:
        for name, ext in list(getattr(self, "_extensions", {}).items()):
            closer = self._extension_types.get(name, (None, None))[1]
            if closer is not None:
                try:
                    closer(ext)
                except Exception:
                    pass


class VcpuControl:
    """Thread controls of a Machine (`self._threads`: a vm.threads.VcpuThreads)."""

    def add_kick_hook(self, fn: Callable[[int], None]) -> Callable[[int], None]:
        """fn(vcpu index), called on that vCPU's thread after each kick() and once before its
        first KVM_RUN of each run (work queued while it did not run is done before any guest
        instruction); several may be added."""
        return self._threads.add_kick_hook(fn)

    def remove_kick_hook(self, fn: Callable[[int], None]) -> None:
        self._threads.remove_kick_hook(fn)

    def wait_running(self, timeout: float | None = None) -> bool:
        """Block until every vCPU thread of a run has started (True), or no run is in progress
        any more or `timeout` passed (False).  For supervisors that must know the guest runs."""
        return self._threads.wait_running(timeout)

    def stop(self) -> None:
        """Ask every vCPU to stop (immediate_exit, then a signal to its thread); returns at once."""
        self._threads.stop()

    def quiesced(self, timeout: float = 10.0):
        """Context manager: every vCPU except the caller's held outside KVM_RUN in the block."""
        return self._threads.quiesced(timeout)

    def blocked(self, index: int):
        """Context manager around a handler's wait on another party, on vCPU `index`'s thread:
        quiesced() counts the vCPU as parked meanwhile."""
        return self._threads.blocked(self._threads.states[index])

    def vcpu_thread(self, index: int) -> int | None:
        """The ident of vCPU `index`'s thread while it runs, else None."""
        return self._threads.thread_of(index)

    def fail_run(self, index: int, exc: BaseException) -> bool:
        """Stop the run so that run() raises `exc` (for vCPU `index`); False if not running."""
        return self._threads.fail(index, exc)

    def kick(self, index: int) -> bool:
        """Make vCPU `index` leave KVM_RUN soon (immediate_exit, then a signal to its thread);
        its thread then calls the kick hooks.  False if that vCPU's thread is not running."""
        return self._threads.kick(self._threads.states[index])


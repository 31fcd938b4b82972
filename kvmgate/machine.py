"""Compatibility path: the machine now lives in the `kvmgate.vm` package."""
import threading  # noqa: F401  (tests patch machine.threading.current_thread)

from .vm import KICK_SIGNAL, Machine, PolicyBinding, install_kick_handler, marshal_filter

__all__ = ["Machine", "KICK_SIGNAL", "PolicyBinding", "install_kick_handler", "marshal_filter"]

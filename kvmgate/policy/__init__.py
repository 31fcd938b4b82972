"""MSR policies: a TOML file -> Policy -> CompiledPolicy (filter, exit mask, handler table)."""
from .model import ACTIONS, Policy, Rule
from .parse import load_policy, parse_policy
from .compile import CompiledPolicy, compile_policy

__all__ = ["ACTIONS", "Policy", "Rule", "load_policy", "parse_policy", "CompiledPolicy",
           "compile_policy"]

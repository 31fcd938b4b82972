"""MSR policies: a TOML file -> Policy -> CompiledPolicy (filter, exit mask, handler table).

Modules, lowest first: model (rules and actions as data), plan (interval arithmetic),
handlers (the exit handler), compile (Policy, CompiledPolicy, compile_policy), parse (TOML),
report (views for people and programs)."""
from .compile import CompiledPolicy, Policy, compile_policy
from .model import ACTIONS, ActionKind, Rule, RuleAction
from .parse import load_policy, parse_policy, parse_policy_bytes

__all__ = [
           "ACTIONS",
           "ActionKind",
           "CompiledPolicy",
           "Policy",
           "Rule",
           "RuleAction",
           "compile_policy",
           "load_policy",
           "parse_policy",
           "parse_policy_bytes",
]

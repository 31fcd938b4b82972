"""MSR policies: a TOML file -> Policy -> CompiledPolicy (filter, exit mask, handler table).

Modules, lowest first: model (rules and actions as data), plan (interval arithmetic),
handlers (the exit handler), compile (Policy, CompiledPolicy, compile_policy), parse (TOML),
report (views for people and programs)."""
from .model import ACTIONS, ActionKind, Rule, RuleAction
from .compile import CompiledPolicy, Policy, compile_policy
from .parse import load_policy, parse_policy, parse_policy_bytes

__all__ = ["ACTIONS", "ActionKind", "Policy", "Rule", "RuleAction", "load_policy", "parse_policy", "parse_policy_bytes",
           "CompiledPolicy", "compile_policy"]

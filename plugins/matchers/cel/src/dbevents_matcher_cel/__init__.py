"""dbevents matcher: row filters in the Common Expression Language."""

from dbevents_matcher_cel.plugin import CelCondition, CelOptions, compile_condition, variables

__all__ = ["CelCondition", "CelOptions", "compile_condition", "variables"]

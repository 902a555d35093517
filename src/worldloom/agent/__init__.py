"""ReAct agents: the loop and its parser (react.py), tools (tools.py), synthetic traces (traces.py)."""

from .react import Agent, Result, Step, agent_prompt, parse_turn
from .tools import Calculator, ToolError, calculate, make_tools

__all__ = ["Agent", "Calculator", "Result", "Step", "ToolError", "agent_prompt", "calculate", "make_tools", "parse_turn"]

"""Adapting and aligning a trained run (`worldloom tune sft|dpo|orpo|reward|prefs|ppo`).

``tasks`` generates synthetic instruction tasks with programmatic checkers (`worldloom data
instruct`); ``data`` reads and validates instruction and preference JSONL files.
"""

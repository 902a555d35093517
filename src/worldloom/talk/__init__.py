"""A world model that talks (issue 16, requirement 4; docs/talk.md).

Text about a BabyAI view is written by a program from the view's true cells (``text``), laid into
the world stream beside episodes (``stream``), continued or drawn by the model (``generate``) and
scored against the program's own truth (``evaluate``). The recipe is ``recipes/talk.py``.
"""

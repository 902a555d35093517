"""Exports of a trained run to other formats (``worldloom export FORMAT RUN OUT``)."""

from .hf import ExportError, export_hf

__all__ = ["ExportError", "export_hf"]

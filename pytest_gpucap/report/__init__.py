"""The capacity write-up (Markdown + self-contained HTML + SVG charts), rendered from results.jsonl only."""

from .render import ReportError, build_context, load_records, render_report, render_summary

__all__ = ["ReportError", "build_context", "load_records", "render_report", "render_summary"]

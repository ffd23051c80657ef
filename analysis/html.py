"""A Markdown report as one self-contained HTML file, for MLflow's artifact viewer: it renders HTML
artifacts (in a sandboxed frame) but shows a Markdown file's images as the literal ``![..](..)``. The
Markdown is rendered by markdown-it-py (CommonMark + tables, raw HTML off), its PNG images embedded as
``data:`` URIs, and the tables wrap at spaces only and scroll sideways rather than cut words."""
from __future__ import annotations

import base64
import html
import re
from pathlib import Path

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; font-size: 14px;
       line-height: 1.45; color: #1f2328; margin: 16px; max-width: 1400px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; } h3 { font-size: 15px; }
code { font-size: 12px; background: #f2f4f6; padding: 1px 4px; border-radius: 3px; }
table { border-collapse: collapse; font-size: 12px; margin: 8px 0 16px; display: block; max-width: 100%;
        overflow-x: auto; }
th, td { border: 1px solid #d0d7de; padding: 3px 7px; vertical-align: top; text-align: left;
         word-break: normal; overflow-wrap: normal; }
th { background: #f6f8fa; }
tr:nth-child(even) td { background: #fafbfc; }
img { max-width: 100%; height: auto; display: block; margin: 8px 0; }
"""

_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)")


def markdown_to_html(markdown: str, folder: Path, title: str) -> str:
    """``markdown`` as a whole HTML page; images it names relative to ``folder`` are embedded (one that
    is missing stays a broken image, named by its alt text)."""
    from markdown_it import MarkdownIt

    def embed(m: re.Match) -> str:
        path = folder / m[2]
        if not path.is_file():
            return m[0]
        return f"![{m[1]}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(_IMAGE.sub(embed, markdown))
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n{body}</body></html>\n")

"""The HTML pieces shared by the report and the comparison: page frame, figures, diagnosis.

Everything a user can name (layer and module names, run paths, findings' text, remedy code)
passes through :func:`esc` before it reaches the page: a module may be called ``<script>``.
Figures are embedded as ``<img src="data:...">``: an SVG inside ``<img>`` cannot run scripts or
fetch anything, so the page needs no network and a hostile name drawn in a figure stays text.
The page carries one small inline script, which counts the figures that decoded (``data-figures``
on ``<body>``) for the headless-browser test; the page reads the same without it.
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gradprobe.errors import ConfigError

SVG_LIMIT = 120_000
"""Bytes above which a figure is also rendered as PNG, and the smaller of the two is kept."""
PNG_DPI = 110


def esc(value: object) -> str:
    """HTML-escape any value (quotes included, so it is safe inside attributes too)."""
    return html.escape(str(value), quote=True)


_COMMENT = re.compile(rb"<!--.*?-->\n?", re.S)  # matplotlib escapes "--" inside its comments
_PATH_DATA = re.compile(rb'(?<= d=")[^"]*')
_XY = re.compile(rb'(?<= [xy]=")-?\d+\.\d+(?=")')
_DECIMALS = re.compile(rb"-?\d+\.\d{2,}")


def _one_decimal(m: re.Match[bytes]) -> bytes:
    return b"%.1f" % float(m.group())


def _path(m: re.Match[bytes]) -> bytes:
    d = _DECIMALS.sub(_one_decimal, m.group())
    return _COMMANDS.sub(rb"\1", _SPACE.sub(b" ", d)).strip()


_SPACE = re.compile(rb"\s+")
_COMMANDS = re.compile(rb" ?([MLQCz]) ?")
_BETWEEN_TAGS = re.compile(rb">\s+<")
_METADATA = re.compile(rb"<metadata>.*?</metadata>", re.S)


def compact_svg(data: bytes) -> bytes:
    """The same drawing in fewer bytes: comments, metadata and indentation dropped, path and
    placement coordinates rounded to 0.1 pt (1/720 inch, far below a screen pixel; matplotlib
    writes six decimals) and path commands written without spaces."""
    data = _METADATA.sub(b"", _COMMENT.sub(b"", data))
    data = _PATH_DATA.sub(_path, data)
    return _BETWEEN_TAGS.sub(b"><", _XY.sub(_one_decimal, data))


def embed(fig: Any, alt: str) -> tuple[str, str, int]:
    """``(img tag, format, bytes)``: the figure as SVG, or as PNG when the SVG is over
    :data:`SVG_LIMIT` and the PNG is smaller (thousands of line vertices, a large raster)."""
    import matplotlib

    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": "gradprobe"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    data, fmt = compact_svg(buf.getvalue()), "svg+xml"
    if len(data) > SVG_LIMIT:
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=PNG_DPI, metadata={"Software": None})
        if len(png.getvalue()) < len(data):
            data, fmt = png.getvalue(), "png"
    b64 = base64.b64encode(data).decode("ascii")
    width = int(fig.get_figwidth() * 96)
    tag = (f'<img class="figure" alt="{esc(alt)}" style="max-width:100%;width:{width}px" '
           f'src="data:image/{fmt};base64,{b64}">')
    return tag, fmt.split("+")[0], len(tag)


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;
 color:#1d232b;background:#fafafa;line-height:1.45}
main{max-width:1180px;margin:0 auto;padding:1.2em 1.6em 3em}
h1{font-size:1.55em;margin:.2em 0}h2{border-bottom:2px solid #e3e6ea;padding-bottom:.2em;
 margin-top:1.8em}h3{margin:.2em 0 .4em;font-size:1.1em}
.meta{color:#4a5563;font-size:.92em}.muted{color:#6b7280}
nav{font-size:.9em;margin:.6em 0}nav a{margin-right:1em;color:#1b6ca8;text-decoration:none}
figure{margin:.6em 0 1.4em;background:#fff;border:1px solid #e3e6ea;border-radius:6px;
 padding:.6em}figcaption{font-size:.88em;color:#4a5563;margin-top:.3em}
.finding{background:#fff;border:1px solid #e3e6ea;border-left:6px solid #8d96a3;
 border-radius:6px;padding:.7em 1em;margin:.8em 0}
.finding.error{border-left-color:#c0392b}.finding.warning{border-left-color:#e0a800}
.finding.info{border-left-color:#1b6ca8}
.badge{display:inline-block;font-size:.75em;font-weight:700;text-transform:uppercase;
 padding:.1em .5em;border-radius:3px;color:#fff;background:#8d96a3;margin-right:.5em;
 vertical-align:middle}.badge.error{background:#c0392b}.badge.warning{background:#b58400}
.badge.info{background:#1b6ca8}
dl.where{display:grid;grid-template-columns:max-content 1fr;gap:.1em 1em;margin:.3em 0}
dl.where dt{font-weight:600;color:#4a5563}dl.where dd{margin:0}
pre{background:#f3f4f6;border-radius:4px;padding:.4em .6em;margin:.2em 0;overflow-x:auto}
code{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:.9em}
ol.remedies li{margin-bottom:.5em}.healthy{color:#1e7b34;font-weight:600}
table{border-collapse:collapse;font-size:.9em;background:#fff}
th,td{border:1px solid #e3e6ea;padding:.25em .6em;text-align:left}
th{background:#f3f4f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
"""

SCRIPT = """<script>
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img.figure'), ok = 0;
  for (var i = 0; i < imgs.length; i++) {
    if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++;
  }
  document.body.setAttribute('data-figures', ok + '/' + imgs.length);
});
</script>"""


def page(title: str, head_html: str, nav: Iterable[tuple[str, str]], body: str) -> str:
    """The whole document: ``title`` is escaped here; ``head_html`` and ``body`` are HTML."""
    links = "".join(f'<a href="#{esc(i)}">{esc(t)}</a>' for i, t in nav)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body><main>"
        f"{head_html}<nav>{links}</nav>\n{body}\n</main>{SCRIPT}</body></html>\n"
    )


def figure_block(plot: Any, fig_id: str, title: str, intro: str = "") -> str:
    """A ``<figure>`` with the embedded image and a caption (``intro`` + the plot's note)."""
    tag, _, _ = embed(plot.figure, title)
    caption = " ".join(s for s in (intro, plot.note) if s)
    return (f'<figure id="fig-{esc(fig_id)}">{tag}'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def section(sec_id: str, title: str, content: str) -> str:
    return f'<section id="{esc(sec_id)}"><h2>{esc(title)}</h2>\n{content}\n</section>\n'


def empty(message: str) -> str:
    return f'<p class="muted empty">{esc(message)}</p>'


def diagnosis_html(diagnosis: Any) -> str:
    """The findings, most severe first, or a line saying there are none."""
    findings = list(diagnosis)
    if not findings:
        return '<p class="healthy">No findings: the gradients look healthy.</p>'
    parts = []
    for f in findings:
        sev = esc(f.severity)
        layers = list(f.layers)
        shown = ", ".join(f"<code>{esc(n)}</code>" for n in layers[:12])
        if len(layers) > 12:
            shown += f" and {len(layers) - 12} more"
        steps = "whole run" if f.steps is None else f"{int(f.steps[0])} – {int(f.steps[1])}"
        evidence = "".join(f"<li>{esc(e)}</li>" for e in f.evidence)
        remedies = "".join(
            f"<li><pre><code>{esc(r.code or r.name)}</code></pre>"
            + (f'<span class="muted">{esc(r.why)}</span>' if r.why else "") + "</li>"
            for r in f.remedies
        )
        parts.append(
            f'<article class="finding {sev}"><h3><span class="badge {sev}">{sev}</span>'
            f"{esc(f.rule)}</h3><dl class=\"where\"><dt>layers</dt><dd>{shown or 'whole model'}"
            f"</dd><dt>steps</dt><dd>{esc(steps)}</dd></dl><p>{esc(f.explanation)}</p>"
            + (f"<h4>Evidence</h4><ul>{evidence}</ul>" if evidence else "")
            + (f'<h4>Remedies, best first</h4><ol class="remedies">{remedies}</ol>'
               if remedies else "")
            + "</article>"
        )
    return "\n".join(parts)


def auto_diagnose(run: Any) -> Any:
    """``gradprobe.diagnose(run)``: the diagnosis shown when the caller gives none."""
    from gradprobe.diagnose.api import diagnose

    return diagnose(run)


def check_out(out: str | os.PathLike[str], default_name: str) -> Path:
    """The output file, after checking its folder exists and is writable (before any work)."""
    path = Path(out)
    if path.is_dir():
        path = path / default_name
    folder = path.parent
    if not folder.is_dir():
        raise ConfigError(f"out: folder {str(folder)!r} does not exist",
                          hint="create it first, or pass -o with an existing folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"out: folder {str(folder)!r} is not writable",
                          hint="pass -o with a folder you can write to")
    return path


def write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to a temporary file next to ``path`` and rename it into place, so a
    reader never sees half a report and a failure leaves the previous file as it was."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


__all__ = ["auto_diagnose", "check_out", "diagnosis_html", "embed", "empty", "esc",
           "figure_block", "page", "section", "write_atomic"]

"""``report.html``: a page a person can read, that opens anywhere.

The page has four parts:

1. the summary table (the task's metrics, the suite's chosen ones first, plus the counts:
   samples, format rate, parse failures by reason) and the run's settings;
2. a histogram per per-sample metric (matplotlib PNGs in ``report_files/``);
3. a gallery of samples, worst first (lowest reward; ties by id), each an image thumbnail with the
   ground truth drawn in green and the prediction in magenta, the per-sample metrics, the
   parse-failure reason and the raw output;
4. the versions of the packages that produced it.

Every image the page shows is a file under ``report_files/`` next to it (relative links), so the
output folder can be copied, zipped or served as it is.
"""

from __future__ import annotations

import html
import math
import os
from pathlib import Path
from typing import Any, Sequence

from vlm_grpo_ma.bench.draw import GT_COLOUR, PRED_COLOUR, draw_thumbnail

__all__ = ["write_report", "numeric_sample_metrics", "gallery_order"]

FILES_DIR = "report_files"
#: metrics where a smaller value is better (distances); everything else: larger is better
LOWER_IS_BETTER = ("dfd", "hd", "rmse", "frechet", "hausdorff", "distance", "error", "loss")


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4f}"
    return html.escape(str(v))


def numeric_sample_metrics(rows: Sequence[dict], skip_binary: bool = True) -> dict[str, list[float]]:
    """Per-sample metric name -> finite values over the rows that have it.  With
    ``skip_binary`` a metric whose values are all 0 or 1 (a threshold share, the parse rate) is
    left out, except ``reward``: its mean is in the summary and a histogram of it says nothing."""
    out: dict[str, list[float]] = {}
    for r in rows:
        for k, v in (r.get("metrics") or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out.setdefault(k, []).append(float(v))
    if skip_binary:
        out = {k: v for k, v in out.items() if k == "reward" or any(x not in (0.0, 1.0) for x in v)}
    return out


def gallery_order(rows: Sequence[dict], key: str = "reward") -> list[int]:
    """Row indices worst first: ascending ``metrics[key]`` (missing or NaN counts as worst),
    ties broken by id so the order is deterministic."""

    def k(i: int) -> tuple[float, str]:
        v = (rows[i].get("metrics") or {}).get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            v = -math.inf
        return float(v), str(rows[i].get("id"))

    return sorted(range(len(rows)), key=k)


def _histograms(values: dict[str, list[float]], out_dir: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    made = []
    for i, (name, vals) in enumerate(sorted(values.items())):
        if not vals:
            continue
        fig, ax = plt.subplots(figsize=(4.0, 2.6), dpi=100)
        lo, hi = min(vals), max(vals)
        bins = 20 if hi > lo else 1
        ax.hist(vals, bins=bins, range=(lo, hi) if hi > lo else (lo - 0.5, lo + 0.5), color="#4a78c2", edgecolor="white")
        mean = sum(vals) / len(vals)
        ax.axvline(mean, color="#d04040", linestyle="--", linewidth=1.2, label=f"mean {mean:.3g}")
        ax.set_title(name, fontsize=10)
        ax.set_ylabel("samples", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7, frameon=False)
        fig.tight_layout()
        fname = f"hist_{i:02d}.png"
        fig.savefig(out_dir / fname)
        plt.close(fig)
        made.append((name, f"{FILES_DIR}/{fname}"))
    return made


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#666;font-size:13px}
table{border-collapse:collapse;font-size:13px;background:#fff}
th,td{border:1px solid #ddd;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#f0f0f0} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.key td{font-weight:600}
.flex{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.hist figure{margin:0}.hist img{width:300px;border:1px solid #ddd;background:#fff}
.card{width:340px;background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;font-size:12px}
.card img{width:320px;display:block;margin:auto;border:1px solid #eee}
.card .id{font-weight:600;word-break:break-all}
.card .prompt{color:#444;margin:4px 0}
.card .fail{color:#b00020;font-weight:600}
.card .m{display:grid;grid-template-columns:auto auto auto auto;gap:1px 10px;margin:4px 0}
.card .m .num{text-align:right;font-variant-numeric:tabular-nums;padding-right:6px}
.card pre{white-space:pre-wrap;word-break:break-word;background:#f6f6f6;padding:4px;max-height:140px;overflow:auto}
.legend span{display:inline-block;width:12px;height:12px;margin:0 4px -2px 12px;border-radius:2px}
"""


def write_report(
    out_dir: str | os.PathLike,
    *,
    title: str,
    summary: dict[str, Any],
    key_metrics: Sequence[str],
    settings: dict[str, Any],
    versions: dict[str, str],
    rows: Sequence[dict],
    samples: dict[str, Any],
    task: str,
    sort_key: str = "reward",
    gallery_size: int = 48,
    thumb_size: int = 320,
) -> Path:
    """Write ``report.html`` (and ``report_files/``) into ``out_dir``; returns the page's path.

    Args:
        summary: aggregate metric name -> value (the ``metrics`` of metrics.json).
        key_metrics: names shown first and in bold.
        settings: flat name -> value pairs for the settings table.
        rows: the prediction rows (``id``, ``raw``, ``prediction``, ``parse_error``, ``metrics``).
        samples: id -> Sample (for images, prompts and targets).
        sort_key: the per-sample metric the gallery sorts on, ascending (worst first).
        gallery_size: how many samples the gallery shows.
    """
    out = Path(out_dir)
    files = out / FILES_DIR
    files.mkdir(parents=True, exist_ok=True)
    for old in files.glob("*.png"):
        old.unlink()

    parts = _head(title, settings, len(rows))
    parts += _summary_tables(summary, key_metrics)
    parts += _settings_table(settings)
    parts += _histogram_section(rows, files)
    parts += _gallery(rows, samples, task, sort_key, gallery_size, thumb_size, files)
    parts += _versions_table(versions)

    page = out / "report.html"
    page.write_text("\n".join(parts), encoding="utf-8")
    return page


def _head(title: str, settings: dict[str, Any], n_rows: int) -> list[str]:
    """The page's opening lines: the document head (title, style) and the heading with the
    model, the number of samples and when the run finished."""
    esc = html.escape
    return [
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f"<div class='sub'>{esc(str(settings.get('model', '')))} &middot; {n_rows} samples &middot; "
        f"{esc(str(settings.get('finished', '')))}</div>",
    ]


def _lower_is_better(name: str) -> bool:
    """Whether metric ``name`` names a distance or an error (:data:`LOWER_IS_BETTER`)."""
    return any(w in name.lower() for w in LOWER_IS_BETTER)


def _summary_tables(summary: dict[str, Any], key_metrics: Sequence[str]) -> list[str]:
    """The summary table (``key_metrics`` first and bold, then the others by name; a metric
    where lower is better marked with an arrow), then one table per dict-valued entry (the
    parse failures: reason -> samples, most frequent first)."""
    esc = html.escape
    parts = ["<h2>Summary</h2><table id='summary'><tr><th>metric</th><th>value</th></tr>"]
    ordered = [k for k in key_metrics if k in summary] + sorted(k for k in summary if k not in key_metrics)
    for k in ordered:
        v = summary[k]
        if isinstance(v, dict):
            continue
        cls = " class='key'" if k in key_metrics else ""
        arrow = " &darr;" if _lower_is_better(k) and "reward" not in k else ""
        parts.append(f"<tr{cls}><td>{esc(k)}{arrow}</td><td class='num'>{_fmt(v)}</td></tr>")
    parts.append("</table><div class='sub'>&darr;: lower is better</div>" if any(
        _lower_is_better(k) for k in ordered) else "</table>")
    for name, d in summary.items():
        if isinstance(d, dict) and d:
            parts.append(f"<h2>{esc(name)}</h2><table><tr><th>reason</th><th>samples</th></tr>")
            for reason, n in sorted(d.items(), key=lambda kv: (-kv[1], kv[0])):
                parts.append(f"<tr><td>{esc(str(reason))}</td><td class='num'>{n}</td></tr>")
            parts.append("</table>")
    return parts


def _settings_table(settings: dict[str, Any]) -> list[str]:
    """The run's settings, one row per name."""
    esc = html.escape
    return (["<h2>Settings</h2><table id='settings'>"]
            + [f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>" for k, v in settings.items()]
            + ["</table>"])


def _histogram_section(rows: Sequence[dict], files: Path) -> list[str]:
    """A histogram per per-sample metric of ``rows`` (PNGs written into ``files``); no lines
    when there is none."""
    esc = html.escape
    hists = _histograms(numeric_sample_metrics(rows), files)
    if not hists:
        return []
    return (["<h2>Per-sample distributions</h2><div class='flex hist'>"]
            + [f"<figure><img src='{esc(src)}' alt='histogram of {esc(name)}'></figure>" for name, src in hists]
            + ["</div>"])


def _gallery(rows: Sequence[dict], samples: dict[str, Any], task: str, sort_key: str, gallery_size: int,
             thumb_size: int, files: Path) -> list[str]:
    """The gallery: the ``gallery_size`` worst rows by ``sort_key``, each a card (its thumbnail
    written into ``files`` as ``sample_<rank>.png``), with the colour legend when any card has
    an image."""
    esc = html.escape
    order = gallery_order(rows, sort_key)[:gallery_size]
    parts = [f"<h2>Gallery: {len(order)} of {len(rows)} samples, worst first by {esc(sort_key)}</h2>"]
    if any(getattr(samples.get(str(rows[i].get("id"))), "images", None) for i in order):
        parts.append(f"<div class='legend'>ground truth<span style='background:rgb{GT_COLOUR}'></span>"
                     f"prediction<span style='background:rgb{PRED_COLOUR}'></span></div>")
    parts.append("<div class='flex'>")
    for rank, i in enumerate(order):
        parts += _card(rank, rows[i], samples.get(str(rows[i].get("id"))), task, thumb_size, files)
    parts.append("</div>")
    return parts


def _card(rank: int, r: dict, s: Any, task: str, thumb_size: int, files: Path) -> list[str]:
    """One gallery card: the thumbnail of row ``r``'s sample ``s`` (None if unknown) with the
    ground truth and the prediction drawn, its id, prompt (or reference, for a sample without
    images), parse failure, per-sample metrics and raw output."""
    esc = html.escape
    parts = ["<div class='card'>"]
    if s is not None and getattr(s, "images", None):
        parts.append(_thumbnail(rank, r, s, task, thumb_size, files))
    parts.append(f"<div class='id'>#{rank + 1} &middot; {esc(str(r.get('id')))}</div>")
    if s is not None and s.prompt:
        ptxt = _prompt_text(s.prompt)
        if ptxt:
            parts.append(f"<div class='prompt'>{esc(ptxt[:300])}</div>")
    if s is not None and not getattr(s, "images", None) and s.target:
        ref = "; ".join(f"{k}: {v}" for k, v in s.target.items() if isinstance(v, (str, int, float, list)))
        parts.append(f"<div class='prompt'><b>reference</b> {esc(ref[:300])}</div>")
    if r.get("parse_error"):
        parts.append(f"<div class='fail'>parse failure: {esc(str(r['parse_error']))}</div>")
    m = r.get("metrics") or {}
    if m:
        parts.append("<div class='m'>")
        for k, v in m.items():
            parts.append(f"<span>{esc(str(k))}</span><span class='num'>{_fmt(v)}</span>")
        parts.append("</div>")
    raw = str(r.get("raw", ""))
    parts.append(f"<details><summary>raw output ({len(raw)} chars)</summary><pre>{esc(raw[:4000])}</pre></details>")
    parts.append("</div>")
    return parts


def _thumbnail(rank: int, r: dict, s: Any, task: str, thumb_size: int, files: Path) -> str:
    """The card's image line: sample ``s``'s first image with its target and row ``r``'s
    prediction drawn, saved as ``files/sample_<rank>.png``; a line saying why when it cannot be
    drawn (a broken image never breaks the page)."""
    esc = html.escape
    fname = f"sample_{rank:04d}.png"
    try:
        thumb = draw_thumbnail(s.images[0], s.target, r.get("prediction"), task=task, size=thumb_size)
        thumb.save(files / fname)
        return f"<img src='{FILES_DIR}/{fname}' alt='sample {esc(str(r.get('id')))}'>"
    except Exception as e:  # a broken image never breaks the page
        return f"<div class='fail'>image unavailable: {esc(str(e))}</div>"


def _prompt_text(prompt: dict) -> str:
    """A sample's prompt fields as ``name: value; ...`` (text and numbers only; loaders may give
    one text under two names: shown once)."""
    shown: list[str] = []
    for k, v in prompt.items():
        if isinstance(v, (str, int, float)) and str(v) not in [x.split(": ", 1)[1] for x in shown]:
            shown.append(f"{k}: {v}")
    return "; ".join(shown)


def _versions_table(versions: dict[str, str]) -> list[str]:
    """The package versions, and the end of the page."""
    esc = html.escape
    return (["<h2>Versions</h2><table id='versions'>"]
            + [f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in versions.items()]
            + ["</table></body></html>"])

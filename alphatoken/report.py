"""The HTML report of which tokens AlphaToken keeps, and why.

    from alphatoken.report import write_report
    write_report("report.html", examples, token_values, tokenizer, title="my data")

One self-contained file (inline CSS, inline SVG, a few lines of inline JS; no external assets, opens from
disk without a server):

* every response rendered token by token, each token's background coloured by its value — green where a step
  on it helps, red where it hurts, stronger for larger |value|; with rank-fused values (config combine="rank",
  the default, where every value is a positive rank) green and red mean above and below the batch's median —
  in three views toggled by buttons:
  total (the selection score, the view it opens on), adaptation and stability — keys 1/2/3 too, and
  `report.html#stability` opens on that view; hover a token for its numbers;
* tokens kept whatever their value (their id is in `always_keep_token_ids`, e.g. <eos>) outlined in blue with a
  blue dot, with the reason in their tooltip and in the legend;
* dropped tokens struck through and faded; the per-sequence keep ratio beside each sequence;
* a histogram of the values of the current view (inline SVG), kept and dropped stacked;
* optional summary, configuration and comparison tables at the top.

`examples` are dicts with "input_ids" (list or tensor; "prompt", "response", "part", "index", "line" are
shown when present; "flags", a bool per input position, underlines tokens the caller marks, e.g. known
noise). `token_values` is one TokenValues whose rows match `examples`, or a list of them whose rows,
concatenated, match `examples` (each row right- or left-padded to its batch width).
"""
from __future__ import annotations

import datetime as _dt
import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from .batch import IGNORE_INDEX

VIEWS = (("a", "adaptation", "Adaptation"), ("s", "stability", "Stability"), ("t", "total", "Total (selection score)"))
POS_RGB = (22, 163, 74)  # green: a step on the token helps this objective
NEG_RGB = (220, 38, 38)  # red: it hurts
MAX_PROMPT_CHARS = 600


@dataclass
class ScoredToken:
    text: str
    valued: bool
    kept: bool = False
    adaptation: float = 0.0
    stability: float = 0.0
    total: float = 0.0
    flagged: bool = False  # marked by the caller (e.g. the toy data's known-noise tokens)
    forced: bool = False  # kept whatever its value: its id is in always_keep_token_ids (e.g. <eos>)
    token_id: int = -1


@dataclass
class ScoredSequence:
    prompt: str
    tokens: list  # list[ScoredToken], the response region
    label: str = ""

    @property
    def n_valued(self) -> int:
        return sum(t.valued for t in self.tokens)

    @property
    def n_kept(self) -> int:
        return sum(t.valued and t.kept for t in self.tokens)

    @property
    def keep_ratio(self) -> float:
        return self.n_kept / self.n_valued if self.n_valued else 0.0


# ------------------------------------------------------------------------------------------------ alignment


def _as_list(x) -> list:
    if hasattr(x, "tolist"):
        return x.tolist()
    return list(x)


def _rows(token_values) -> list[dict]:
    """Per-row plain lists of each field, from one TokenValues or a list of them."""
    tvs = token_values if isinstance(token_values, (list, tuple)) else [token_values]
    rows = []
    for tv in tvs:
        fields = {}
        for name in ("adaptation", "stability", "total", "mask", "response"):
            value = getattr(tv, name)
            if hasattr(value, "detach"):
                value = value.detach().float().cpu() if name not in ("mask", "response") else value.detach().cpu()
            fields[name] = _as_list(value)
        for b in range(len(fields["total"])):
            rows.append({k: v[b] for k, v in fields.items()})
    return rows


def _token_text(tokenizer, token_id: int) -> str:
    try:
        return tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    except TypeError:
        return tokenizer.decode([token_id])


def score_sequences(examples: Sequence[Mapping], token_values, tokenizer,
                    always_keep_token_ids: Sequence[int] = ()) -> list[ScoredSequence]:
    """Align each example's tokens with its row of values; the prompt decoded, the response token by token.
    Valued tokens whose id is in `always_keep_token_ids` are marked `forced` (kept whatever their value)."""
    forced_ids = {int(i) for i in always_keep_token_ids}
    rows = _rows(token_values)
    if len(rows) != len(examples):
        raise ValueError(f"{len(examples)} examples but {len(rows)} rows of token values; pass one row per example")
    out = []
    for ex, row in zip(examples, rows):
        ids = [int(i) for i in _as_list(ex["input_ids"])]
        n, width = len(ids), len(row["response"])
        offset = 0
        if width > n and any(row["response"][n:]):  # left padding
            offset = width - n
        resp = [bool(row["response"][offset + i]) for i in range(n)]
        labels = [int(x) for x in _as_list(ex["labels"])] if "labels" in ex else None
        flags = [bool(x) for x in _as_list(ex["flags"])] if ex.get("flags") is not None else None
        region = [i for i in range(n) if resp[i] or (labels is not None and labels[i] != IGNORE_INDEX)]
        start = region[0] if region else n
        stop = region[-1] + 1 if region else n
        tokens = []
        for i in range(start, stop):
            j = offset + i
            kept = bool(row["mask"][j])
            tokens.append(ScoredToken(
                text=_token_text(tokenizer, ids[i]), valued=resp[i], kept=kept,
                adaptation=float(row["adaptation"][j]), stability=float(row["stability"][j]),
                total=float(row["total"][j]), flagged=bool(flags[i]) if flags and i < len(flags) else False,
                forced=resp[i] and kept and ids[i] in forced_ids, token_id=ids[i],
            ))
        prompt = ex.get("prompt")
        if prompt is None:
            prompt = tokenizer.decode(ids[:start], skip_special_tokens=True) if start else ""
        bits = []
        if "index" in ex:
            bits.append(f"#{ex['index']}")
        if "line" in ex:
            bits.append(f"line {ex['line']}")
        if ex.get("part"):
            bits.append(str(ex["part"]))
        out.append(ScoredSequence(prompt=str(prompt), tokens=tokens, label=" · ".join(bits)))
    return out


# -------------------------------------------------------------------------------------------------- colours


def _scale(values: Sequence[float]) -> float:
    """The |value| that gets full colour: the 98th percentile of |values| (robust to a few outliers)."""
    mags = sorted(abs(v) for v in values if math.isfinite(v))
    if not mags:
        return 1.0
    k = min(len(mags) - 1, int(math.ceil(0.98 * len(mags))) - 1)
    return mags[max(k, 0)] or mags[-1] or 1.0


def _colour(value: float, scale: float) -> str:
    if not math.isfinite(value):
        return "#9ca3af"
    rgb = POS_RGB if value >= 0 else NEG_RGB
    alpha = 0.06 + 0.84 * min(1.0, abs(value) / scale)
    return "#%02x%02x%02x%02x" % (*rgb, int(round(alpha * 255)))


def _fmt(x: float) -> str:
    return f"{x:+.3e}" if math.isfinite(x) else str(x)


# ---------------------------------------------------------------------------------------------------- pieces


def _histogram_svg(values: Sequence[float], kept: Sequence[bool], name: str, bins: int = 40) -> str:
    """Inline SVG histogram of `values`, kept (solid) and dropped (light) stacked; zero marked."""
    w, h, pad_l, pad_b, pad_t = 640, 184, 44, 44, 12
    finite = [(v, k) for v, k in zip(values, kept) if math.isfinite(v)]
    if not finite:
        return f'<svg class="hist" width="{w}" height="40" role="img"><text x="8" y="24">no {name} values</text></svg>'
    ordered = sorted(v for v, _ in finite)
    lo, hi = ordered[0], ordered[-1]
    clipped_lo = clipped_hi = False
    if len(ordered) >= 20:  # heavy tails: bin the 1st-99th percentile, the rest piles into the end bins
        q_lo, q_hi = ordered[int(0.01 * (len(ordered) - 1))], ordered[int(math.ceil(0.99 * (len(ordered) - 1)))]
        if q_hi > q_lo:
            clipped_lo, clipped_hi = q_lo > lo, q_hi < hi
            lo, hi = q_lo, q_hi
    if hi <= lo:
        lo, hi = lo - 0.5 * (abs(lo) or 1.0), hi + 0.5 * (abs(hi) or 1.0)
    width = (hi - lo) / bins
    kept_c, drop_c = [0] * bins, [0] * bins
    for v, k in finite:
        i = max(0, min(bins - 1, int((v - lo) / width)))
        (kept_c if k else drop_c)[i] += 1
    top = max(a + b for a, b in zip(kept_c, drop_c)) or 1
    plot_w, plot_h = w - pad_l - 10, h - pad_b - pad_t
    bw = plot_w / bins
    parts = [
        f'<svg class="hist" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
        f'role="img" aria-label="histogram of {name} values">',
        f'<line x1="{pad_l}" y1="{pad_t + plot_h}" x2="{pad_l + plot_w}" y2="{pad_t + plot_h}" stroke="#6b7280"/>',
        f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{pad_t + plot_h}" stroke="#6b7280"/>',
    ]
    for i in range(bins):
        x = pad_l + i * bw
        centre = lo + (i + 0.5) * width
        hk = plot_h * kept_c[i] / top
        hd = plot_h * drop_c[i] / top
        rgb = POS_RGB if centre >= 0 else NEG_RGB
        tip = f"{lo + i * width:.3g} … {lo + (i + 1) * width:.3g}: {kept_c[i]} kept, {drop_c[i]} dropped"
        if hk:
            parts.append(f'<rect x="{x + 0.5:.1f}" y="{pad_t + plot_h - hk:.1f}" width="{bw - 1:.1f}" '
                         f'height="{hk:.1f}" fill="rgb{rgb}"><title>{html.escape(tip)}</title></rect>')
        if hd:
            parts.append(f'<rect x="{x + 0.5:.1f}" y="{pad_t + plot_h - hk - hd:.1f}" width="{bw - 1:.1f}" '
                         f'height="{hd:.1f}" fill="rgba{(*rgb, 0.3)}" stroke="rgb{rgb}" stroke-width="0.5">'
                         f'<title>{html.escape(tip)}</title></rect>')
    if lo < 0 < hi:
        x0 = pad_l + plot_w * (0 - lo) / (hi - lo)
        parts.append(f'<line x1="{x0:.1f}" y1="{pad_t - 4}" x2="{x0:.1f}" y2="{pad_t + plot_h}" '
                     f'stroke="#111827" stroke-dasharray="3,3"/>')
        if 60 < x0 - pad_l < plot_w - 60:
            parts.append(f'<text x="{x0:.1f}" y="{pad_t + plot_h + 14}" text-anchor="middle">0</text>')
    parts += [
        f'<text x="{pad_l}" y="{pad_t + plot_h + 14}" text-anchor="start">{"≤ " if clipped_lo else ""}{lo:.3g}</text>',
        f'<text x="{pad_l + plot_w}" y="{pad_t + plot_h + 14}" text-anchor="end">{"≥ " if clipped_hi else ""}'
        f'{hi:.3g}</text>',
        f'<text x="{pad_l - 6}" y="{pad_t + 8}" text-anchor="end">{top}</text>',
        f'<text x="{pad_l - 6}" y="{pad_t + plot_h}" text-anchor="end">0</text>',
        f'<text x="{pad_l + plot_w / 2:.1f}" y="{h - 4}" text-anchor="middle" class="axis">{html.escape(name)} '
        f'(tokens; solid = kept, light = dropped)</text>',
        "</svg>",
    ]
    return "".join(parts)


def _table(rows: Any, caption: str = "") -> str:
    """An HTML table from a mapping (key/value), a list of dicts (columns = union of keys) or a list of lists."""
    if not rows:
        return ""
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""

    def cell(v):
        if isinstance(v, float):
            v = f"{v:.4g}"
        return html.escape(str(v))

    if isinstance(rows, Mapping):
        body = "".join(f"<tr><th>{cell(k)}</th><td>{cell(v)}</td></tr>" for k, v in rows.items())
        return f'<table class="kv">{cap}{body}</table>'
    rows = list(rows)
    if isinstance(rows[0], Mapping):
        cols: list = []
        for r in rows:
            cols += [k for k in r if k not in cols]
        head = "".join(f"<th>{cell(c)}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows)
    else:
        head = "".join(f"<th>{cell(c)}</th>" for c in rows[0])
        body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f'<table class="grid">{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _centres(valued, ranked: bool) -> dict:
    """Where each view's colour changes from red to green: 0 for values (their sign says helps / hurts); the
    median for rank-fused values (combine="rank": every value is a positive rank, so red means "ranked below the
    batch's median")."""
    out = {}
    for key, field, _ in VIEWS:
        vals = sorted(getattr(t, field) for t in valued if math.isfinite(getattr(t, field)))
        out[key] = vals[len(vals) // 2] if ranked and vals else 0.0
    return out


def _token_html(tok: ScoredToken, scales: Mapping[str, float], centres: Optional[Mapping[str, float]] = None) -> str:
    text = tok.text
    shown = html.escape(text.replace("\n", "↵\n").replace("\t", "⇥\t")) if text else "∅"
    if not tok.valued:
        return f'<span class="tok nv" title="not valued (no token before it)">{shown}</span>'
    style = ";".join(
        f"--{key}:{_colour(getattr(tok, field) - (centres or {}).get(key, 0.0), scales[key])}"
        for key, field, _ in VIEWS
    )
    state = "kept" if tok.kept else "dropped"
    if tok.forced:
        state = (f"force-kept: id {tok.token_id} is in always_keep_token_ids, so it is kept whatever its value "
                 "(and counts towards the keep budget)")
    tip = (f"{text!r}  {state}\nadaptation {_fmt(tok.adaptation)}\nstability  {_fmt(tok.stability)}\n"
           f"total      {_fmt(tok.total)}")
    cls = ("tok k" if tok.kept else "tok d") + (" nz" if tok.flagged else "") + (" f" if tok.forced else "")
    if tok.flagged:
        tip += "\nflagged"
    return f'<span class="{cls}" style="{style}" title="{html.escape(tip)}">{shown}</span>'


_CSS = """
:root{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#111827;background:#fff}
body{margin:0 auto;max-width:1100px;padding:18px 22px 60px}
h1{font-size:1.45rem;margin:.2rem 0 .3rem}h2{font-size:1.1rem;margin:1.4rem 0 .5rem}
.sub{color:#4b5563;font-size:.9rem}
table{border-collapse:collapse;margin:.4rem 0 .8rem;font-size:.88rem}
th,td{border:1px solid #e5e7eb;padding:3px 9px;text-align:left}thead th{background:#f3f4f6}
caption{text-align:left;font-weight:600;padding:2px 0 4px}
table.kv th{background:#f9fafb;font-weight:500}
.bar{position:sticky;top:0;background:#fffffff0;padding:8px 0;border-bottom:1px solid #e5e7eb;z-index:2;
 display:flex;gap:10px;align-items:center;flex-wrap:wrap}
.bar button{font:inherit;font-size:.9rem;padding:4px 12px;border:1px solid #9ca3af;border-radius:6px;
 background:#fff;cursor:pointer}
.bar button.on{background:#111827;color:#fff;border-color:#111827}
.legend{font-size:.82rem;color:#374151;display:flex;gap:10px;align-items:center}
.sw{display:inline-block;width:26px;height:12px;border-radius:3px;vertical-align:middle}
.hist{display:none;font-size:11px;fill:#374151}
body[data-view=a] .hist.a,body[data-view=s] .hist.s,body[data-view=t] .hist.t{display:block}
.vname{display:none}body[data-view=a] .vname.a,body[data-view=s] .vname.s,body[data-view=t] .vname.t{display:inline}
.seq{border:1px solid #e5e7eb;border-radius:8px;margin:10px 0;padding:8px 12px}
.seq .hd{display:flex;justify-content:space-between;font-size:.82rem;color:#4b5563;margin-bottom:4px}
.kr{display:inline-block;width:90px;height:8px;background:#fee2e2;border-radius:4px;margin-left:6px;
 vertical-align:middle;overflow:hidden}.kr i{display:block;height:100%;background:#16a34a}
.prompt{color:#6b7280;white-space:pre-wrap;font-size:.86rem;margin-bottom:4px;border-left:3px solid #e5e7eb;
 padding-left:8px}
.resp{white-space:pre-wrap;font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:1.05rem;
 line-height:2;word-break:break-word}
.tok{border-radius:3px;padding:2px 1px;margin-right:1px;background:var(--a)}
.tok.nz{box-shadow:inset 0 -3px 0 #7c3aed}
.tok.f{box-shadow:inset 0 0 0 2px #2563eb}.tok.f.nz{box-shadow:inset 0 0 0 2px #2563eb,inset 0 -5px 0 #7c3aed}
.tok.f::after{content:"";display:inline-block;width:5px;height:5px;border-radius:50%;background:#2563eb;
 vertical-align:super;margin-left:2px}
body[data-view=s] .tok{background:var(--s)}body[data-view=t] .tok{background:var(--t)}
.tok.d{text-decoration:line-through;text-decoration-thickness:2px;text-decoration-color:#111827;opacity:.6}
.tok.nv{background:none;color:#9ca3af}
.tok:hover{outline:1px solid #111827}
.note{color:#6b7280;font-size:.85rem}.why{color:#6b7280}
.tops{display:flex;gap:28px;flex-wrap:wrap;align-items:flex-start}
details{font-size:.88rem;margin:.2rem 0 .6rem}summary{cursor:pointer;font-weight:600}
"""

_JS = """
function setView(v){document.body.dataset.view=v;
 document.querySelectorAll('.bar button[data-v]').forEach(function(b){b.classList.toggle('on',b.dataset.v===v)});}
document.addEventListener('keydown',function(e){var m={'1':'a','2':'s','3':'t'};if(m[e.key])setView(m[e.key]);});
(function(){var h={'#adaptation':'a','#stability':'s','#total':'t'}[location.hash];if(h)setView(h);})();
"""


def render_report(examples: Sequence[Mapping], token_values, tokenizer, *, title: str = "AlphaToken report",
                  summary: Optional[Mapping] = None, config: Optional[Mapping] = None, comparison: Any = None,
                  notes: Sequence[str] = (), max_sequences: int = 200, default_view: str = "total",
                  flag_label: str = "flagged", always_keep_token_ids: Sequence[int] = ()) -> str:
    """The report as one HTML string (see the module docstring). It opens on `default_view` (total: the score
    tokens are chosen by); tokens kept because their id is in `always_keep_token_ids` are outlined in blue with a dot."""
    seqs = score_sequences(examples, token_values, tokenizer, always_keep_token_ids)
    valued = [t for s in seqs for t in s.tokens if t.valued]
    ranked = (config or {}).get("combine") == "rank"
    centres = _centres(valued, ranked)
    scales = {key: _scale([getattr(t, field) - centres[key] for t in valued]) for key, field, _ in VIEWS}
    view = {field: key for key, field, _ in VIEWS}.get(default_view, default_view)
    if view not in {k for k, _, _ in VIEWS}:
        raise ValueError(f"default_view must be one of adaptation, stability, total; got {default_view!r}")

    head = _summary_table(seqs, valued, summary, always_keep_token_ids)
    bar = _view_buttons(view) + _legend(valued, centres, scales, ranked, flag_label)
    shown = seqs[:max_sequences]
    body = "".join(_sequence_html(s, scales, centres) for s in shown)
    more = (f'<p class="note">Showing the first {len(shown)} of {len(seqs)} sequences; the values file has all.</p>'
            if len(shown) < len(seqs) else "")
    note_html = "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        f'<body data-view="{view}">'
        f"<h1>{html.escape(title)}</h1>"
        f'<div class="sub">AlphaToken values each response token on <b>adaptation</b> (does a step on it lower the '
        f"target loss?) and <b>stability</b> (does it pull the model away from its pre-trained weights, by the "
        f"Fisher-weighted drift?); <b>total</b> = adaptation + λ·stability decides what is kept. Generated {when}.</div>"
        + '<div class="tops">' + _table(head, "Summary")
        + (_table(comparison, "Comparison") if comparison else "") + "</div>"
        + (f"<details><summary>Configuration</summary>{_table(config)}</details>" if config else "")
        + note_html
        + f'<div class="bar">{bar}</div>'
        + "<h2>Distribution of values</h2>" + _histograms(valued)
        + "<h2>Responses</h2>" + more + body
        + f"<script>{_JS}</script></body></html>\n"
    )


def _summary_table(seqs, valued, summary: Optional[Mapping], always_keep_token_ids: Sequence[int]) -> dict:
    """The Summary table's rows: counts of sequences and tokens, the force-kept ones, then the caller's `summary`."""
    n_kept = sum(t.kept for t in valued)
    head = {
        "sequences": len(seqs),
        "response tokens valued": len(valued),
        "kept": f"{n_kept} ({n_kept / len(valued):.1%})" if valued else "0",
        "dropped": len(valued) - n_kept,
    }
    if always_keep_token_ids:
        n_forced = sum(t.forced for t in valued)
        names = ", ".join(sorted({t.text or str(t.token_id) for t in valued if t.forced})) or "none present"
        head["force-kept"] = f"{n_forced} ({names}: always_keep_token_ids)"
    head.update(dict(summary or {}))
    return head


def _view_buttons(view: str) -> str:
    """One button per view (adaptation, stability, total), the opening `view` pressed."""
    return "".join(
        f'<button data-v="{key}" onclick="setView(\'{key}\')" class="{"on" if key == view else ""}" '
        f'title="key {i + 1}">{html.escape(label)}</button>'
        for i, (key, _, label) in enumerate(VIEWS)
    )


def _swatch(rgb, alpha: float) -> str:
    return f'<span class="sw" style="background:rgba{(*rgb, alpha)}"></span>'


def _legend(valued, centres: dict, scales: dict, ranked: bool, flag_label: str) -> str:
    """The colour legend: what the two colours mean, the marks in use (dropped, flagged, force-kept) and each view's
    full-colour scale."""
    scale_txt = "".join(
        f'<span class="vname {key}">full colour at |{field}' + (f" − {centres[key]:.3g}" if ranked else "")
        + f'| ≥ {scales[key]:.3g}</span>' for key, field, _ in VIEWS
    )
    helps, hurts = ("above the batch median (rank-fused values)", "below it") if ranked else ("helps", "hurts")
    return (
        f'<span class="legend">{_swatch(POS_RGB, 0.15)}{_swatch(POS_RGB, 0.85)} {helps} '
        f'{_swatch(NEG_RGB, 0.15)}{_swatch(NEG_RGB, 0.85)} {hurts} '
        f'<span style="text-decoration:line-through;text-decoration-thickness:2px">dropped</span> '
        + (f'<span class="tok nz" style="background:none">{html.escape(flag_label)}</span> '
           if any(t.flagged for t in valued) else "")
        + ('<span class="tok k f" style="background:none" title="kept whatever its value: its token id is in '
           'always_keep_token_ids (e.g. &lt;eos&gt;, so the model still learns to stop)">force-kept</span> '
           '<span class="why">(always_keep_token_ids: kept whatever the value)</span> '
           if any(t.forced for t in valued) else "")
        + f"{scale_txt}</span>"
    )


def _histograms(valued) -> str:
    """One histogram per view of the valued tokens' values, kept and dropped apart."""
    return "".join(
        _histogram_svg([getattr(t, field) for t in valued], [t.kept for t in valued], field).replace(
            'class="hist"', f'class="hist {key}"', 1)
        for key, field, _ in VIEWS
    )


def _sequence_html(s, scales: dict, centres: dict) -> str:
    """One response: its label and keep ratio, the (shortened) prompt, then its tokens coloured."""
    prompt = s.prompt if len(s.prompt) <= MAX_PROMPT_CHARS else s.prompt[:MAX_PROMPT_CHARS] + "…"
    pct = 100.0 * s.keep_ratio
    return (
        '<div class="seq"><div class="hd">'
        f"<span>{html.escape(s.label)}</span>"
        f"<span>keep {s.n_kept}/{s.n_valued} = {pct:.0f}%"
        f'<span class="kr"><i style="width:{pct:.1f}%"></i></span></span></div>'
        + (f'<div class="prompt">{html.escape(prompt)}</div>' if prompt else "")
        + '<div class="resp">' + "".join(_token_html(t, scales, centres) for t in s.tokens) + "</div></div>"
    )


def write_report(path, examples: Sequence[Mapping], token_values, tokenizer, **kwargs) -> Path:
    """Render the report (see `render_report` for the keyword arguments) and write it atomically to `path`."""
    from .data import atomic_output

    text = render_report(examples, token_values, tokenizer, **kwargs)
    with atomic_output(path) as fh:
        fh.write(text)
    return Path(path)

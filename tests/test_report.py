"""The HTML report: alignment, self-containment, views, and a real render in headless Chromium."""
import os
import re
import shutil
import subprocess

import pytest
import torch

from alphatoken.config import AlphaTokenConfig
from alphatoken.data import collate, tokenize_pair
from alphatoken.report import render_report, score_sequences, write_report
from alphatoken.select import protected_tokens, select_local
from alphatoken.toy import build_tokenizer
from alphatoken.values import TokenValues


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _scored(tok, n=5, seed=0, left_pad=False, keep_eos=False):
    g = torch.Generator().manual_seed(seed)
    exs = []
    for i in range(n):
        digits = "".join(str(int(d)) for d in torch.randint(0, 10, (4 + i,), generator=g))
        response = ("sure," if i % 2 else "") + "".join(sorted(digits))
        ex = tokenize_pair(tok, f"S:{digits}>", response)
        ex.update(index=i, line=i + 1, prompt=f"S:{digits}>", response=response,
                  flags=[j == ex["prompt_length"] for j in range(len(ex["input_ids"]))])
        exs.append(ex)
    b = collate(exs, tok.pad_token_id)
    resp = b["labels"] != -100
    resp[:, 0] = False
    a = torch.randn(resp.shape, generator=g) * resp
    s = -torch.rand(resp.shape, generator=g) * resp
    t = a + s
    cfg = AlphaTokenConfig(keep_ratio=0.5, always_keep_token_ids=(tok.eos_token_id,) if keep_eos else ())
    mask = select_local(t, resp, cfg, protected=protected_tokens(b["labels"], resp, cfg))
    tv = TokenValues(a, s, t, torch.zeros_like(t), t, mask, resp)
    if left_pad:  # the same values, shifted as a left-padded batch would hold them
        shifted = {}
        for f in ("adaptation", "stability", "direct", "causal", "total", "mask", "response"):
            x = getattr(tv, f)
            y = torch.zeros((x.shape[0], x.shape[1] + 3), dtype=x.dtype)
            for r, ex in enumerate(exs):
                n_r = len(ex["input_ids"])
                y[r, y.shape[1] - n_r:] = x[r, :n_r]
            shifted[f] = y
        tv = TokenValues(**shifted)
    return exs, tv


def test_alignment_right_and_left_padding(tok):
    exs, tv = _scored(tok)
    seqs = score_sequences(exs, tv, tok)
    _, tv_left = _scored(tok, left_pad=True)
    seqs_left = score_sequences(exs, tv_left, tok)
    for s, sl, ex in zip(seqs, seqs_left, exs):
        assert [t.text for t in s.tokens] == [t.text for t in sl.tokens]
        assert [t.total for t in s.tokens] == [t.total for t in sl.tokens]
        assert "".join(t.text for t in s.tokens).startswith(ex["response"])
    n_kept = sum(s.n_kept for s in seqs)
    assert n_kept == int((tv.mask & tv.response).sum())
    # a list of per-batch TokenValues works the same as one
    first, second = exs[:2], exs[2:]
    tv1, tv2 = [TokenValues(**{f: getattr(tv, f)[sl] for f in ("adaptation", "stability", "direct", "causal",
                                                                 "total", "mask", "response")})
                for sl in (slice(0, 2), slice(2, None))]
    assert [s.keep_ratio for s in score_sequences(first + second, [tv1, tv2], tok)] == [s.keep_ratio for s in seqs]
    with pytest.raises(ValueError, match="rows of token values"):
        score_sequences(exs[:2], tv, tok)


def test_report_content(tok, tmp_path):
    exs, tv = _scored(tok)
    text = render_report(exs, tv, tok, title="T <x>", summary={"model": "m"},
                         comparison=[{"method": "full", "target": 0.5}], config={"keep_ratio": 0.5})
    assert "T &lt;x&gt;" in text
    # self-contained: no external resources
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:|//)', text)
    assert "<link" not in text and "@import" not in text
    for view in ("Adaptation", "Stability", "Total"):
        assert f">{view}" in text
    assert text.count('class="tok d') == int((tv.response & ~tv.mask).sum())  # dropped: struck through
    assert text.count('class="tok k') == int((tv.response & tv.mask).sum())
    assert "line-through" in text
    assert text.count("<svg") == 3  # one histogram per view
    assert 'data-view="t"' in text and 'class="on" title="key 3">Total' in text  # opens on Total: what selects
    assert 'class="tok k f' not in text and "force-kept" not in text  # nothing forced without the ids
    assert re.search(r"keep \d+/\d+ = \d+%", text)
    path = write_report(tmp_path / "r.html", exs, tv, tok)
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert os.listdir(tmp_path) == ["r.html"]


def test_force_kept_tokens_are_marked_with_the_reason(tok):
    """Tokens kept because their id is in always_keep_token_ids (<eos>) are marked, with why, in a tooltip and
    the legend; a dropped <eos> under no such setting is not."""
    exs, tv = _scored(tok, n=6, keep_eos=True)
    eos = tok.eos_token_id
    n_eos = sum(int(((torch.tensor(ex["input_ids"]) == eos)).sum()) for ex in exs)
    assert n_eos == len(exs)
    text = render_report(exs, tv, tok, always_keep_token_ids=(eos,))
    marked = re.findall(r'<span class="tok k f" style="--[^"]*" title="([^"]*)">([^<]*)</span>', text)
    assert len(marked) == n_eos and all(shown == "&lt;eos&gt;" for _, shown in marked)
    assert all("force-kept: id 2 is in always_keep_token_ids" in tip for tip, _ in marked)
    assert "force-kept" in text.split('<div class="bar">')[1].split("</div>")[0]  # in the legend
    assert f"{n_eos} (&lt;eos&gt;: always_keep_token_ids)" in text  # and in the summary
    seqs = score_sequences(exs, tv, tok, always_keep_token_ids=(eos,))
    assert sum(t.forced for s in seqs for t in s.tokens) == n_eos
    assert all(t.kept for s in seqs for t in s.tokens if t.forced)


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


@pytest.mark.skipif(_chromium() is None, reason="no Chromium here (Debian: apt-get install chromium)")
def test_report_renders_in_headless_chromium(tok, tmp_path):
    """Open the report from disk in headless Chromium: a screenshot with the token colours, and the view toggle."""
    exs, tv = _scored(tok, n=6, keep_eos=True)
    report = write_report(tmp_path / "report.html", exs, tv, tok, summary={"model": "toy"},
                          always_keep_token_ids=(tok.eos_token_id,))
    shot = tmp_path / "shot.png"
    if os.environ.get("ALPHATOKEN_KEEP_SCREENSHOT"):
        shot = __import__("pathlib").Path(os.environ["ALPHATOKEN_KEEP_SCREENSHOT"])
    base = [_chromium(), *CHROMIUM_FLAGS]
    run = subprocess.run(base + [f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1100,900",
                                 f"--screenshot={shot}", report.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000, run.stderr[-2000:]
    Image = pytest.importorskip("PIL.Image", reason="Pillow is needed to inspect the screenshot")
    img = Image.open(shot).convert("RGB")
    colours = img.getcolors(maxcolors=1 << 20)
    greens = sum(c for c, (r, g, b) in colours if g > r + 40 and g > b + 20)
    reds = sum(c for c, (r, g, b) in colours if r > g + 60 and r > b + 60)
    assert greens > 500 and reds > 500, "token colours / histogram bars did not render"
    blues = sum(c for c, (r, g, b) in colours if b > 200 and r < 80 and 70 < g < 130)
    assert blues > 100, "the force-kept outline (#2563eb) did not render"
    # the view toggle runs from the file, without a server: #stability switches the view on load
    dom = subprocess.run(base + [f"--user-data-dir={tmp_path / 'profile2'}", "--dump-dom",
                                 report.as_uri() + "#stability"], capture_output=True, text=True, timeout=120)
    assert 'data-view="s"' in dom.stdout, dom.stderr[-2000:]
    dom = subprocess.run(base + [f"--user-data-dir={tmp_path / 'profile3'}", "--dump-dom", report.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert 'data-view="t"' in dom.stdout, dom.stderr[-2000:]  # without a hash: Total


def test_rank_fused_values_are_coloured_around_their_median(tok):
    """combine="rank": every value is a positive rank, so colour changes at the median, not at 0, and the legend
    says so; plain values keep their sign's meaning."""
    exs, tv = _scored(tok)
    r = tv.response
    ranks = torch.zeros_like(tv.total)
    order = torch.argsort(tv.total[r], stable=True)
    ranks[r] = (torch.argsort(order, stable=True).float() + 1) / int(r.sum())  # ranks in (0, 1]
    ranked = TokenValues(ranks, ranks.clone(), ranks.clone(), torch.zeros_like(ranks), ranks.clone(), tv.mask, r)
    text = render_report(exs, ranked, tok, config={"combine": "rank"})
    red = "#%02x%02x%02x" % (220, 38, 38)
    assert "above the batch median" in text and red in text  # below-median tokens are red
    plain = render_report(exs, ranked, tok, config={"combine": "linear"})
    assert "above the batch median" not in plain and f"--t:{red}" not in plain  # all positive: no red at all

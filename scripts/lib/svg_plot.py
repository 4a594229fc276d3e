"""Hand-written SVG line plots for the scripts/bench-*.sh reports.

Importable (the scripts put scripts/lib on sys.path):

    from svg_plot import line_plot
    line_plot(path, title, xs, {"kv": [...], "other": [...]}, colors, x_label)

or, as a small CLI, with the same arguments as one JSON object on stdin:

    python3 scripts/lib/svg_plot.py <<<'{"path": "p.svg", "title": "...",
        "xs": [1, 8], "series": {"kv": [10, 20]}, "colors": {"kv": "#1f77b4"},
        "x_label": "writer threads"}'

One linear y axis (ops/s, from 0 to a round step above the largest value), one
point per x value, a series' missing values (None or 0) left out.
"""
import json
import math
import os
import sys
from xml.sax.saxutils import escape


def line_plot(path, title, xs, series, colors, x_label, y_label="ops/s",
              log_x=False, margin_right=20, title_size=14):
    """Writes the plot to path, then prints "plot written to PATH" (after a
    blank line); if it cannot, says so on stderr instead (never raises OSError).

    xs: the x values, in order. series: name -> one value per x (in the
    legend in this order). colors: name -> stroke colour.
    log_x=False: the x values are evenly spaced categories, centred in their
    slots. log_x=True: positioned on a log2 scale, each with a tick mark.
    """
    W, H, L, R, T, B = 640, 400, 80, margin_right, 40, 50
    vals = [v for s in series.values() for v in s if v]
    top = max(vals) if vals else 1.0
    mag = 10 ** (len(str(int(top))) - 1)
    step = next(s * mag for s in (0.1, 0.2, 0.25, 0.5, 1, 2, 2.5, 5, 10) if top / (s * mag) <= 6)
    ymax = step * (int(top / step) + 1)

    if log_x:
        lo, hi = math.log2(min(xs)), math.log2(max(xs))

        def x(i):
            if hi == lo:
                return (L + W - R) / 2
            return L + 20 + (W - L - R - 40) * (math.log2(xs[i]) - lo) / (hi - lo)
    else:
        def x(i):
            return L + (W - L - R) * (i + 0.5) / len(xs)

    def y(v):
        return H - B - (H - T - B) * v / ymax

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="{title_size}">{escape(title)}</text>']
    v = 0.0
    while v <= ymax + 1e-9:
        out.append(f'<line x1="{L}" y1="{y(v):.1f}" x2="{W - R}" y2="{y(v):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{L - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:,.0f}</text>')
        v += step
    out.append(f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>')
    out.append(f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="black"/>')
    for i, xv in enumerate(xs):
        if log_x:
            out.append(f'<line x1="{x(i):.1f}" y1="{H - B}" x2="{x(i):.1f}" y2="{H - B + 5}" stroke="black"/>')
        out.append(f'<text x="{x(i):.1f}" y="{H - B + 18}" text-anchor="middle">{xv}</text>')
    out.append(f'<text x="{(L + W - R) / 2}" y="{H - 10}" text-anchor="middle">{escape(x_label)}</text>')
    out.append(f'<text x="16" y="{(T + H - B) / 2}" text-anchor="middle" '
               f'transform="rotate(-90 16 {(T + H - B) / 2})">{escape(y_label)}</text>')
    for n, (name, s) in enumerate(series.items()):
        pts = [(x(i), y(v)) for i, v in enumerate(s) if v]
        if not pts:
            continue
        c = colors[name]
        out.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="'
                   + " ".join(f"{a:.1f},{b:.1f}" for a, b in pts) + '"/>')
        out += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="4" fill="{c}"/>' for a, b in pts]
        ly = T + 10 + 18 * n
        out.append(f'<line x1="{L + 12}" y1="{ly}" x2="{L + 36}" y2="{ly}" stroke="{c}" stroke-width="2"/>')
        out.append(f'<text x="{L + 42}" y="{ly + 4}">{escape(name)}</text>')
    out.append("</svg>")
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            f.write("\n".join(out) + "\n")
        print(f"\nplot written to {path}")
    except OSError as e:
        print(f"cannot write the plot {path}: {e}", file=sys.stderr)


if __name__ == "__main__":
    line_plot(**json.load(sys.stdin))

"""Plot the fused model's speedup over the reference against input size, from benchmark result JSONs.

    python benchmarks/plot_speedup.py RESULT.json [MORE.json ...] [--x side|pixels] [--out PNG] [--title T]

Reads the reports ``rgt-fast bench --json`` and ``benchmarks/bench_model.py --json`` write, and those gathered
under ``benchmarks[script]["results"]`` by ``run_all.py``. Draws one line per device, dtype, mode and batch
size. OpenCV draws it, so plotting needs nothing beyond the project's dependencies.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import cv2
import numpy as np

WIDTH, HEIGHT = 900, 560
LEFT, RIGHT, TOP, BOTTOM = 80, 30, 60, 70
FONT = cv2.FONT_HERSHEY_SIMPLEX
BLACK, GREY, LIGHT = (0, 0, 0), (110, 110, 110), (225, 225, 225)
# matplotlib's tab10 colours, in BGR
COLOURS = [(180, 119, 31), (14, 127, 255), (44, 160, 44), (40, 39, 214), (189, 103, 148), (75, 86, 140),
           (194, 119, 227), (127, 127, 127), (34, 189, 188), (207, 190, 23)]


def reports(data: dict) -> list[dict]:
    """The bench reports (dicts with ``device`` and ``results``) in a loaded JSON of either format."""
    if isinstance(data.get("results"), list):
        return [data]
    found = []
    for entry in data.get("benchmarks", {}).values():
        report = entry.get("results")
        if isinstance(report, dict) and isinstance(report.get("results"), list):
            found.append(report)
    return found


def load_series(paths: list[Path], x_axis: str) -> dict[str, list[tuple[float, float]]]:
    """``{series label: sorted [(x, speedup), ...]}`` over every usable row of every file."""
    series: dict[str, list[tuple[float, float]]] = {}
    for path in paths:
        for report in reports(json.loads(Path(path).read_text())):
            for row in report["results"]:
                shape = row.get("shape")
                if "speedup" not in row or not isinstance(shape, list) or len(shape) != 4:
                    continue
                batch, _, H, W = shape
                x = H * W if x_axis == "pixels" else math.sqrt(H * W)
                label = f"{report.get('device', '?')}, {row.get('dtype', '?')}, {row.get('mode', '?')}"
                if batch != 1:
                    label += f", batch {batch}"
                series.setdefault(label, []).append((x, row["speedup"]))
    return {label: sorted(points) for label, points in series.items()}


def nice_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    raw = (hi - lo) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int(math.ceil((hi - first) / step + 1e-9)) + 1)]


def tick_text(value: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step))) if step < 1 else 0
    return f"{value:,.{decimals}f}"


def put_text(img: np.ndarray, text: str, org: tuple[int, int], scale: float = 0.5, colour=BLACK, thickness=1,
             align: str = "left") -> None:
    """``cv2.putText`` with ``org`` at the left, centre or right of the text's baseline."""
    (w, _), _ = cv2.getTextSize(text, FONT, scale, thickness)
    x = org[0] - {"left": 0, "center": w // 2, "right": w}[align]
    cv2.putText(img, text, (x, org[1]), FONT, scale, colour, thickness, cv2.LINE_AA)


def dashed_line(img: np.ndarray, p0: tuple[int, int], p1: tuple[int, int], colour, dash: int = 10) -> None:
    length = math.dist(p0, p1)
    for start in range(0, int(length), 2 * dash):
        a, b = start / length, min(start + dash, length) / length
        cv2.line(img, (round(p0[0] + a * (p1[0] - p0[0])), round(p0[1] + a * (p1[1] - p0[1]))),
                 (round(p0[0] + b * (p1[0] - p0[0])), round(p0[1] + b * (p1[1] - p0[1]))), colour, 1, cv2.LINE_AA)


def render(series: dict[str, list[tuple[float, float]]], x_axis: str, title: str) -> np.ndarray:
    img = np.full((HEIGHT, WIDTH, 3), 255, np.uint8)
    xs = [x for points in series.values() for x, _ in points]
    ys = [y for points in series.values() for _, y in points] + [1.0]
    x_ticks = nice_ticks(min(xs), max(xs)) if max(xs) > min(xs) else nice_ticks(min(xs) * 0.5, min(xs) * 1.5)
    pad = max((max(ys) - min(ys)) * 0.15, 0.05)
    y_ticks = nice_ticks(min(ys) - pad, max(ys) + pad)
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def to_px(x: float, y: float) -> tuple[int, int]:
        return (round(LEFT + (x - x0) / (x1 - x0) * plot_w), round(TOP + (y1 - y) / (y1 - y0) * plot_h))

    for x in x_ticks:
        px = to_px(x, y0)[0]
        cv2.line(img, (px, TOP), (px, TOP + plot_h), LIGHT, 1)
        cv2.line(img, (px, TOP + plot_h), (px, TOP + plot_h + 5), BLACK, 1)
        put_text(img, tick_text(x, x_ticks[1] - x_ticks[0]), (px, TOP + plot_h + 22), align="center")
    for y in y_ticks:
        py = to_px(x0, y)[1]
        cv2.line(img, (LEFT, py), (LEFT + plot_w, py), LIGHT, 1)
        cv2.line(img, (LEFT - 5, py), (LEFT, py), BLACK, 1)
        put_text(img, tick_text(y, y_ticks[1] - y_ticks[0]), (LEFT - 9, py + 5), align="right")
    cv2.rectangle(img, (LEFT, TOP), (LEFT + plot_w, TOP + plot_h), BLACK, 1)
    dashed_line(img, to_px(x0, 1.0), to_px(x1, 1.0), GREY)
    put_text(img, "1.0 = same speed", (LEFT + plot_w - 6, to_px(x0, 1.0)[1] - 6), 0.45, GREY, align="right")

    put_text(img, title, (WIDTH // 2, 32), 0.7, thickness=2, align="center")
    x_label = "input pixels (H x W)" if x_axis == "pixels" else "input side, px (sqrt(H x W))"
    put_text(img, x_label, (LEFT + plot_w // 2, HEIGHT - 18), 0.55, align="center")
    y_label = "speedup (reference ms / fused ms)"
    (w, h), base = cv2.getTextSize(y_label, FONT, 0.55, 1)
    label = np.full((h + base + 4, w + 4, 3), 255, np.uint8)
    cv2.putText(label, y_label, (2, h + 2), FONT, 0.55, BLACK, 1, cv2.LINE_AA)
    label = cv2.rotate(label, cv2.ROTATE_90_COUNTERCLOCKWISE)
    top = TOP + (plot_h - label.shape[0]) // 2
    img[top:top + label.shape[0], 12:12 + label.shape[1]] = label

    pixels = {}
    for colour, (name, points) in zip(itertools.cycle(COLOURS), series.items()):
        pixels[name] = [to_px(x, y) for x, y in points]
        for a, b in zip(pixels[name], pixels[name][1:]):
            cv2.line(img, a, b, colour, 2, cv2.LINE_AA)
        for (px, py), (_, y) in zip(pixels[name], points):
            cv2.circle(img, (px, py), 4, colour, -1, cv2.LINE_AA)
            put_text(img, f"{y:.2f}x", (px, py - 10), 0.42, colour, align="center")
    draw_legend(img, series, pixels, (LEFT, TOP, LEFT + plot_w, TOP + plot_h))
    return img


def draw_legend(img: np.ndarray, series: dict, pixels: dict, box: tuple[int, int, int, int]) -> None:
    """The legend in whichever inner corner of the plot covers the fewest data points."""
    row_h, sample_w = 22, 30
    text_w = max(cv2.getTextSize(name, FONT, 0.48, 1)[0][0] for name in series)
    w, h = sample_w + text_w + 24, row_h * len(series) + 10
    left, top, right, bottom = box
    corners = [(x, y) for y in (top + 8, bottom - 8 - h) for x in (left + 8, right - 8 - w)]
    points = [p for ps in pixels.values() for p in ps]

    def covered(corner: tuple[int, int]) -> int:
        cx, cy = corner
        return sum(cx - 20 <= px <= cx + w + 20 and cy - 20 <= py <= cy + h + 20 for px, py in points)

    cx, cy = min(corners, key=covered)
    cv2.rectangle(img, (cx, cy), (cx + w, cy + h), (255, 255, 255), -1)
    cv2.rectangle(img, (cx, cy), (cx + w, cy + h), GREY, 1)
    for i, (colour, name) in enumerate(zip(itertools.cycle(COLOURS), series)):
        y = cy + 5 + row_h * i + row_h // 2
        cv2.line(img, (cx + 8, y), (cx + 8 + sample_w, y), colour, 2, cv2.LINE_AA)
        cv2.circle(img, (cx + 8 + sample_w // 2, y), 4, colour, -1, cv2.LINE_AA)
        put_text(img, name, (cx + sample_w + 16, y + 5), 0.48)


def default_title(paths: list[Path]) -> str:
    """Names the model and scale ("RGT-S x4: ...") when every row's name starts with the same ones, as bench's do."""
    prefixes = {" ".join(row["name"].split()[:2]) for path in paths
                for report in reports(json.loads(Path(path).read_text())) for row in report["results"]
                if "speedup" in row and "name" in row}
    subject = f"{prefixes.pop()}: fused" if len(prefixes) == 1 else "Fused"
    return f"{subject} speedup over the reference by input size"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="benchmark result JSON files")
    parser.add_argument("--x", dest="x_axis", choices=["side", "pixels"], default="side",
                        help="x axis: sqrt(H x W) in px (default) or H x W")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/speedup_vs_size.png"))
    parser.add_argument("--title", help="default: names the model when all rows share one")
    args = parser.parse_args(argv)
    series = load_series(args.results, args.x_axis)
    if not series:
        print("no rows with a speedup and an image shape in " + ", ".join(map(str, args.results)), file=sys.stderr)
        return 1
    img = render(series, args.x_axis, args.title or default_title(args.results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(args.out), img):
        print(f"could not write {args.out}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({len(series)} series)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

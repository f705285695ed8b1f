"""Markdown tables shaped like the paper's A1 / A6 / A7 and matplotlib plots (Agg) of an evaluation."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from pathlib import Path

import numpy as np

from sae_vlm.eval.seeds import SEED_NAME
from sae_vlm.io import atomic_save_figure


def num(v, digits: int = 2, scale: float = 1.0, suffix: str = "") -> str:
    """A value as the tables print it; "–" for none and for NaN, so an undefined value never reads as a result."""
    return "–" if not isinstance(v, (int, float)) or v != v else f"{scale * v:.{digits}f}{suffix}"


def _width(r: dict) -> str:
    ratio = r["d_sae"] / r["d_in"]
    return f"×{ratio:g}"


def _layer_key(layer: str):
    tail = str(layer).split(".")[-1]
    return (1, 0) if tail == "last" else (0, int(tail)) if tail.lstrip("-").isdigit() else (2, str(layer))


def _row_label(r: dict) -> str:
    """The architecture, and the seed of an SAE from a seed sweep (one row per seed, not the last one alone)."""
    m = SEED_NAME.fullmatch(r["name"])
    return f"{r['arch']} s{m['seed']}" if m else r["arch"]


def paper_tables(results: list[dict], baselines: dict[str, dict]) -> str:
    """Rows layer × architecture, columns width; MS mean±std (with No SAE), FVE %, L0 (threshold mode)."""
    widths = sorted({_width(r) for r in results}, key=lambda w: float(w[1:]))
    cells: dict[tuple, dict] = defaultdict(dict)
    for r in results:
        cells[(_row_label(r), r["hook_point"])][_width(r)] = r
    rows = sorted(cells, key=lambda k: (k[0], _layer_key(k[1])))

    def fmt_ms(s, digits: int = 2):
        return f"{num(s['mean'], digits)}±{num(s['std'], digits)}" if s and num(s.get("mean")) != "–" else "–"

    def table(title, value, no_sae):
        head = "| SAE | Layer |" + (" No SAE |" if no_sae else "") + "".join(f" {w} |" for w in widths)
        sep = "|---|---|" + ("---|" if no_sae else "") + "---|" * len(widths)
        lines = [f"### {title}", "", head, sep]
        for arch, layer in rows:
            line = f"| {arch} | {layer} |"
            if no_sae:
                line += f" {fmt_ms(baselines.get(layer, {}).get('no_sae'), 4)} |"
            row = cells[(arch, layer)]
            line += "".join(f" {value(row[w]) if w in row else '–'} |" for w in widths)
            lines.append(line)
        return "\n".join(lines)

    def recon(key: str, scale: float = 1.0):
        def cell(r):
            return num(r.get("recon", {}).get(key), 1, scale)

        return cell

    batch = next((r["recon"]["batch_rows"] for r in results if "batch_rows" in r.get("recon", {})), None)
    per_batch = f"mean over validation batches of {batch} rows in the data's order, as the paper computes it"
    parts = [
        table("Mean ± std MS (cf. paper Table A1; unbiased std over scored latents)", lambda r: fmt_ms(r["ms"]), True),
        table(f"Fraction of variance explained, % (cf. Table A6; No SAE = 100): {per_batch}",
              recon("fve_batch_mean", 100), False),
        table("Fraction of variance explained, %, pooled over all rows", recon("fve", 100), False),
        table(f"L0 at inference, threshold mode (cf. Table A7): {per_batch}", recon("l0_threshold_batch_mean"), False),
        table("L0 at inference, threshold mode, pooled over all rows", recon("l0_threshold"), False),
        *[hierarchy_table(r) for r in results if "hierarchy" in r],
    ]
    return "\n\n".join(parts) + "\n"


def hierarchy_table(r: dict) -> str:
    """Per Matryoshka level: latents, scored latents, mean LCA depth (both variants) and MS (cf. paper Table 2)."""
    h = r["hierarchy"]
    mean, majority = h["lca_mean_per_level"], h["lca_mode_per_level"]
    ms = r.get("ms_per_level") or [{} for _ in mean]

    covered = h.get("taxonomy_rows")
    share = (f" ({covered['matched_rows']} of {covered['rows']} rows matched)"
             if covered and covered["matched_rows"] < covered["rows"] else "")
    lines = [f"### Hierarchy of {r['name']} (cf. Table 2): LCA depth 0..{h['taxonomy_depth']} "
             f"against the {h['taxonomy_source']} taxonomy{share}; rare latents (positive on fewer images than top "
             "slots) left out",
             "", "| Level | latents | scored | LCA depth (mean) | LCA depth (majority) | MS avg | MS max | MS min |",
             "|---|---|---|---|---|---|---|---|"]
    for lvl, (a, b, m) in enumerate(zip(mean, majority, ms)):
        lines.append(f"| {lvl} | {a['latents']} | {a['count']} | {num(a.get('mean'))} | {num(b.get('mean'))} | "
                     f"{num(m.get('mean'))} | {num(m.get('max'))} | {num(m.get('min'))} |")
    per_depth = h.get("node_detection_per_depth") or []
    if per_depth:
        lines += ["", f"Taxonomy nodes and the latent that best detects each (AUROC over the images); "
                      f"{num(h['nodes_detected'], 0, 100, '%')} of all nodes are detected at AUROC ≥ 0.9.", "",
                  "| depth | nodes | detected (AUROC ≥ 0.9) | mean best AUROC | mean Matryoshka level of its best |",
                  "|---|---|---|---|---|"]
        lines += [f"| {d['depth']} | {d['nodes']} | {num(d['detected'], 0, 100, '%')} | {num(d['mean_auroc'], 3)} | "
                  f"{num(d['mean_best_level'])} |" for d in per_depth]
    return "\n".join(lines)


@contextlib.contextmanager
def _figure(path: Path, size=(5, 3.5)):
    """Yield the axes of a new Agg figure; on exit, save it to `path` atomically and close it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    try:
        yield ax
        atomic_save_figure(path, fig, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)


def plot_ms_levels(path: Path, name: str, ms_F: np.ndarray, group_sizes, baseline_ms: np.ndarray | None) -> None:
    """MS histogram per Matryoshka level (one level for a plain SAE), raw neurons as the baseline."""
    from sae_vlm.sae.groups import level_slices

    with _figure(path, (6, 3.5)) as ax:
        bins = np.linspace(-0.2, 1.0, 61).tolist()
        for lvl, sl in enumerate(level_slices(group_sizes, len(ms_F))):
            v = ms_F[sl][~np.isnan(ms_F[sl])]
            if v.size:
                ax.hist(v, bins=bins, histtype="step", density=True, label=f"level {lvl} ({v.size})")
        if baseline_ms is not None:
            b = baseline_ms[~np.isnan(baseline_ms)]
            if b.size:
                ax.hist(b, bins=bins, density=True, alpha=0.3, color="grey", label="neurons (No SAE)")
        ax.set(xlabel="monosemanticity score", ylabel="density", title=name)
        ax.legend(fontsize=7)


def plot_fve_vs_width(path: Path, results: list[dict]) -> None:
    with _figure(path) as ax:
        series: dict[tuple, list] = defaultdict(list)
        for r in results:
            if r.get("recon", {}).get("fve") is not None:
                series[(_row_label(r), r["hook_point"])].append((r["d_sae"] / r["d_in"], 100 * r["recon"]["fve"]))
        for (arch, layer), pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{arch} {layer}")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="expansion factor (d_sae / d_in)", ylabel="FVE (%)")
        ax.legend(fontsize=7)


def plot_lca_levels(path: Path, results: list[dict]) -> None:
    """Mean LCA depth per Matryoshka level, one line per SAE; the depth axis spans the taxonomy's levels."""
    depth = max((r["hierarchy"]["taxonomy_depth"] for r in results if "hierarchy" in r), default=7)
    with _figure(path) as ax:
        for r in results:
            levels = r.get("hierarchy", {}).get("lca_mean_per_level")
            if levels:
                xs = [s["level"] for s in levels if "mean" in s]
                ax.plot(xs, [s["mean"] for s in levels if "mean" in s], marker="o", label=r["name"])
        ax.set(xlabel="Matryoshka level", ylabel=f"avg LCA depth (0..{depth})", ylim=(0, depth))
        ax.legend(fontsize=7)


def alignment_table(alignment: dict) -> str:
    """Per hook point and basis: mean best-unit AP and AUROC over the classes, coverage, k-sparse accuracies."""
    parts = []
    for hook, rec in alignment.items():
        ks = sorted({k for b in rec["bases"].values() for k in b["ksparse"]}, key=int)
        # file names only: tables.md goes into reports that must not name this machine's folders
        lines = [f"### Concept alignment at {hook}: {rec['classes']} classes ({Path(rec['labels']).name}); baselines "
                 f"and probes fit on {rec['train_rows']} rows of {Path(rec['train_data']).name}, scored on "
                 f"{rec['eval_rows']} rows", "",
                 "| basis | units | mean best AP | mean best AUROC | coverage (AP ≥ 0.5) |"
                 + "".join(f" {k}-sparse bal. acc. |" for k in ks), "|---|---|---|---|---|" + "---|" * len(ks)]
        for name, b in rec["bases"].items():
            lines.append(f"| {name} | {b['units']} | {num(b['mean_best_ap'], 3)} | {num(b['mean_best_auroc'], 3)} | "
                         f"{num(b['coverage'], 0, 100, '%')} |" + "".join(f" {num(b['ksparse'].get(k), 3)} |"
                                                                         for k in ks))
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def plot_alignment(path: Path, alignment: dict) -> None:
    """Mean best-unit AP per basis, one group of bars per hook point."""
    with _figure(path, (7, 3.5)) as ax:
        hooks = list(alignment)
        names = list(dict.fromkeys(n for rec in alignment.values() for n in rec["bases"]))
        width = 0.8 / max(len(names), 1)
        for j, name in enumerate(names):
            ys = [alignment[h]["bases"].get(name, {}).get("mean_best_ap") for h in hooks]
            ax.bar([i + j * width for i in range(len(hooks))], [np.nan if y is None else y for y in ys], width,
                   label=name)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(hooks))], hooks)
        ax.set(ylabel="mean best-unit AP over classes", ylim=(0, 1))
        ax.legend(fontsize=6, ncol=2)

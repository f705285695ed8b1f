"""The demo report's front page: the paper's three findings on the toy world, each with its numbers and a plot,
then the evaluation tables of every hook point. Links are relative to report/index.html."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from markupsafe import escape

from sae_vlm.browse.render import markdown_tables
from sae_vlm.eval.report import _figure
from sae_vlm.io import atomic_write_bytes
from sae_vlm.toyworld.findings import median, shares_by_base


def _ms_plot(path: Path, f: dict) -> None:
    """Mean MS per hook point: raw neurons against each SAE, under the tiny CLIP and the ground truth."""
    layers = list(f["ms"])
    names = sorted({n for v in f["ms"].values() for n in v["sae"]})
    with _figure(path, size=(7, 3.2)) as ax:
        width = 0.8 / (2 * (1 + len(names)))
        for e, (key, hatch) in enumerate((("ms", ""), ("ms_truth", "//"))):
            for i, series in enumerate(["neurons", *names]):
                ys = [f[key][la]["neurons"] if series == "neurons" else f[key][la]["sae"].get(series, np.nan)
                      for la in layers]
                x = np.arange(len(layers)) + (e * (1 + len(names)) + i) * width - 0.4
                label = f"{series} ({'tiny CLIP' if key == 'ms' else 'ground truth'})"
                ax.bar(x, ys, width, hatch=hatch, color=f"C{i}", edgecolor="k", linewidth=0.3, label=label)
        ax.set_xticks(np.arange(len(layers)), layers)
        ax.set(ylabel="mean MS", ylim=(0, 1))
        ax.legend(fontsize=6, ncol=2)


def _hierarchy_plot(path: Path, f: dict) -> None:
    """Left: mean LCA depth per Matryoshka level. Right: the level of each taxonomy depth's best-detecting latents."""
    import matplotlib.pyplot as plt

    with _figure(path, size=(7, 3)) as ax:
        fig = ax.figure
        ax.remove()
        left, right = fig.subplots(1, 2)
        for name, h in f["hierarchy"].items():
            lca = [np.nan if v is None else v for v in h["mean_lca_by_level"]]
            left.plot(range(len(lca)), lca, marker="o", label=name)
            right.plot(range(1, len(h["best_level_by_depth"]) + 1), h["best_level_by_depth"], marker="o", label=name)
        left.set(xlabel="Matryoshka level", ylabel="mean LCA depth of top-16 images", ylim=(0, 5))
        right.set(xlabel="taxonomy depth (1 = kingdom, 5 = species)", ylabel="level of the best latent")
        right.legend(fontsize=6)
        plt.tight_layout()


def _steering_plot(path: Path, f: dict) -> None:
    st = f["steering"]
    colours = list(st["success_by_concept"])
    x = np.arange(len(colours))
    with _figure(path, size=(6, 3.2)) as ax:
        ax.bar(x - 0.2, [st["success_by_concept"][c] for c in colours], 0.4, color=colours, edgecolor="k",
               linewidth=0.4, label="SAE latent clamped (median over seeds)")
        for seed, rates in st["success_by_seed"].items():
            ax.scatter(x - 0.2, [rates[c] for c in colours], s=8, color="k", zorder=3,
                       label="one seed" if seed == next(iter(st["success_by_seed"])) else None)
        ax.scatter(x, [st["control_by_concept"][c] for c in colours], marker="x", color="k", zorder=3,
                   label="control: other colours' latents")
        ax.bar(x + 0.2, [st["baseline_by_concept"][c] for c in colours], 0.4, color=colours, alpha=0.35,
               edgecolor="k", linewidth=0.4, label="difference of means added")
        ax.axhline(st["unsteered"], color="k", linestyle="--", linewidth=1, label="unsteered (largest)")
        ax.axhline(0.8, color="grey", linestyle=":", linewidth=1)
        ax.set_xticks(x, colours)
        ax.set(ylabel="answers naming the colour", ylim=(0, 1.05))
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)


def _joined(values, digits: int) -> str:
    return " / ".join("–" if x is None else f"{x:.{digits}f}" for x in values)


def _ms_section(f: dict) -> str:
    rows = "".join(
        f"<tr><td>{escape(layer)}</td><td>{v['neurons']:.3f}</td><td>{f['ms_truth'][layer]['neurons']:.3f}</td>"
        + "".join(f"<td>{escape(n)}: {m:.3f} / {f['ms_truth'][layer]['sae'][n]:.3f}</td>" for n, m in v["sae"].items())
        + "</tr>" for layer, v in f["ms"].items())
    return f"""<div class="finding"><h2>1. SAE latents are more monosemantic than neurons</h2>
<p>Mean MS, under the tiny CLIP / under the ground-truth concepts (SAEs: median over seeds {_seeds(f)}).</p>
<table class="lat md"><thead><tr><th>hook point</th><th>neurons (CLIP)</th><th>neurons (truth)</th>
<th colspan="9">SAEs (CLIP / truth)</th></tr></thead>
<tbody>{rows}</tbody></table><img src="plots/finding_ms.png" alt="MS of SAE latents against neurons"></div>"""


def _seeds(f: dict) -> str:
    return ", ".join(map(str, f["seeds"]))


def _hierarchy_section(f: dict) -> str:
    rows = "".join(f"<tr><td>{escape(n)}</td><td>{_joined(h['mean_lca_by_level'], 2)}</td>"
                   f"<td>{_joined(h['best_level_by_depth'], 1)}</td><td>{h['nodes_detected']:.0%}</td></tr>"
                   for n, h in f["hierarchy"].items())
    planted = "".join(
        f"<tr><td>{escape(arch)}</td><td>{' / '.join(f'{v:.0%}' for v in p['recovery_by_depth'])}</td>"
        f"<td>{_joined([p['depth_level_spearman']], 2)}</td>"
        f"<td>{p['absorption']:.0%}</td></tr>" for arch, p in f.get("planted", {}).items())
    return f"""<div class="finding"><h2>2. Do Matryoshka levels follow the taxonomy?</h2>
<p>On the toy images: mean LCA depth of each level's top-16 images (0..5); for each taxonomy depth (kingdom ..
species), the mean Matryoshka level of the latents that best detect its nodes (AUROC); the share of all 62 nodes
detected at AUROC ≥ 0.9. Measured against the ground-truth taxonomy; medians over seeds {_seeds(f)}.</p>
<table class="lat md"><thead><tr><th>SAE</th><th>LCA depth by level</th><th>level of the best latent by depth</th>
<th>nodes detected</th></tr></thead><tbody>{rows}</tbody></table>
<img src="plots/finding_hierarchy.png" alt="hierarchy per level">
<p>With a known answer: features planted in a 4-level tree (4 / 12 / 36 / 108 features in 40 dimensions; a child
fires only with its parent; <code>sae-vlm planted</code>). Per tree depth, the share of features some latent
recovers at cosine ≥ 0.9; the Spearman correlation between a feature's depth and the Matryoshka group of its best
latent; absorption: when a child fires, how often its parent's latent stays silent. Medians over seeds.</p>
<table class="lat md"><thead><tr><th>SAE</th><th>recovered, root .. leaf</th><th>Spearman depth / group</th>
<th>absorption</th></tr></thead><tbody>{planted}</tbody></table>
<img src="plots/planted.png" alt="planted tree: recovery and group by depth"></div>"""


def _steering_section(f: dict) -> str:
    st = f["steering"]
    seeds = list(st["success_by_seed"])
    rows = "".join(f"<tr><td>{escape(c)}</td><td>{v:.0%}</td><td>{st['success_min_by_concept'][c]:.0%}</td><td>"
                   + " / ".join(f"{st['success_by_seed'][s][c]:.0%}" for s in seeds)
                   + f"</td><td>{st['control_by_concept'][c]:.0%}</td><td>{st['baseline_by_concept'][c]:.0%}</td></tr>"
                   for c, v in st["success_by_concept"].items())
    return f"""<div class="finding"><h2>3. Does clamping one colour latent steer the toy LLaVA?</h2>
<p>Share of answers to "What colour is the object?" on held-out images of other colours that name the colour
whose latent is clamped on every image token. The latent must detect the colour (AUROC ≥ 0.9 on 1000 training
images, and no other colour better); it and α are chosen on 40 other images, for each of the token SAE's seeds
({", ".join(seeds)}). Control: how often the other colours' latents, clamped the same way, make the LLaVA name this
colour. Unsteered, it names a colour in at most {st['unsteered']:.0%} of its answers. Beside it, the
difference-of-means baseline.</p>
<table class="lat md"><thead><tr><th>colour</th><th>SAE latent, median</th><th>minimum</th><th>per seed</th>
<th>control</th><th>difference of means</th></tr></thead>
<tbody>{rows}</tbody></table>
<img src="plots/finding_steering.png" alt="steering success per colour"></div>"""


def _stability_section(f: dict) -> str:
    rows = "".join(f"<tr><td>{escape(k)}</td><td>{v:.0%}</td></tr>" for k, v in f["stability"].items())
    return f"""<div class="finding"><h2>4. Would another seed find the same latents?</h2>
<p>Each SAE was trained under seeds {_seeds(f)} on the same batches. A latent is stable when its one-to-one
match (Hungarian, by decoder cosine) in every other seed has cosine ≥ 0.9; the share of stable latents, mean over
seeds. <code>sae-vlm compare</code> shows the whole distribution for any two SAEs.</p>
<table class="lat md"><thead><tr><th>SAE</th><th>stable latents</th></tr></thead><tbody>{rows}</tbody></table>
</div>"""


def _localisation_section(f: dict, examples: str) -> str:
    loc = dict(f.get("localisation", {}))
    if not loc:
        return ""
    chance = loc.pop("chance")
    rows = "".join(f"<tr><td>{escape(base)}</td><td>{_share(median(shares.values()))}</td><td>"
                   + " / ".join(_share(s) for s in shares.values()) + "</td></tr>"
                   for base, shares in shares_by_base(loc).items())
    return f"""<div class="finding"><h2>5. Where in the image does a latent fire?</h2>
<p>For the latents that best detect each colour (AUROC ≥ 0.9), the share of their top images whose map peaks
inside the creature's box; chance, the box's mean share of the image, is {chance:.0%}. Token SAEs: the latent's code
on each patch; SAEs on the CLS token and on <code>last</code>: |gradient × input| through the tiny CLIP
(<code>evaluate --heatmaps</code>). Median and per seed ({_seeds(f)}).</p>
<table class="lat md"><thead><tr><th>SAE</th><th>peak in the box, median</th><th>per seed</th></tr></thead>
<tbody>{rows}</tbody></table>{examples}</div>"""


def _naming_section(f: dict, detail: dict) -> str:
    if not f.get("naming"):
        return ""
    rows = "".join(
        f"<tr><td>{escape(k)}</td><td>{_share(v)}</td><td>{_share((d.get('share_range') or [None])[0])}–"
        f"{_share((d.get('share_range') or [None, None])[1])}</td><td>{_num(d.get('score'))}</td>"
        f"<td>{_num(d.get('score_shuffled'))}</td></tr>"
        for k, v in f["naming"].items() for d in [detail.get(k, {})])
    return f"""<div class="finding"><h2>6. Are the latents named after what they detect?</h2>
<p><code>sae-vlm name</code> with the world's 27 words: each live latent's top-3 names by the tiny CLIP's text-image
cosine with its top images. For the latents that best detect a taxonomy node (AUROC ≥ 0.9), the share named by
the node's word; the name score (AUROC of the name's similarity between images where the latent fires and where it
does not) of each latent's first name, against another latent's name. Medians over seeds {_seeds(f)}.</p>
<table class="lat md"><thead><tr><th>SAE</th><th>named by its node</th><th>range</th><th>name score</th>
<th>another latent's name</th></tr></thead><tbody>{rows}</tbody></table></div>"""


def _alignment_section(f: dict) -> str:
    if not f.get("alignment"):
        return ""
    parts = []
    for hook, row in f["alignment"].items():
        ranges = row.get("range", {})
        cells = "".join(f"<tr><td>{escape(k)}</td><td>{_num(v)}</td><td>{_span(ranges.get(k))}</td></tr>"
                        for k, v in row.items() if k != "range")
        parts.append(f"<p>At <code>{escape(hook)}</code>:</p><table class=\"lat md\"><thead><tr><th>basis</th>"
                     f"<th>mean best-unit AP</th><th>range over seeds</th></tr></thead><tbody>{cells}</tbody></table>")
    return f"""<div class="finding"><h2>7. Do SAE latents align with the labels better than other bases?</h2>
<p><code>evaluate --labels</code> with the world's 62 taxonomy nodes and 9 nuisance values: per label, the best
single unit's AP on the held-out images, averaged over labels, for the SAEs and for the raw neurons, a random
rotation, PCA, k-means and NMF fit on the training images. SAEs: median over seeds {_seeds(f)}.</p>
{"".join(parts)}</div>"""


def _num(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def _span(r) -> str:
    return "" if not r else f"{r[0]:.3f}–{r[1]:.3f}"


def _share(v) -> str:
    return "–" if v is None else f"{v:.0%}"


def front_page(metrics: dict, report_dir: Path, eval_root: Path, examples: str = "") -> str:
    """Write the findings' plots into report_dir/plots and return the HTML of the front page."""
    f, plots = metrics["findings"], report_dir / "plots"
    _ms_plot(plots / "finding_ms.png", f)
    _hierarchy_plot(plots / "finding_hierarchy.png", f)
    _steering_plot(plots / "finding_steering.png", f)
    planted_png = report_dir.parent / "planted" / "planted.png"  # the demo's `sae-vlm planted` output
    if planted_png.is_file():
        atomic_write_bytes(plots / "planted.png", planted_png.read_bytes())
    md = {layer: eval_root / layer / "clip" / "tables.md" for layer in metrics["layers"]}
    tables = "".join(f"<h3>{escape(layer)}</h3>{markdown_tables(p.read_text())}"
                     for layer, p in md.items() if p.is_file())
    return (f"<h1>The paper's findings on the toy world</h1>\n{_ms_section(f)}\n{_hierarchy_section(f)}\n"
            f"{_steering_section(f)}\n{_stability_section(f)}\n{_localisation_section(f, examples)}\n"
            f"{_naming_section(f, metrics.get('naming', {}))}\n{_alignment_section(f)}\n"
            f"<h2>Every hook point</h2>{tables}\n")

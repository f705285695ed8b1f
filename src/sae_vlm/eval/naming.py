"""Names for latents, as DN-CBM and CLIP-Dissect name vision concepts: each live latent's top vocabulary names, and a
score saying how well each name fits (`sae-vlm name`).

A latent's concept is the mean unit image embedding of its top images (those it fires on), as the MS and the
browser's text search take it; its names are the vocabulary entries whose text embeddings are nearest to it in
cosine. A name's score is the AUROC with which the name's image-text similarity separates the evaluation images
where the latent fires (code > 0) from those where it does not: 1 when the name ranks every fired image above every
silent one, 0.5 for chance. Beside it, the same AUROC for the top name of another live latent (a fixed random
permutation): what a wrong name scores on this SAE.

Scale: codes are read chunk by chunk and only the fired (image, latent) pairs are kept; the similarities of a block
of names at a time are ranked over the images, so no [images, latents] or [images, vocabulary] matrix is dense.

Writes into the evaluation folder: `names` [F, 3] (text, "" for a dead latent), `name_cos` and `name_score`
[F, 3] and `name_score_shuffled` [F] (NaN where undefined) added to latents/<name>.npz; embeddings/ (evaluate's
image-embedding cache); naming.json (the vocabulary's source, per SAE what was named and the seconds each step took).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sae_vlm.config import NameConfig
from sae_vlm.data.source import ActivationSource, sequential_chunks
from sae_vlm.device import resolve_device
from sae_vlm.eval.classes import WNID, find_mapping, read_names
from sae_vlm.eval.embed import ClipEmbedder, check_text_tower, load_embeddings
from sae_vlm.eval.hierarchy import parse_inat_label
from sae_vlm.eval.sources import open_data, source_key
from sae_vlm.io import atomic_save_npz, atomic_write_json, read_json, read_utf8
from sae_vlm.outdir import claim
from sae_vlm.sae.model import SAE
from sae_vlm.sae.runs import find_saes

ENGLISH = Path(__file__).with_name("vocab_en.txt")  # written for sae-vlm, MIT like the package (README)
RANK_CELLS = 1 << 22  # images x names ranked at once: 32 MB of float64 ranks
LATENT_BLOCK = 4096  # latents whose concepts are formed and compared with the vocabulary at once
SHUFFLE_SEED = 0


# --- the vocabulary --------------------------------------------------------------------------------------------
def read_vocab(path: str | Path) -> list[str]:
    """One name per line (UTF-8, a BOM dropped, blank lines skipped); an empty file, bytes that are not UTF-8 and a
    name given twice (compared case-insensitively, as CLIP's tokenizer lowercases) are refused, naming the line."""
    path = Path(path)
    text = read_utf8(path, "--vocab")
    words: list[str] = []
    seen: dict[str, int] = {}
    for n, line in enumerate(text.split("\n"), 1):
        word = " ".join(line.split())
        if not word:
            continue
        if not word.isprintable():
            raise ValueError(f"--vocab {path} line {n}: {word[:40]!r} holds a control character; expected one "
                             "name per line")
        if word.casefold() in seen:
            raise ValueError(f"--vocab {path} line {n}: {word!r} repeats line {seen[word.casefold()]}; list each "
                             "name once")
        seen[word.casefold()] = n
        words.append(word)
    if not words:
        raise ValueError(f"--vocab {path} is empty; expected one name per line")
    return words


def store_names(src: ActivationSource) -> list[str]:
    """The dataset's own class and taxonomy names: iNat-style labels' levels (a species as 'Genus epithet'), nested
    folders' parts, ImageNet synsets named by LOC_synset_mapping.txt in or beside the image folder (a WordNet id
    without one is left out)."""
    meta = src.meta
    if meta is None:
        return []
    labels = list(dict.fromkeys(str(lab) for lab in meta.labels() if lab))
    paths = meta.paths(resolve=False)
    mapping_file = find_mapping(Path(paths[0]).parent.parent) if paths else None
    synsets = read_names(mapping_file) if mapping_file is not None else {}
    names: list[str] = []
    for label in labels:
        levels = parse_inat_label(label.rsplit("/", 1)[-1])
        if levels is not None and len(levels) == 7:  # iNat's species is named by its genus and epithet
            levels = (*levels[:6], f"{levels[5]} {levels[6]}")
        for part in levels if levels is not None else label.split("/"):
            if WNID.match(part):
                part = synsets.get(part, "")
            if part:
                names.append(part.replace("_", " "))
    return names


def default_vocab(src: ActivationSource) -> tuple[list[str], str]:
    """The store's own names, then the packaged English nouns and adjectives, each once (case-insensitively)."""
    own = store_names(src)
    english = ENGLISH.read_text(encoding="utf-8").split("\n")
    first: dict[str, str] = {}
    for w in own + [w for w in english if w]:
        first.setdefault(w.casefold(), w)
    words = list(first.values())
    return words, f"{len(dict.fromkeys(w.casefold() for w in own))} names from the store + {ENGLISH.name}"


# --- the pieces: fired pairs, concepts, names, scores -------------------------------------------------------------
class FiredImages:
    """The (image, latent) pairs where a latent fires, gathered chunk by chunk (one row per image), as int32."""

    def __init__(self, d_sae: int):
        self.d_sae, self.n = d_sae, 0
        self.rows: list[np.ndarray] = []
        self.cols: list[np.ndarray] = []

    def add(self, c_RF: torch.Tensor) -> None:
        r, f = (c_RF > 0).nonzero(as_tuple=True)
        self.rows.append((r + self.n).to(torch.int32).cpu().numpy())
        self.cols.append(f.to(torch.int32).cpu().numpy())
        self.n += c_RF.shape[0]

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image rows [M], latents [M], images each latent fires on [F])."""
        rows = np.concatenate(self.rows) if self.rows else np.zeros(0, np.int32)
        cols = np.concatenate(self.cols) if self.cols else np.zeros(0, np.int32)
        return rows, cols, np.bincount(cols, minlength=self.d_sae)


def unit(x) -> torch.Tensor:
    x = torch.tensor(np.asarray(x, np.float32)) if not isinstance(x, torch.Tensor) else x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def concepts(e_ND: torch.Tensor, top_idx_FT: np.ndarray, top_val_FT: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """(unit concept vectors [F, D], live [F]): the mean unit embedding of each latent's top images it fires on."""
    fired_FT = torch.as_tensor((top_idx_FT >= 0) & (top_val_FT > 0))
    idx_FT = torch.as_tensor(top_idx_FT).long().clamp(min=0)
    out = torch.zeros(len(idx_FT), e_ND.shape[1])
    for f0 in range(0, len(idx_FT), LATENT_BLOCK):
        w_FT = fired_FT[f0 : f0 + LATENT_BLOCK].float()
        out[f0 : f0 + LATENT_BLOCK] = (e_ND[idx_FT[f0 : f0 + LATENT_BLOCK]] * w_FT[..., None]).sum(1)
    return unit(out), fired_FT.any(1).numpy()


def top_names(c_FD: torch.Tensor, t_VD: torch.Tensor, live_F: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(vocabulary index [F, k], cosine [F, k]) of each live latent's nearest names, best first; -1 and NaN else."""
    k = min(k, len(t_VD))
    word_FK, cos_FK = np.full((len(c_FD), k), -1), np.full((len(c_FD), k), np.nan, np.float32)
    for f0 in range(0, len(c_FD), LATENT_BLOCK):
        cos, word = (c_FD[f0 : f0 + LATENT_BLOCK] @ t_VD.T).topk(k, dim=1)
        word_FK[f0 : f0 + LATENT_BLOCK], cos_FK[f0 : f0 + LATENT_BLOCK] = word.numpy(), cos.numpy()
    word_FK[~live_F], cos_FK[~live_F] = -1, np.nan
    return word_FK, cos_FK


def column_ranks(s_NB: torch.Tensor) -> torch.Tensor:
    """1-based ranks of each column's values (ascending), ties sharing the mean of their positions, float64."""
    v, order = s_NB.sort(dim=0, stable=True)
    n = v.shape[0]
    pos = torch.arange(1, n + 1, dtype=torch.float64)[:, None].expand(v.shape)
    new = torch.ones(v.shape, dtype=torch.bool)
    new[1:] = v[1:] != v[:-1]
    last = torch.ones_like(new)
    last[:-1] = new[1:]
    start = torch.where(new, pos, 0.0).cummax(0).values
    end = torch.where(last, pos, float(n + 1)).flip(0).cummin(0).values.flip(0)
    return torch.empty_like(pos).scatter_(0, order, (start + end) / 2)


def name_scores(e_ND: torch.Tensor, t_VD: torch.Tensor, word_FK: np.ndarray, fired) -> np.ndarray:
    """AUROC [F, K] of name word_FK[f, k]'s similarity to each image for separating the images latent f fires on
    (`fired`: FiredImages.result()) from the rest, by rank sums over blocks of names; NaN where undefined."""
    rows_M, cols_M, count_F = fired
    n, (f, k) = len(e_ND), word_FK.shape
    used = np.unique(word_FK[word_FK >= 0])
    slot = np.full(len(t_VD) + 1, -1)
    slot[used] = np.arange(len(used))  # word -1 (dead) maps to slot -1 through the extra entry
    by_slot = []
    for kk in range(k):
        s_M = slot[word_FK[cols_M, kk]]
        o = np.argsort(s_M, kind="stable")
        by_slot.append((s_M[o], o))
    rank_sum = np.zeros((f, k))
    block = max(1, RANK_CELLS // max(n, 1))
    for b0 in range(0, len(used), block):
        words = torch.as_tensor(used[b0 : b0 + block])
        r_NB = column_ranks(e_ND @ t_VD[words].T).numpy()
        for kk, (s_sorted, o) in enumerate(by_slot):
            lo, hi = np.searchsorted(s_sorted, [b0, b0 + len(words)])
            sel = o[lo:hi]
            rank_sum[:, kk] += np.bincount(cols_M[sel], r_NB[rows_M[sel], s_sorted[lo:hi] - b0], minlength=f)
    p = count_F[:, None].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        auroc = (rank_sum - p * (p + 1) / 2) / (p * (n - p))
    return np.where((word_FK >= 0) & (p > 0) & (p < n), auroc, np.nan).astype(np.float32)


def shuffled_top(word_FK: np.ndarray, seed: int = SHUFFLE_SEED) -> np.ndarray:
    """[F, 1]: each live latent gets another live latent's top name (a fixed permutation); -1 for dead ones."""
    live = np.flatnonzero(word_FK[:, 0] >= 0)
    out = np.full((len(word_FK), 1), -1)
    out[live, 0] = word_FK[np.random.default_rng(seed).permutation(live), 0]
    return out


# --- one SAE ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Target:
    """One SAE to name: where it lives, the rows it reads and its top images from the evaluation."""

    name: str
    sdir: Path
    src: ActivationSource
    top_idx: np.ndarray
    top_val: np.ndarray
    latents: Path  # latents/<name>.npz, which gains the names


@torch.no_grad()
def fired_images(sae: SAE, src: ActivationSource, chunk_rows: int, dev, quiet: bool) -> tuple:
    acc = FiredImages(sae.cfg.d_sae)
    with tqdm(total=src.rows, desc="name: codes", unit="rows", disable=quiet, leave=False) as bar:
        for _, x_RD in sequential_chunks(src, chunk_rows):
            acc.add(sae.encode(x_RD.to(dev)).float())
            bar.update(x_RD.shape[0])
    return acc.result()


def name_latents(e_ND: torch.Tensor, t_VD: torch.Tensor, words: list[str], top_idx, top_val, fired, k: int
                 ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The arrays latents/<name>.npz gains, and the seconds of each step."""
    t0 = time.perf_counter()
    c_FD, live_F = concepts(e_ND, top_idx, top_val)
    word_FK, cos_FK = top_names(c_FD, t_VD, live_F, k)
    t1 = time.perf_counter()
    scores = name_scores(e_ND, t_VD, np.concatenate([word_FK, shuffled_top(word_FK)], 1), fired)
    vocab = np.array(words + [""])
    arrays = {"names": vocab[word_FK], "name_cos": cos_FK, "name_score": scores[:, :-1],
              "name_score_shuffled": scores[:, -1]}
    return arrays, {"names": t1 - t0, "scores": time.perf_counter() - t1}


def summary(arrays: dict[str, np.ndarray], seconds: dict[str, float]) -> dict:
    """naming.json's record of one SAE: how many latents were named, median top-1 cosine and scores."""
    live = arrays["names"][:, 0] != ""
    top, shuffled = arrays["name_score"][live, 0], arrays["name_score_shuffled"][live]
    both = ~np.isnan(top) & ~np.isnan(shuffled)

    def med(x) -> float | None:
        x = x[~np.isnan(x)]
        return float(np.median(x)) if len(x) else None

    return {"named": int(live.sum()), "latents": len(live), "median_cos": med(arrays["name_cos"][live, 0]),
            "median_score": med(top), "median_score_shuffled": med(shuffled),
            "share_above_shuffled": float((top[both] > shuffled[both]).mean()) if both.any() else None,
            "seconds": {k: round(v, 2) for k, v in seconds.items()}}


# --- the command -----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class NamingResult:
    """What naming.json holds, and where it went."""

    eval_dir: Path
    embedder: str
    vocab: dict  # source, count, template
    saes: dict[str, dict] = dataclasses.field(default_factory=dict)  # summary() per SAE
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # text and image embeddings, in all

    def to_json(self) -> dict:
        return {"embedder": self.embedder, "vocab": self.vocab, "saes": self.saes,
                "seconds": {k: round(v, 2) for k, v in self.seconds.items()}}


def evaluation(cfg: NameConfig) -> tuple[Path, dict, str]:
    """(evaluation folder, its metrics.json, the store it read or --data)."""
    eval_dir = Path(cfg.eval_dir if cfg.eval_dir is not None else f"{cfg.run_dir}/eval")
    mfile = eval_dir / "metrics.json"
    if not mfile.is_file():
        raise FileNotFoundError(f"{mfile} is missing; run `sae-vlm evaluate {cfg.run_dir}` first or pass --eval DIR")
    metrics = read_json(mfile)
    saes = metrics.get("saes") if isinstance(metrics, dict) else None
    if not isinstance(saes, list) or not all(isinstance(r, dict) and isinstance(r.get("name"), str) for r in saes):
        raise ValueError(f"{mfile} is not the metrics.json `sae-vlm evaluate` writes (no list of scored SAEs)")
    data = cfg.data if cfg.data is not None else metrics.get("data")
    if not isinstance(data, str) or not Path(data).exists():
        raise FileNotFoundError(f"activation store {data} does not exist; pass --data STORE, the store evaluate read")
    return eval_dir, metrics, data


def top_of(eval_dir: Path, name: str, d_sae: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The SAE's top images as evaluate saved them, checked against its width and the store's rows."""
    f = eval_dir / "latents" / f"{name}.npz"
    try:
        with np.load(f, allow_pickle=False) as z:
            idx, val = z["top_indices"], z["top_values"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{f} holds no readable top images ({type(e).__name__}); re-run `sae-vlm evaluate`") from None
    if idx.ndim != 2 or idx.shape[0] != d_sae or val.shape != idx.shape or idx.dtype.kind not in "iu":
        raise ValueError(f"{f}: top images {idx.shape} and values {val.shape}; expected two [{d_sae}, top] arrays")
    if idx.size and idx.max() >= rows:
        raise ValueError(f"{f} names image row {int(idx.max())}, beyond the store's {rows} rows: the evaluation read "
                         "another store? pass --data STORE")
    return idx, val


def targets(cfg: NameConfig, eval_dir: Path, metrics: dict, data: str) -> list[Target]:
    """The SAEs the evaluation scored, with their rows (one per image) and top images; each checked."""
    scored = {r["name"] for r in metrics["saes"]}
    found = [(n, d) for n, d in find_saes(cfg.run_dir, metrics.get("step"))[0] if n in scored]
    if not found:
        raise ValueError(f"{eval_dir / 'metrics.json'} scores none of the SAEs of {cfg.run_dir}; pass its own "
                         "--eval DIR")
    out = []
    for name, sdir in found:
        hook, tokens = source_key(sdir)
        src = open_data(data, hook, tokens)
        if src.meta is None:
            raise ValueError(f"--data {data} holds no image paths; naming embeds the images: pass an activation store")
        if src.meta.rows_per_image != 1:
            raise ValueError(f"{src.meta.path} has {src.meta.rows_per_image} rows per image ({tokens} tokens); "
                             "names need one row per image: name an SAE of a CLS, mean or pooled store")
        d_sae = read_json(sdir / "config.json").get("d_sae")
        out.append(Target(name, sdir, src, *top_of(eval_dir, name, d_sae, src.rows),
                          eval_dir / "latents" / f"{name}.npz"))
    return out


def text_embeddings(embedder: str, words: list[str], dev, template: str = "{}") -> torch.Tensor:
    """Unit text embeddings [V, D] of the names, each written into `template`, on the CPU."""
    model = ClipEmbedder.load(embedder, device=str(dev))
    return unit(model.texts([template.replace("{}", w) for w in words])).cpu()


def name_run(cfg: NameConfig) -> NamingResult:
    """Name every live latent of the SAEs `cfg.run_dir`'s evaluation scored; every input is checked before anything
    is written or a model loads."""
    eval_dir, metrics, data = evaluation(cfg)
    todo = targets(cfg, eval_dir, metrics, data)
    words, source = (read_vocab(cfg.vocab), str(cfg.vocab)) if cfg.vocab else default_vocab(todo[0].src)
    check_text_tower(cfg.embedder)
    dev = resolve_device(cfg.device)
    res = NamingResult(eval_dir, cfg.embedder, {"source": source, "names": len(words), "template": cfg.template})
    with claim(eval_dir, "evaluate"):
        t0 = time.perf_counter()
        t_VD = text_embeddings(cfg.embedder, words, dev, cfg.template)
        res.seconds["text"] = time.perf_counter() - t0
        for t in todo:
            t1 = time.perf_counter()
            emb = load_embeddings(t.src, t.src.rows, eval_dir / "embeddings", None, cfg.embedder, dev, cfg.quiet)[0]
            assert emb is not None  # an embedder was given
            if emb.shape[1] != t_VD.shape[1]:
                raise ValueError(f"--embedder {cfg.embedder}: image embeddings have width {emb.shape[1]} but text "
                                 f"embeddings {t_VD.shape[1]}; expected one joint space")
            e_ND = unit(emb)
            res.seconds["images"] = res.seconds.get("images", 0.0) + time.perf_counter() - t1
            t2 = time.perf_counter()
            fired = fired_images(SAE.from_pretrained(t.sdir, device=dev).eval(), t.src, cfg.chunk_rows, dev, cfg.quiet)
            arrays, seconds = name_latents(e_ND, t_VD, words, t.top_idx, t.top_val, fired, cfg.names)
            with np.load(t.latents, allow_pickle=False) as z:
                atomic_save_npz(t.latents, **({k: z[k] for k in z.files} | arrays))
            res.saes[t.name] = summary(arrays, {"codes": time.perf_counter() - t2 - sum(seconds.values()), **seconds})
        atomic_write_json(eval_dir / "naming.json", res.to_json())
    return res

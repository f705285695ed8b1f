"""`sae-vlm push`: an SAE folder, its model card and a SAELens copy, uploaded to the hub (or written out)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from sae_vlm.io import atomic_write_text
from sae_vlm.sae.formats import sae_lens
from sae_vlm.sae.model import SAE
from sae_vlm.sae.runs import is_sae_dir


def find_metrics(sae_dir: Path, given: str | None = None) -> dict | None:
    """This SAE's entry in a metrics.json `evaluate` wrote: `given`, else the SAE's own (SAE/eval) or its run's
    (RUN/eval). Entries match by path, else by a name only one entry has."""
    own = [sae_dir / "eval" / "metrics.json", sae_dir.parent.parent / "eval" / "metrics.json"]
    files = [Path(given)] if given else own
    for f in files:
        if not f.is_file():
            if given:
                raise FileNotFoundError(f"--metrics {f} does not exist")
            continue
        try:
            entries = [r for r in json.loads(f.read_text()).get("saes", []) if isinstance(r, dict)]
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise ValueError(f"{f} is not a metrics.json that sae-vlm evaluate wrote") from None
        same_path = [r for r in entries if Path(str(r.get("path"))).resolve() == sae_dir.resolve()]
        same_name = [r for r in entries if r.get("name") == sae_dir.name]
        if same_path or len(same_name) == 1:
            return (same_path or same_name)[0]
        if given:
            raise ValueError(f"--metrics {f} has no entry for {sae_dir}")
    return None


def _rows(sae: SAE) -> list[tuple[str, object]]:
    c, meta = sae.cfg, sae.meta
    train, src = meta.get("training") or {}, meta.get("source") or {}
    rows: list[tuple[str, object]] = [("architecture", c.arch), ("d_in", c.d_in),
                                      ("d_sae", f"{c.d_sae} (×{c.d_sae / c.d_in:g})"), ("k", c.k),
                                      ("Matryoshka groups", c.group_sizes), ("hook point", c.hook_point),
                                      ("model", c.model_id), ("token selection", c.token_selection),
                                      ("training data", meta.get("data"))]
    if train:
        rows.append(("training", ", ".join(f"{k} {train[k]:g}" if isinstance(train[k], float) else f"{k} {train[k]}"
                                           for k in ("step", "lr", "batch_size", "seed", "norm_factor") if k in train)))
    if src:
        rows.append(("converted from", f"{src.get('format')} ({Path(str(src.get('path'))).name})"))
    return [(k, v) for k, v in rows if v not in (None, "", ())]


def model_card(sae: SAE, repo_id: str, metrics: dict | None) -> str:
    c = sae.cfg
    hub_model = c.model_id if c.model_id and c.model_id.count("/") == 1 and not c.model_id.startswith(".") else None
    lines = ["---", "library_name: sae-vlm", "tags: [sparse-autoencoder, sae, interpretability, vision]"]
    lines += [f"base_model: {hub_model}"] if hub_model else []
    lines += ["---", "", f"# {repo_id.split('/')[-1]}", "",
              f"A {c.arch} sparse autoencoder with {c.d_sae} latents on {c.model_id or 'a vision encoder'}'s "
              f"`{c.hook_point or 'unknown'}` activations, saved by sae-vlm.", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in _rows(sae)]
    if metrics:
        ms, recon = metrics.get("ms") or {}, metrics.get("recon") or {}
        ms_text = f"{ms['mean']:.3f} ± {ms['std']:.3f}" if "mean" in ms else "not measured (no image embedder)"
        lines += ["", "## Evaluation (`sae-vlm evaluate`)", "", "| MS | FVE | L0 | dead fraction |",
                  "|---|---|---|---|", f"| {ms_text} | {100 * recon.get('fve', float('nan')):.1f}% | "
                  f"{recon.get('l0', float('nan')):.1f} | {recon.get('dead_frac', float('nan')):.3f} |"]
    lines += ["", "## Use", "", "```python", "from sae_vlm import SAE", "", f'sae = SAE.from_pretrained("{repo_id}")',
              "codes = sae.encode(activations)  # [N, d_in] -> [N, d_sae]", "```", "",
              "`sae_lens/` holds the same SAE in SAELens's format (`SAE.load_from_disk` on the downloaded folder).", ""]
    return "\n".join(lines)


def stage(sae_dir: Path, dest: Path, repo_id: str, metrics: dict | None) -> None:
    """The folder to upload: the SAE's own two files, README.md (the model card) and sae_lens/."""
    sae = SAE.from_pretrained(sae_dir)
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(sae_dir / name, dest / name)
    sae_lens.write(sae, dest / "sae_lens")
    atomic_write_text(dest / "README.md", model_card(sae, repo_id, metrics))


def check_repo_id(repo_id: str) -> None:
    """`namespace/name` under the hub's own rule (letters, digits, - _ ., no -- or .., at most 96 characters)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"repo id {repo_id!r}: expected a hub repo id ({' '.join(str(e).split())})") from None
    if repo_id.count("/") != 1:
        raise ValueError(f"repo id {repo_id!r}: expected namespace/name, e.g. you/clip-l22-matryoshka")


def push_sae(cfg) -> str:
    check_repo_id(cfg.repo_id)
    sae_dir = Path(cfg.sae_dir)
    if not is_sae_dir(sae_dir):
        raise FileNotFoundError(f"{sae_dir} is not an sae-vlm SAE folder (config.json + model.safetensors); "
                                "`sae-vlm convert` one from another library first")
    metrics = find_metrics(sae_dir, cfg.metrics)
    if cfg.dry_run:
        dest = Path(cfg.dry_run)
        if dest.exists() and any(dest.iterdir()):
            raise ValueError(f"--dry-run folder {dest} is not empty")
        stage(sae_dir, dest, cfg.repo_id, metrics)
        return str(dest)
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    client_error: type[Exception] = HfHubHTTPError.__mro__[1]  # the HTTP client's base error (no DNS, no route)
    api = HfApi()
    with tempfile.TemporaryDirectory(prefix="sae-vlm-push-") as tmp:
        stage(sae_dir, Path(tmp), cfg.repo_id, metrics)
        try:
            api.create_repo(cfg.repo_id, private=cfg.private, exist_ok=True)
            api.upload_folder(folder_path=tmp, repo_id=cfg.repo_id, revision=cfg.revision,
                              commit_message=f"Upload {sae_dir.name} with sae-vlm")
        except (OSError, ValueError, client_error) as e:  # also a missing token, a refused or unknown revision
            reason = " ".join(str(e).split()) or type(e).__name__
            raise OSError(f"could not push {cfg.repo_id} to {constants.ENDPOINT}: {reason}; nothing was "
                          "uploaded") from None
    return f"{constants.ENDPOINT}/{cfg.repo_id}"

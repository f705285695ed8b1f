"""Optional views that need a model: text search through a CLIP text tower (--clip) and steering (--llava).

Models load on first use; one lock per tool because a model with hooks in it serves one request at a time.
"""

from __future__ import annotations

import copy
import threading

import numpy as np

from sae_vlm.browse.data import Dictionary, RunView, as_index


class TextSearch:
    """Rank latents by the cosine between a text's CLIP embedding and the mean CLIP embedding of the latent's
    top images (the images are embedded once per dictionary, only those in some top set)."""

    def __init__(self, view: RunView, clip: str, device: str = "cpu"):
        self.view, self.clip, self.device = view, clip, device
        self._embedder = None
        self._concepts: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def embedder(self):
        if self._embedder is None:
            from sae_vlm.steer.score import ClipEmbedder

            self._embedder = ClipEmbedder.load(self.clip, device=self.device)
        return self._embedder

    def method(self, d: Dictionary) -> str:
        """'decoder' for an SAE at the pooled 'last' hook (its decoder rows live in, or project into, CLIP's joint
        space), else 'top images'."""
        if d.kind == "sae" and d.hook_point == "last":
            model = self.embedder().model
            width = d.sae().cfg.d_in
            proj = getattr(model, "visual_projection", None)
            if width == model.config.projection_dim or (proj is not None and proj.in_features == width):
                return "decoder"
        return "top images"

    def concepts(self, d: Dictionary) -> np.ndarray:
        """[n, D] unit concept vectors: decoder directions (see `method`) or the mean embedding of each latent's
        top images; zero rows where a latent has none."""
        if d.name not in self._concepts and self.method(d) == "decoder":
            import torch

            model = self.embedder().model
            with torch.no_grad():
                w = d.sae().W_dec.detach().float()
                if w.shape[1] != model.config.projection_dim:  # post_layernorm width: project like image_embeds
                    w = model.visual_projection(w.to(model.visual_projection.weight))
            w = w.float().cpu().numpy()
            self._concepts[d.name] = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
        if d.name not in self._concepts:
            from sae_vlm.steer.generate import open_image

            top = d.top_idx if d.top_idx is not None else np.full((d.n, 1), -1)
            rows = np.unique(top[top >= 0])
            found = {int(r): self.view.image_path(d, int(r)) for r in rows}
            paths = {r: p for r, p in found.items() if p is not None}
            rows = list(paths)
            images = [open_image(p) for p in paths.values()]
            emb = self.embedder().images(images) if images else np.zeros((0, 1), np.float32)
            pos = {r: i for i, r in enumerate(rows)}
            out = np.zeros((d.n, emb.shape[1]), np.float32)
            alive = ~d.rare  # the paper's concept embedding: the mean of 16 top images
            for j in np.flatnonzero(alive):
                sel = [pos[int(r)] for r in top[j] if int(r) in pos]
                if sel:
                    out[j] = emb[sel].mean(0)
            self._concepts[d.name] = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return self._concepts[d.name]

    def search(self, d: Dictionary, text: str, count: int = 50) -> list[tuple[int, float]]:
        if not text.strip():
            return []
        with self._lock:
            concepts = self.concepts(d)
            t = self.embedder().texts([text])[0]
        scores = concepts @ (t / max(np.linalg.norm(t), 1e-12))
        ok = np.flatnonzero(np.abs(concepts).sum(1) > 0)
        best = ok[np.argsort(-scores[ok], kind="stable")[:count]]
        return [(int(j), float(scores[j])) for j in best]


class Steerer:
    """Greedy LLaVA text with and without one latent clamped to α (sae_vlm.steer.generate)."""

    def __init__(self, view: RunView, llava: str, device: str = "cpu", max_new_tokens: int = 30):
        self.view, self.llava, self.device, self.max_new_tokens = view, llava, device, max_new_tokens
        self._model = None
        self._saes: dict = {}  # a copy per dictionary on the model's device (the browser's own stays on the CPU)
        self._lock = threading.Lock()

    def model(self):
        if self._model is None:
            from sae_vlm.steer.generate import load_llava

            self._model = load_llava(self.llava, device=self.device)
        return self._model

    def run(self, d: Dictionary, j: int, alpha: float, prompt: str, image: str = "white") -> tuple[str, str]:
        """(unsteered text, steered text); `image` is 'white' or a store row number."""
        from sae_vlm.steer.generate import Case, generate_cases, open_image

        d.check(j)
        if d.kind != "sae":
            raise ValueError(f"{d.name} holds raw neurons; steering needs an SAE")
        if image == "white":
            img = open_image("white")
        else:
            idx = as_index(image)
            path = self.view.image_path(d, idx) if idx is not None else None
            if path is None:
                raise ValueError(f"image={image!r}; expected 'white' or a store row with an image file")
            img = open_image(path)
        with self._lock:
            model, processor = self.model()
            if d.name not in self._saes:
                self._saes[d.name] = copy.deepcopy(d.sae()).to(next(model.parameters()).device)
            sae = self._saes[d.name]
            cases = [Case(img, prompt, None), Case(img, prompt, {j: ("clamp", float(alpha))})]
            plain, steered = generate_cases(model, processor, sae, cases, hook_point=sae.cfg.hook_point,
                                            max_new_tokens=self.max_new_tokens)
        return plain, steered

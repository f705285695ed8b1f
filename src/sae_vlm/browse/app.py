"""The read-only web app: FastAPI routes that render the shared templates.

Files are served from two places only: images by store row number (`/img/<dict>/<row>`, never a path from the
URL) and files under the run or evaluation directory (`/files/run|eval/<rel>`), resolved and checked to stay
inside that directory. `/inspect` maps an image's top latents (browse/inspector.py); it takes uploads only on a
loopback address. A refusal is one line of text: `error: ...`.
"""

from __future__ import annotations

import socket
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from sae_vlm.browse.data import RunView, TableQuery, as_index
from sae_vlm.browse.inspector import Inspector, inspect_context, is_loopback, one_line, parse_top, read_upload
from sae_vlm.browse.render import STATIC, Links, index_context, latent_context, make_env, table_context
from sae_vlm.config import BrowseConfig
from sae_vlm.data.images import open_image


def safe_file(root: Path, rel: str) -> Path:
    """`root/rel` if it is a file inside `root` (after resolving links); 403 for escapes, 404 for the rest."""
    parts = rel.replace("\\", "/").split("/")
    if any(p in ("..", "") for p in parts) or rel.startswith("/") or "\x00" in rel:
        raise HTTPException(403, "path escapes the served directory")
    root = root.resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise HTTPException(403, "path escapes the served directory")
    if not path.is_file():
        raise HTTPException(404, "no such file")
    return path


def create_app(view: RunView, search=None, steerer=None, inspector: Inspector | None = None) -> FastAPI:
    """The app; `search` (TextSearch) and `steerer` (Steerer) add their views when given; `inspector` serves
    /inspect (default: the model each SAE records, no uploads)."""
    app = FastAPI(title="sae-vlm browser", docs_url=None, redoc_url=None, openapi_url=None)
    env = make_env()
    links = Links(static=False)
    roots = {"run": view.run_dir, "eval": view.eval_dir}
    inspector = inspector if inspector is not None else Inspector(view)

    named = any(d.names is not None for d in view.dicts.values())  # names search without a CLIP model
    env.globals |= {"has_search": search is not None or named, "has_steer": steerer is not None, "has_inspect": True}

    @app.exception_handler(StarletteHTTPException)
    async def refusal(_request: Request, e: StarletteHTTPException):
        return PlainTextResponse(f"error: {one_line(e.detail)}", e.status_code, headers=e.headers)

    def page(template: str, ctx: dict) -> HTMLResponse:
        return HTMLResponse(env.get_template(template).render(**ctx))

    def lookup(name: str):
        try:
            return view.get(name)
        except KeyError as e:
            raise HTTPException(404, str(e)) from None

    @app.get("/", response_class=HTMLResponse)
    def index():
        return page("index.html", index_context(view, links))

    @app.get("/sae/{name}", response_class=HTMLResponse)
    def table(name: str, request: Request):
        d = lookup(name)
        try:
            q = TableQuery.parse(request.query_params)
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        return page("table.html", table_context(view, d, links, q))

    @app.get("/sae/{name}/latent/{j}", response_class=HTMLResponse)
    def latent(name: str, j: str):
        d, idx = lookup(name), as_index(j)
        if idx is None or idx >= d.n:
            raise HTTPException(404, f"latent {j} is not in {name} (0..{d.n - 1})")
        return page("latent.html", latent_context(view, d, idx, links))

    @app.get("/sae/{name}/latent")
    def latent_jump(name: str, j: int = 0):
        lookup(name)
        url = links.latent(name, j)
        if url is None:
            raise HTTPException(404, "no page for that latent")
        return RedirectResponse(url)

    @app.get("/img/{name}/{row}")
    def image(name: str, row: str):
        d = lookup(name)
        idx = as_index(row)
        path = view.image_path(d, idx) if idx is not None else None
        if path is None:
            raise HTTPException(404, f"no image file for row {row} of {name}")
        return FileResponse(path)

    @app.get("/files/{root}/{rel:path}")
    def files(root: str, rel: str):
        if root not in roots:
            raise HTTPException(404, f"unknown file root {root!r}; expected run or eval")
        return FileResponse(safe_file(roots[root], rel))

    @app.get("/search", response_class=HTMLResponse)
    def text_search(q: str = "", sae: str = ""):
        named = [name for name, d in view.dicts.items() if d.names is not None]
        if search is None and not named:
            raise HTTPException(404, "text search needs `sae-vlm browse --clip DIR` or names from `sae-vlm name`")
        d = lookup(sae or (named or list(view.dicts))[0])
        hits = [(j, s, links.latent(d.name, j)) for j, s in search.search(d, q)] if search is not None else []
        return page("search.html", {"links": links, "title": "text search", "q": q, "sae": d.name,
                                     "method": search.method(d) if q and search is not None else None,
                                     "names": list(view.dicts), "hits": hits, "by_name": name_hits(d, q)})

    def name_hits(d, q: str) -> list[tuple]:
        """Latents one of whose names contains `q`, by their best name's score."""
        if d.names is None or not q.strip():
            return []
        ids = d.select(TableQuery(sort="name_score", show="all", name=q, per=1000))[:50]
        return [(int(j), d.names.of(int(j)), links.latent(d.name, int(j))) for j in ids]

    @app.get("/sae/{name}/steer", response_class=HTMLResponse)
    def steer(name: str, j: int = 0, alpha: float = 50.0, prompt: str = "What is shown in this image?",
              image: str = "white", go: int = 0):
        if steerer is None:
            raise HTTPException(404, "steering needs `sae-vlm browse --llava DIR`")
        d = lookup(name)
        if d.kind != "sae" or not 0 <= j < d.n:
            raise HTTPException(404, f"latent {j} of {name} cannot be steered")
        result = None
        if go:
            try:
                result = steerer.run(d, j, alpha, prompt, image)
            except ValueError as e:
                raise HTTPException(400, str(e)) from None
        return page("steer.html", {"links": links, "title": f"steer {name} · {j}", "name": name, "j": j,
                                    "alpha": alpha, "prompt": prompt, "image": image, "result": result})

    def inspectable(name: str):
        names = inspector.saes()
        if not names:
            raise HTTPException(404, f"run {view.run_dir.name} has no SAE to inspect images with")
        d = lookup(name or names[0])
        if d.kind != "sae":
            raise HTTPException(404, f"{d.name} holds raw neurons; inspect needs an SAE, one of {', '.join(names)}")
        return d

    def inspected(d, top: int, image=None, **where) -> HTMLResponse:
        try:
            result = inspector.run(d, image, top) if image is not None else None
        except (ValueError, OSError) as e:  # no model recorded, widths that differ, a model directory gone
            raise HTTPException(400, str(e)) from None
        return page("inspect.html", inspect_context(inspector, d, links, top, result, **where))

    @app.get("/inspect", response_class=HTMLResponse)
    def inspect_row(sae: str = "", row: str = "", top: str = ""):
        d = inspectable(sae)
        try:
            n = parse_top(top)
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        if not row.strip():
            return inspected(d, n)
        idx = as_index(row.strip())
        path = view.image_path(d, idx) if idx is not None else None
        if path is None:
            raise HTTPException(404, f"row={row[:20]!r}: no image file for that store row of {d.name}")
        try:
            image = open_image(path)
        except (ValueError, OSError) as e:
            raise HTTPException(400, str(e)) from None
        return inspected(d, n, image, row=idx, label=f"store row {idx}: {path.name}")

    @app.post("/inspect", response_class=HTMLResponse)
    async def inspect_upload(request: Request):
        client = request.client.host if request.client else None
        if not inspector.uploads:
            raise HTTPException(403, "uploads are taken only while the browser listens on 127.0.0.1 "
                                     "(sae-vlm browse --host 127.0.0.1)")
        if not is_loopback(client):
            raise HTTPException(403, f"uploads are taken only from this machine (127.0.0.1), not from {client}")
        try:
            fields, filename, image = await read_upload(request, inspector.max_bytes, inspector.max_pixels)
            n = parse_top(fields.get("top"))
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        d = inspectable(fields.get("sae", ""))
        return await run_in_threadpool(inspected, d, n, image, label=f"upload: {filename}")

    @app.get("/static/{file}")
    def static(file: str):
        return FileResponse(safe_file(STATIC, file))

    return app


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port; a port in use or a host that is not this machine's is a one-line OSError."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as e:
        raise OSError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None


def serve(cfg: BrowseConfig, announce=print) -> None:
    """Serve `cfg.run_dir` with uvicorn until interrupted; `announce` gets the address line, once the port is
    bound (a port in use is refused before anything is announced or loaded)."""
    import uvicorn

    from sae_vlm.browse.tools import Steerer, TextSearch

    view = RunView(cfg.run_dir, cfg.eval_dir, cfg.data)
    with listen(cfg.host, cfg.port) as sock:
        search = TextSearch(view, cfg.clip, cfg.device) if cfg.clip else None
        steerer = Steerer(view, cfg.llava, cfg.device) if cfg.llava else None
        inspector = Inspector(view, cfg.model, cfg.device, uploads=is_loopback(cfg.host))
        announce(f"serving {view.run_dir} at http://{cfg.host}:{cfg.port}/")
        app = create_app(view, search, steerer, inspector)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        server.run(sockets=[sock])

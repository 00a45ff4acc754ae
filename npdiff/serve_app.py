"""The routes of `npdiff serve` (FastAPI): webui's /sdapi/v1 API and the page at /.

Every picture goes through npdiff.recipe.render (via npdiff/serve_jobs.py), as `npdiff generate` and
`npdiff batch` do: the same settings give the same PNG bytes. Bad requests get webui's error shape,
{"error", "detail", "body", "errors"}, with a 4xx status and a message naming the field; the server
keeps serving. Needs the `serve` extra (fastapi, uvicorn): imported only by `npdiff serve`.
"""

import asyncio
import base64
import secrets
from contextlib import asynccontextmanager
from io import BytesIO
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from npdiff.errors import NpdiffError, clip
from npdiff.images import PNG_PARAMS_KEY, png_text_chunks
from npdiff.infotext import SAMPLER_NAMES, format_infotext, parse_infotext
from npdiff.serve_jobs import Job, JobQueue, QueueFull
from npdiff.serve_refiner import check_sdxl_request
from npdiff.serve_schemas import (
    RequestError,
    decode_base64_picture,
    encode_base64,
    parse_json_body,
    picture_request,
    response_info,
    webui_parameters,
)

BODY_LIMIT = 50 * 2**20  # bytes of a request body
STATIC_DIR = Path(__file__).resolve().parent / "serve_static"
STATIC_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
DISCONNECT_POLL_SECONDS = 0.05


def error_response(status, kind, message, headers=None):
    """webui's error shape (modules/api/api.py handle_exception)."""
    return JSONResponse({"error": kind, "detail": message, "body": "", "errors": message}, status_code=status,
                        headers=headers)


class NamedBytes(BytesIO):
    """Uploaded bytes that messages name as `name` (not as a BytesIO object)."""

    def __init__(self, data, name):
        super().__init__(data)
        self.label = name

    def __str__(self):
        return self.label


async def read_body(request):
    """The request body, at most BODY_LIMIT bytes (a longer one: RequestError 413, read no further)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > BODY_LIMIT:
        raise RequestError(413, "body", f"body: {int(declared)} bytes is over the limit of {BODY_LIMIT} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > BODY_LIMIT:
            raise RequestError(413, "body", f"body: over the limit of {BODY_LIMIT} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def json_body(request):
    return parse_json_body(await read_body(request))


class BasicAuth:
    """--api-auth USER:PASS: every request needs these HTTP Basic credentials (a plain ASGI middleware, so
    the routes still see a client that disconnects)."""

    def __init__(self, app, credentials):
        self.app = app
        self.expected = ("Basic " + base64.b64encode(credentials.encode()).decode()).encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                response = error_response(401, "HTTPException", "authorization: wrong or missing credentials",
                                          {"WWW-Authenticate": "Basic"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(shelf, queue_limit=8, api_auth=None):
    """The FastAPI app over a loaded ModelShelf; api_auth "USER:PASS" requires HTTP Basic auth everywhere."""
    jobs = JobQueue(shelf, queue_limit)

    @asynccontextmanager
    async def lifespan(app):
        yield
        jobs.stop()

    app = FastAPI(title="npdiff serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.jobs = jobs
    if api_auth:
        app.add_middleware(BasicAuth, credentials=api_auth)

    @app.exception_handler(RequestError)
    async def refused(request, exc):
        return error_response(exc.status, "RequestError", str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        problems = "; ".join(f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}" for error in exc.errors())
        return error_response(422, "RequestValidationError", problems)

    @app.exception_handler(NpdiffError)
    async def bad_input(request, exc):
        return error_response(422, "NpdiffError", str(exc))

    @app.exception_handler(Exception)
    async def failed(request, exc):  # a bug or out of memory: still webui's shape, and the server keeps serving
        return error_response(500, type(exc).__name__, str(exc) or type(exc).__name__)

    async def run_job(request, job):
        """Queue `job` and wait for it; a client that disconnects cancels it."""
        try:
            jobs.submit(job)
        except QueueFull as exc:
            return error_response(503, "QueueFull", f"queue: {exc}; try again later", {"Retry-After": "5"})
        while not job.done.is_set():
            if await request.is_disconnected():
                jobs.cancel(job)
                break
            await asyncio.sleep(DISCONNECT_POLL_SECONDS)
        return None

    async def picture_route(request, kind):
        body = await json_body(request)
        picture = picture_request(body, kind)
        if picture.model:
            shelf.model_path(picture.model)  # an unknown name fails now, not in the queue
        await run_in_threadpool(check_sdxl_request, shelf, picture)  # refiner_checkpoint, SDXL settings: now
        await run_in_threadpool(jobs.check, picture)
        job = Job(picture)
        refused_now = await run_job(request, job)
        if refused_now is not None:
            return refused_now
        if job.error is not None:
            raise job.error
        if job.cancelled:
            return error_response(499, "Cancelled", "the client went away")
        images = [encode_base64(rendered.png) for rendered in job.results]
        info = response_info(picture, job.results, shelf.identity, job.interrupted)
        return {"images": images, "parameters": picture.echo, "info": info}

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request):
        return await picture_route(request, "txt2img")

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request):
        return await picture_route(request, "img2img")

    @app.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False):
        body = jobs.progress(want_image=not skip_current_image)
        if body["current_image"] is not None:
            body["current_image"] = encode_base64(body["current_image"])
        return body

    @app.post("/sdapi/v1/interrupt")
    async def interrupt():
        jobs.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    async def skip():
        jobs.interrupt()
        return {}

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        models = []
        for name in shelf.model_paths():
            loaded = name == shelf.name
            short = shelf.identity.get("model_hash") if loaded else None
            models.append({"title": f"{name} [{short}]" if short else name, "model_name": name, "hash": short,
                           "sha256": None, "filename": name, "config": None})
        return models

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        return [{"name": webui_name, "aliases": [ours], "options": {}} for ours, webui_name in SAMPLER_NAMES.items()]

    @app.get("/sdapi/v1/schedulers")
    async def schedulers():
        return [{"name": "automatic", "label": "Automatic"}, {"name": "karras", "label": "Karras"}]

    @app.get("/sdapi/v1/loras")
    async def loras():
        return [{"name": name, "alias": name, "path": name, "metadata": {}} for name in shelf.lora_paths()]

    @app.post("/sdapi/v1/refresh-loras")
    @app.post("/sdapi/v1/refresh-checkpoints")
    async def refresh():
        return {}  # the folders are read on every listing

    @app.get("/sdapi/v1/options")
    async def get_options():
        title = f"{shelf.name} [{shelf.identity.get('model_hash')}]"
        return {"sd_model_checkpoint": title, "sd_checkpoint_hash": shelf.identity.get("model_hash"),
                "samples_format": "png"}

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request):
        body = await json_body(request)
        ignored = [key for key in body if key != "sd_model_checkpoint"]
        if "sd_model_checkpoint" in body:
            name, _ = shelf.model_path(body["sd_model_checkpoint"])
            job = Job(work=lambda: shelf.load(name))
            refused_now = await run_job(request, job)
            if refused_now is not None:
                return refused_now
            if job.error is not None:
                raise job.error
        return {"npdiff_ignored": ignored}

    @app.post("/sdapi/v1/png-info")
    async def png_info(request: Request):
        body = await json_body(request)
        data = decode_base64_picture(body.get("image"), "image")
        chunks = png_text_chunks(NamedBytes(data, "image"))
        text = chunks.get("parameters")
        params = None
        try:  # the PNG's own chunk is the client's data, not the request's body: a bad one is the image's 422
            if PNG_PARAMS_KEY in chunks:
                params = parse_json_body(chunks[PNG_PARAMS_KEY].encode())
                text = text or format_infotext(params)
            elif text is not None:
                params = parse_infotext(text)
            parameters = webui_parameters(params) if params else {}
        except (RequestError, TypeError, AttributeError, KeyError, ValueError) as exc:  # an edited PNG's values
            message = str(exc).removeprefix("body: ")
            raise RequestError(422, "image", f"image: its {PNG_PARAMS_KEY!r} text chunk is not parameters npdiff "
                                             f"wrote ({clip(message)})") from None
        return {"info": text or "", "items": {key: value for key, value in chunks.items()}, "parameters": parameters}

    @app.get("/npdiff/v1/gallery")
    async def gallery():
        return [{"image": encode_base64(png), "infotext": text} for png, text in reversed(jobs.gallery)]

    @app.get("/")
    async def page():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/static/{name}")
    async def static(name: str):
        if name not in STATIC_FILES:
            return error_response(404, "HTTPException", f"no static file {name!r}")
        return FileResponse(STATIC_DIR / name, media_type=STATIC_FILES[name])

    return app

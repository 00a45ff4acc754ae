"""`npdiff serve`: keep a model loaded and answer webui's /sdapi/v1 API and a page at /.

    npdiff serve [--model M] [--models-dir DIR] [--lora-dir DIR] [--preview-vae FOLDER]
                 [--host 127.0.0.1] [--port 7860] [--api-auth USER:PASS] [--queue N]

The routes are npdiff/serve_app.py, the job queue npdiff/serve_jobs.py, webui's shapes
npdiff/serve_schemas.py, the model shelf npdiff/serve_models.py. They need the optional extra `serve`
(FastAPI + uvicorn), imported only when the command runs: npdiff imports without them.
"""

import importlib.util
import ipaddress
import sys

from npdiff.errors import NpdiffError
from npdiff.loading.weights import PRECISIONS
from npdiff.serve_models import ModelShelf

INSTALL_HINT = "npdiff serve needs the 'serve' extra: pip install 'npdiff[serve]' (FastAPI and uvicorn)"
LOOPBACK_NAMES = ("localhost",)


def serve_extra_missing():
    """-> the names of the serve extra's packages that are not installed."""
    return [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]


def is_loopback(host):
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_serve_arguments(args):
    """Before anything loads: the port, --queue, --api-auth's form, and --api-auth when bound past loopback."""
    if not 0 <= args.port <= 65535:
        raise NpdiffError(f"--port must be in [0, 65535], got {args.port}")
    if args.queue < 1:
        raise NpdiffError(f"--queue must be >= 1 (jobs that may wait), got {args.queue}")
    if args.api_auth is not None and (":" not in args.api_auth or args.api_auth.startswith(":")):
        raise NpdiffError("--api-auth must be USER:PASS")
    if not is_loopback(args.host) and args.api_auth is None:
        raise NpdiffError(f"--host {args.host} lets other machines in: give --api-auth USER:PASS too (or bind "
                          "127.0.0.1, the default)")


def run_serve(args):
    missing = serve_extra_missing()
    if missing:
        print(f"npdiff: error: {INSTALL_HINT} (missing: {', '.join(missing)})", file=sys.stderr)
        return 2
    check_serve_arguments(args)
    import uvicorn  # the serve extra, present (checked above)

    # serve_app imports FastAPI: only here, so that npdiff (and `npdiff --help`) imports without the extra
    from npdiff.serve_app import create_app

    shelf = ModelShelf(args.model, args.models_dir, args.lora_dir, args.preview_vae, args.precision)
    shelf.load()
    print(f"loaded model {shelf.name} in {shelf.load_seconds:.2f} s; serving http://{args.host}:{args.port}/",
          file=sys.stderr)
    app = create_app(shelf, queue_limit=args.queue, api_auth=args.api_auth)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def add_serve_command(subparsers):
    p = subparsers.add_parser("serve", help="webui's /sdapi/v1 API and a page that shows the picture emerge",
                              description="Keep a model loaded and serve AUTOMATIC1111 webui's API (txt2img, "
                              "img2img, progress, interrupt, models, samplers, LoRAs, options, png-info) and a "
                              "page at /. Needs the 'serve' extra: pip install 'npdiff[serve]'.")
    p.add_argument("--model", default=None, help="the model loaded first: diffusers folder or .safetensors file "
                   "(default: the shipped model)")
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                   help="load every model at this precision (bf16: weights in bfloat16, half the memory; mixed: the "
                   "UNet's transformer matmuls and attention in bf16, the rest float32; stored in each PNG)")
    p.add_argument("--models-dir", default=None, metavar="DIR",
                   help="models to switch among by name (sd_model_checkpoint): diffusers folders and .safetensors files")
    p.add_argument("--lora-dir", default=None, metavar="DIR",
                   help="LoRA .safetensors files a prompt's <lora:NAME:SCALE> may name")
    p.add_argument("--preview-vae", default=None, metavar="FOLDER",
                   help="a TAESD (AutoencoderTiny) folder for the live picture (default: the model's own VAE, "
                   "every few steps)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860, as webui)")
    p.add_argument("--api-auth", default=None, metavar="USER:PASS", help="HTTP Basic credentials for every "
                   "request; required when --host is not a loopback address")
    p.add_argument("--queue", type=int, default=8, metavar="N",
                   help="requests that may wait while one runs; more get 503 with Retry-After (default 8)")
    p.set_defaults(run=run_serve)

"""The SDXL refiner of `npdiff serve`: webui's refiner_checkpoint / refiner_switch_at, and webui's SDXL settings.

  check_sdxl_request(shelf, request)   on the request's thread, before anything is queued: the refiner named
                                       as the server names models (its --models-dir entries, "name" or webui's
                                       "name [hash]"; never a path) -> 404 when unknown; an SD model or an SDXL
                                       base given as the refiner, or a refiner after a model that is no SDXL
                                       base -> 422 naming refiner_checkpoint. webui's SDXL settings from
                                       override_settings (request.sdxl_settings) are applied where webui applies
                                       them, else listed as ignored: the crop corner to SDXL models, the
                                       aesthetic scores to a refiner.
  RefinerSlot(shelf)                   the one refiner the server holds beside its model, loaded by the job
    .get(name, sampler)                queue's worker when a request names it (another name frees the old one
                                       first) -> sdxl_recipe.Refiner, sampling with the request's sampler

The picture is `npdiff generate/img2img/inpaint --refiner` 's: recipe.render with the refiner (diffusers'
ensemble of experts; see npdiff/sdxl_recipe.py), byte for byte.
"""

import gc

from npdiff.sdxl_recipe import KIND_NAMES, SCORE_KEYWORDS
from npdiff.sdxl_refiner import load_refiner, model_kind
from npdiff.serve_schemas import RequestError


def model_in_use(shelf, request):
    """(name, path) of the model the request runs on: override_settings' sd_model_checkpoint or the loaded one."""
    if request.model:
        return shelf.model_path(request.model)
    paths = shelf.model_paths()
    if shelf.name not in paths:  # between two models (or one removed from --models-dir since it loaded)
        raise RequestError(503, "sd_model_checkpoint", "sd_model_checkpoint: a model is being loaded; try again")
    return shelf.name, paths[shelf.name]


def check_sdxl_request(shelf, request):
    """The refiner and webui's SDXL settings against the models they go to (module doc); RequestError if unusable."""
    name, path = model_in_use(shelf, request)
    kind = model_kind(path)
    # 1. the refiner: an SDXL refiner of --models-dir after an SDXL base
    if request.refiner is not None:
        refiner_name, refiner_path = shelf.model_path(request.refiner, "refiner_checkpoint")
        refiner_kind = model_kind(refiner_path)
        if refiner_kind != "sdxl-refiner":
            raise RequestError(422, "refiner_checkpoint", f"refiner_checkpoint: {refiner_name!r} is "
                               f"{KIND_NAMES[refiner_kind]}, not an SDXL refiner (a UNet conditioned on the "
                               "aesthetic score, text_encoder_2 alone)")
        if kind != "sdxl":
            raise RequestError(422, "refiner_checkpoint", f"refiner_checkpoint: a refiner follows an SDXL base "
                               f"model, and the model in use ({name!r}) is {KIND_NAMES[kind]}")
    # 2. webui's SDXL settings: where webui applies them, else listed as ignored
    settings = request.sdxl_settings
    crops = {key: value for key, value in settings.items() if key not in SCORE_KEYWORDS}
    scores = {key: value for key, value in settings.items() if key in SCORE_KEYWORDS}
    if crops and kind == "sd":
        request.ignored.append("override_settings.sdxl_crop_top/sdxl_crop_left (an SD 1.x/2.x model has no crop "
                               "conditioning)")
    else:
        request.options.update(crops)
    refined = request.refiner is not None or (kind == "sdxl-refiner" and request.command != "generate")
    if scores and not refined:
        request.ignored.append("override_settings.sdxl_refiner_*_aesthetic_score (they condition an SDXL refiner, "
                               "and none is used)")
    elif scores:
        request.options.update(scores)


class RefinerSlot:
    """The one SDXL refiner `npdiff serve` holds; only the job queue's worker thread calls get()."""

    def __init__(self, shelf):
        self.shelf = shelf
        self.name = None
        self.refiner = None
        self.default_scheduler = None

    def get(self, name, sampler):
        """-> sdxl_recipe.Refiner for the models-dir entry `name`, sampling with `sampler` (None: its own)."""
        name, path = self.shelf.model_path(name, "refiner_checkpoint")
        if name != self.name:
            self.name, self.refiner = None, None  # free the old refiner before loading the new one
            gc.collect()
            self.refiner = load_refiner(path, precision=self.shelf.precision)
            self.refiner.pipe.show_progress = False
            self.default_scheduler = (self.refiner.pipe.scheduler, self.refiner.pipe.scheduler_name)
            self.name = name
        pipe = self.refiner.pipe
        if sampler is None:
            pipe.scheduler, pipe.scheduler_name = self.default_scheduler
        else:
            pipe.set_scheduler(sampler)
        return self.refiner

"""Training in NumPy, through the hand-written backward passes (npdiff/models/*_backward.py).

    loss, grad = text_embedding_grad(pipe, input_ids, latents, noise, timesteps)   # embedding_grad.py
    result = textual_inversion(pipe, "pictures/", token="<x>", init_word="toy", out="x.safetensors")
    loss, grads = lora_grad(pipe, UNetLora.create(pipe, rank=4), input_ids, latents, noise, timesteps)  # lora_grad.py
    result = train_lora(pipe, "pictures/", prompt="a photo of sks dog", rank=4, out="sks.safetensors")  # lora_train.py

Textual inversion (textual_inversion.py) learns new rows of CLIP's token embedding table for a new word
from a few pictures; the rest of the model stays frozen. LoRA training (lora_train.py) learns low-rank changes
to the UNet's attention projections instead, saved in kohya's layout. SD 1.x and 2.x models.
"""

from npdiff.training.embedding_grad import text_embedding_grad
from npdiff.training.lora_grad import UNetLora, lora_grad
from npdiff.training.lora_train import LoraTrainingResult, train_lora
from npdiff.training.textual_inversion import TrainingResult, textual_inversion

__all__ = ["LoraTrainingResult", "TrainingResult", "UNetLora", "lora_grad", "text_embedding_grad", "textual_inversion",
           "train_lora"]

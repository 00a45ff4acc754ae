"""SDXL base 1.0's network configs (unet/, vae/, text_encoder/, text_encoder_2/ config.json, the keys that
shape the networks), and a tiny version of the same architectures, for `npdiff bench models --sdxl`."""

SDXL_UNET_CONFIG = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816, "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
}
SDXL_VAE_CONFIG = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 1024,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "scaling_factor": 0.13025, "force_upcast": True,
}
# CLIP ViT-L (as SD 1.5's) and OpenCLIP ViT-bigG with its projection
SDXL_TEXT_ENCODER_CONFIG = {
    "bos_token_id": 0, "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072,
    "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "num_attention_heads": 12, "num_hidden_layers": 12,
    "pad_token_id": 1, "projection_dim": 768, "vocab_size": 49408,
}
SDXL_TEXT_ENCODER_2_CONFIG = dict(SDXL_TEXT_ENCODER_CONFIG, hidden_act="gelu", hidden_size=1280,
                                  intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                                  projection_dim=1280)

# the same architectures at a few channels (a check run: seconds in all); the UNet attends to both text
# encoders' hidden states side by side (32 + 64 channels), as SDXL's to 768 + 1280
TINY_SDXL_UNET_CONFIG = dict(SDXL_UNET_CONFIG, block_out_channels=[32, 64, 64], attention_head_dim=[1, 2, 4],
                             transformer_layers_per_block=[1, 2, 3], cross_attention_dim=32 + 64,
                             addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
                             sample_size=16)
TINY_SDXL_VAE_CONFIG = dict(SDXL_VAE_CONFIG, block_out_channels=[32, 32, 64, 64], sample_size=128)
TINY_SDXL_TEXT_ENCODER_CONFIG = dict(SDXL_TEXT_ENCODER_CONFIG, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
TINY_SDXL_TEXT_ENCODER_2_CONFIG = dict(SDXL_TEXT_ENCODER_2_CONFIG, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=3, num_attention_heads=1, projection_dim=32)

SDXL_PROFILES = {
    "sdxl": {"unet": SDXL_UNET_CONFIG, "vae": SDXL_VAE_CONFIG, "text_encoder": SDXL_TEXT_ENCODER_CONFIG,
             "text_encoder_2": SDXL_TEXT_ENCODER_2_CONFIG, "latent": 128},
    "sdxl-tiny": {"unet": TINY_SDXL_UNET_CONFIG, "vae": TINY_SDXL_VAE_CONFIG,
                  "text_encoder": TINY_SDXL_TEXT_ENCODER_CONFIG, "text_encoder_2": TINY_SDXL_TEXT_ENCODER_2_CONFIG,
                  "latent": 16},
}
SDXL_COMPONENTS = ["unet", "vae_decode", "text_encoder", "text_encoder_2"]

"""Tiny offline policy models and Qwen2.5-VL input preparation.

``tiny_vl_path()`` / ``tiny_text_path()`` give cached Hugging Face folders that load
with ``from_pretrained`` offline; ``prepare_inputs`` turns rendered prompts and PIL
images into Qwen2.5-VL model inputs without the torchvision-bound HF processor;
``model_folder_here`` checks that a worker finds the folder the driver named.
"""

from mapo_ray.models.folder import model_folder_here
from mapo_ray.models.inputs import prepare_inputs
from mapo_ray.models.tiny import build_tiny_text, build_tiny_vl, tiny_text_path, tiny_vl_path

__all__ = ["build_tiny_text", "build_tiny_vl", "model_folder_here", "prepare_inputs", "tiny_text_path", "tiny_vl_path"]

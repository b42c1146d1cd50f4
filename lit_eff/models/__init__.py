"""LightningModules and model builders."""

from lit_eff.models.causal_lm import CausalLM
from lit_eff.models.gpt import GPT
from lit_eff.models.image_classifier import ImageClassifier, create_timm_model

__all__ = ["GPT", "CausalLM", "ImageClassifier", "create_timm_model"]

"""`LanceModel`: everything in a Lance checkpoint except the VAE, as one module.

    model.llm     LanguageModel (transformer.py): MoT backbone, token embedding, lm_head
    model.vit     VisionTransformer (vit.py): Qwen2.5-VL vision tower
    model.latent  LatentAdapter (latent.py): vae2llm, llm2vae, timestep embedding

The official `modeling/lance/lance.py` (`Lance.__init__`) puts the same parts together; state_dict.py
maps its checkpoint keys onto ours, loader.py fills the parameters.
"""

from __future__ import annotations

from torch import nn

from .config import LLMConfig, ViTConfig
from .latent import LatentAdapter
from .transformer import LanguageModel
from .vit import VisionTransformer


class LanceModel(nn.Module):
    def __init__(self, llm_cfg: LLMConfig, vit_cfg: ViTConfig) -> None:
        super().__init__()
        if vit_cfg.out_hidden_size != llm_cfg.hidden_size:
            raise ValueError(
                f"ViT output {vit_cfg.out_hidden_size} != LLM hidden {llm_cfg.hidden_size} "
                "(Lance uses the Qwen2.5-VL ViT without a connector)"
            )
        self.llm_cfg, self.vit_cfg = llm_cfg, vit_cfg
        self.llm = LanguageModel(llm_cfg)
        self.vit = VisionTransformer(vit_cfg)
        self.latent = LatentAdapter(llm_cfg)

    @staticmethod
    def generation_only(name: str) -> bool:
        """Whether parameter `name` serves generation alone: the generation expert of every layer, its
        final norm and the latent adapters. Understanding (x2t) never touches them, so a captioning
        actor leaves them unloaded (2.8 B of Lance_3B's 6.8 B parameters)."""
        return ".gen." in name or name.startswith(("llm.norm_gen.", "latent."))

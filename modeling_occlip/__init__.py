"""OC-CLIP (object-centric binding in contrastive language-image pre-training) for transformers.

Importing this package registers the configs and models with `AutoConfig`/`AutoModel`, and marks them so that
`save_pretrained` writes `auto_map` and copies the model code (loadable with `trust_remote_code=True`).
"""

from transformers import AutoConfig, AutoModel

from .configuration_occlip import OCCLIPBindingConfig, OCCLIPConfig, OCCLIPTextConfig, OCCLIPVisionConfig
from .modeling_occlip import (
    OCCLIPGraphFeatures,
    OCCLIPImageFeatures,
    OCCLIPModel,
    OCCLIPOutput,
    OCCLIPPreTrainedModel,
    OCCLIPRerankOutput,
    OCCLIPTextModel,
    OCCLIPVisionModel,
)

for _config in (OCCLIPConfig, OCCLIPTextConfig, OCCLIPVisionConfig, OCCLIPBindingConfig):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    _config.register_for_auto_class()
for _config, _model in (
    (OCCLIPConfig, OCCLIPModel),
    (OCCLIPVisionConfig, OCCLIPVisionModel),
    (OCCLIPTextConfig, OCCLIPTextModel),
):
    AutoModel.register(_config, _model, exist_ok=True)
    _model.register_for_auto_class("AutoModel")

__all__ = [
    "OCCLIPBindingConfig",
    "OCCLIPConfig",
    "OCCLIPGraphFeatures",
    "OCCLIPImageFeatures",
    "OCCLIPModel",
    "OCCLIPOutput",
    "OCCLIPPreTrainedModel",
    "OCCLIPRerankOutput",
    "OCCLIPTextConfig",
    "OCCLIPTextModel",
    "OCCLIPVisionConfig",
    "OCCLIPVisionModel",
]

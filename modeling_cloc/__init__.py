"""CLOC (contrastive localized language-image pre-training) for transformers.

Importing this package registers the configs and `CLOCModel` with `AutoConfig`/`AutoModel` and marks them so
that `save_pretrained` writes `auto_map` and copies the model code.
"""

from transformers import AutoConfig, AutoModel, AutoModelForZeroShotImageClassification

from .configuration_cloc import CLOCConfig, CLOCPrompterConfig, CLOCTextConfig, CLOCVisionConfig
from .modeling_cloc import (
    CLOCGroundingOutput,
    CLOCModel,
    CLOCOutput,
    CLOCPreTrainedModel,
    CLOCPrompter,
    CLOCRegionOutput,
    CLOCVisionModel,
    CLOCVisionOutput,
    box_position_encoding,
)

for _config in (CLOCConfig, CLOCTextConfig, CLOCVisionConfig, CLOCPrompterConfig):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    _config.register_for_auto_class()
AutoModel.register(CLOCConfig, CLOCModel, exist_ok=True)
AutoModel.register(CLOCVisionConfig, CLOCVisionModel, exist_ok=True)  # LLaVA: AutoModel.from_config(vision_config)
CLOCVisionModel.register_for_auto_class("AutoModel")
AutoModelForZeroShotImageClassification.register(CLOCConfig, CLOCModel, exist_ok=True)  # usable as a plain CLIP
CLOCModel.register_for_auto_class("AutoModel")

__all__ = [
    "CLOCConfig",
    "CLOCGroundingOutput",
    "CLOCModel",
    "CLOCOutput",
    "CLOCPreTrainedModel",
    "CLOCPrompter",
    "CLOCPrompterConfig",
    "CLOCRegionOutput",
    "CLOCTextConfig",
    "CLOCVisionConfig",
    "CLOCVisionModel",
    "CLOCVisionOutput",
    "box_position_encoding",
]

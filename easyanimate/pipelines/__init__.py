from .pipeline_easyanimate import (
    EasyAnimatePipeline,
    EasyAnimatePipelineOutput,
    load_transformer_lora,
    make_scheduler,
    save_transformer_lora,
)

__all__ = [
    "EasyAnimatePipeline",
    "EasyAnimatePipelineOutput",
    "load_transformer_lora",
    "make_scheduler",
    "save_transformer_lora",
]

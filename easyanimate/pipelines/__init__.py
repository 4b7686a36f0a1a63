from .pipeline_easyanimate import (
    EasyAnimatePipeline,
    EasyAnimatePipelineOutput,
    encode_video,
    load_transformer_lora,
    make_scheduler,
    save_transformer_lora,
)

__all__ = [
    "EasyAnimatePipeline",
    "EasyAnimatePipelineOutput",
    "encode_video",
    "load_transformer_lora",
    "make_scheduler",
    "save_transformer_lora",
]

from .transformer import EasyAnimateTransformer3DModel

__all__ = ["EasyAnimateTransformer3DModel"]

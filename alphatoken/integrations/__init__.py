"""Drop-in trainers: transformers.Trainer, TRL's SFTTrainer and DPOTrainer (TRL imported only when asked for).

    from alphatoken.integrations import AlphaTokenTrainer, AlphaTokenSFTTrainer, AlphaTokenDPOTrainer, with_alphatoken
"""
__all__ = ["AlphaTokenMixin", "AlphaTokenTrainer", "AlphaTokenSFTTrainer", "AlphaTokenDPOTrainer", "with_alphatoken", "forward_through"]


def __getattr__(name):
    if name in ("AlphaTokenMixin", "AlphaTokenTrainer", "with_alphatoken", "forward_through", "check_dataset"):
        from . import trainer

        return getattr(trainer, name)
    if name == "AlphaTokenSFTTrainer":
        from .trl import AlphaTokenSFTTrainer

        return AlphaTokenSFTTrainer
    if name == "AlphaTokenDPOTrainer":
        from .trl import AlphaTokenDPOTrainer

        return AlphaTokenDPOTrainer
    raise AttributeError(f"module 'alphatoken.integrations' has no attribute {name!r}")

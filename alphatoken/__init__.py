"""AlphaToken: spend the post-training gradient only on the response tokens that deserve it.

    import alphatoken as at
    with at.AlphaToken(model, at.AlphaTokenConfig(keep_ratio=0.6), fisher=fisher) as valuer:
        loss = valuer.value_and_loss(batch)
        loss.backward()
"""
from .config import AlphaTokenConfig
from .values import TokenValues

__version__ = "0.1.0"

__all__ = ["AlphaTokenConfig", "TokenValues", "AlphaToken", "Fisher", "estimate_fisher", "tune_on_validation",
           "__version__"]


def __getattr__(name):  # the engine and Fisher import transformers-free torch code only; load on first use
    if name == "AlphaToken":
        from .engine import AlphaToken

        return AlphaToken
    if name in ("Fisher", "estimate_fisher"):
        from . import fisher

        return getattr(fisher, name)
    if name == "tune_on_validation":
        from .tuned import tune_on_validation

        return tune_on_validation
    raise AttributeError(f"module 'alphatoken' has no attribute {name!r}")

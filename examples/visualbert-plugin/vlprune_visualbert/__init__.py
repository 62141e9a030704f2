"""vlprune-visualbert: VisualBERT as a vl_prune backbone, a worked example of a backbone plugin."""

from vlprune_visualbert.backbone import VisualBert

__all__ = ["VisualBert"]
__version__ = "0.1.0"

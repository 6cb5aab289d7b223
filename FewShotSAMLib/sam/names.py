"""The SAM models by name, and the default (a light module: the Slicer panel and the command line read it
before torch is imported)."""

# LiteMedSAM as embedded (box-trained), the same with the decoder fine-tuned here to follow points, SAM
# ViT-H/L/B and MobileSAM (vit_t).
BACKEND_NAMES = ("litemedsam", "litemedsam-points", "vit_h", "vit_l", "vit_b", "vit_t")
DEFAULT_SAM = "litemedsam-points"

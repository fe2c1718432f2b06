"""The networks in plain PyTorch (DiT, U-ViT), their shared layers, the unit policy and one denoising
step: the leaf that the torch backend and the exporter both import (docs/ARCHITECTURE.md). Needs torch;
nothing else in the runtime imports it unless the torch backend is chosen."""

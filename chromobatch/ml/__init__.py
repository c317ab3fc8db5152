"""ml: the classifier as a thing that runs. The timm model factory, model folders (safetensors + JSON),
preprocessing, geometry (chromosome mask, upright), the size prior, and batched prediction.

May import: intake (imaging), store, and the bottom. Not training, not the registry, not the service.
"""

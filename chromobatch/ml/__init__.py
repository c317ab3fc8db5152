"""ml: the classifier as a thing that runs. The timm model factory (factory), model folders (folders:
safetensors + JSON, and the one function that rewrites model.json), preprocessing, geometry (chromosome
mask, upright), the size prior (sizeprior), the one device resolver (device), the one batched forward pass
(forward) and the engines that run it: PyTorch there, ONNX Runtime (onnxrt) and OpenVINO (openvino_rt)
as optional extras, chosen with the precision and cached in converted form by runtime; the render pool
(renderpool: a case's canvases rendered across processes before the forward pass); and batched
prediction for the service (predict).

May import: intake (imaging), store, and the bottom. Not training, not the registry, not the service.
"""

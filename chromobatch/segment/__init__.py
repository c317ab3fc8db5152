"""segment: whole metaphase images into chromosome instances. One small interface (`base`: an `Instance`
per object, a `Segmenter` that finds them), a classical baseline (`classical`: threshold, connected
components, watershed) and a learned one (`learned`: a U-Net on a timm encoder, split by watershed), chosen
by name through `factory`; `cut` turns instances into chromosome crops (neighbours masked out, native
scale) for the classifier; `metrics` scores instances against annotated polygons (F1 and AP at IoU 0.5,
count error).

May import: ml (model folders, device), intake (imaging), store and the bottom. Not the service.
"""

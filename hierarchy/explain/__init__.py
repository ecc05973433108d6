"""Class-activation maps along the route an image took (``hierarchy run --explain``, ``?explain=true``).

:mod:`hierarchy.explain.layers` finds the layer to explain in any torchvision or timm backbone;
:mod:`hierarchy.explain.cam` computes the map with the ``grad-cam`` library on a fresh fp32 torch
model of each stage's checkpoint, whatever engine served the prediction.
"""

# CAM method names (``--explain-method``) -> pytorch_grad_cam class names; here so that the CLI's
# option parser needs neither numpy nor torch.
METHODS = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "hirescam": "HiResCAM",
           "xgradcam": "XGradCAM", "layercam": "LayerCAM", "eigencam": "EigenCAM"}
DEFAULT_METHOD = "gradcam"

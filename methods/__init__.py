"""Attribution methods: each is `(model, x, target, *, hyperparameters) -> Tensor (B, C, H, W)`."""
from methods.cam import grad_cam, last_spatial_layer
from methods.controls import edge, random_map
from methods.gradient import gradient_x_input, guided_backprop, integrated_gradients, saliency

__all__ = [
    "saliency", "gradient_x_input", "integrated_gradients", "guided_backprop",
    "grad_cam", "last_spatial_layer", "random_map", "edge",
]
